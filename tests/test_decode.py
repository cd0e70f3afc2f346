"""data.decode: ray_data. The teacher cache built through Ray Data (decode actors, model actors or decoders that
embed, Parquet written block by block) holds the rows and values of the loader path, and an independent computation
agrees with both; training reads a Ray Data stream split over its workers."""

import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from ray.util.state import list_actors
from tiny import ONE_ZERO_SHOT, TEACHER

from agft_core.cache import embeddings_of, read_parquet
from agft_core.datasets import load_dataset
from agft_core.model import ImageEncoder, create_clip
from pipeline.cluster import alive_nodes, streaming_plan
from pipeline.config.loading import load_config
from pipeline.context import RunContext
from pipeline.ingest import StreamedIngest
from pipeline.run import prepare, run
from tasks.streaming import Streaming, stream_teacher_cache

IMAGES = 100  # not a multiple of the batch: the last block is short


def _teacher_cache(tmp_path, decode: str, rerun: frozenset = frozenset()):
    cfg = load_config(
        None,
        [
            *TEACHER,
            ONE_ZERO_SHOT,
            f"data.train.limit={IMAGES}",
            f"data.decode={decode}",
            "eval.batch_size=16",
            "train.batch_size=16",
            f"cache_dir={tmp_path / 'cache'}",
        ],
    )
    lines = []
    ctx = RunContext(cfg, f"sqlite:///{tmp_path / 'mlflow.db'}", rerun=rerun, log=lines.append)
    prepared = prepare(ctx, training=True)
    return prepared, prepared.teacher_cache, lines


def test_ray_data_writes_the_teacher_cache_the_loader_path_writes(ray_local, tmp_path):
    prepared, loader, _ = _teacher_cache(tmp_path, "loader")
    by_loader = read_parquet(loader.files()).sort_by("index")
    _, streamed, lines = _teacher_cache(tmp_path, "ray_data", rerun=frozenset({"teacher"}))
    assert streamed.fingerprint == loader.fingerprint  # who decoded is not an input of the cache
    assert streamed.problem(IMAGES) is None and any("building: rerun requested" in line for line in lines)
    parts = streamed.files()
    assert len(parts) > 1 and all(pq.read_metadata(p).num_rows for p in parts)  # written block by block
    by_ray_data = read_parquet(parts).sort_by("index")
    assert by_ray_data.schema.field("embedding").type == by_loader.schema.field("embedding").type
    assert by_ray_data.column("index").to_pylist() == list(range(IMAGES))
    assert by_ray_data.column("label").to_pylist() == by_loader.column("label").to_pylist()
    np.testing.assert_allclose(embeddings_of(by_ray_data), embeddings_of(by_loader), rtol=0, atol=1e-5)

    # both against the teacher run here, one image at a time
    teacher = prepared.teacher
    encoder = ImageEncoder.from_clip(create_clip(teacher.arch, teacher.weights)).eval()
    images = load_dataset(prepared.specs["train"], teacher.size).images
    with torch.no_grad():
        for i in (0, 57, IMAGES - 1):
            pixels, label = images[i]
            assert by_ray_data.column("label")[i].as_py() == int(label)
            np.testing.assert_allclose(embeddings_of(by_ray_data)[i], encoder(pixels[None])[0].numpy(), atol=1e-5)

    # This Ray has no GPUs, so the build above ran fused (each decoder embeds); a cluster with GPUs runs the stages
    # apart, decoders feeding model actors: the same rows.
    assert streaming_plan(load_config(None, []), alive_nodes(), 16).fused
    apart = Streaming(decoders=1, decode_cpus=0.5, embedders=1, task_cpus=0.5, task_gpus=0, batch_size=16, fused=False)
    out = tmp_path / "apart"
    ray.get(
        stream_teacher_cache.remote(teacher.source, prepared.specs["train"], size=IMAGES, plan=apart, out_dir=str(out))
    )
    by_stages_apart = read_parquet(sorted(str(p) for p in out.glob("*.parquet"))).sort_by("index")
    assert by_stages_apart.column("label").to_pylist() == by_loader.column("label").to_pylist()
    np.testing.assert_allclose(embeddings_of(by_stages_apart), embeddings_of(by_loader), rtol=0, atol=1e-5)


def test_naming_a_parquet_file_imports_no_torch():
    """Every Ray Data write task unpickles the cache's file namer: a module that imported torch and open_clip cost
    each write worker seconds and hundreds of MB."""
    code = "import sys, tasks.parquet_parts; print(sorted({'torch', 'open_clip'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_the_streaming_plan_puts_a_model_actor_on_each_gpu_slot_and_decoders_on_every_cpu():
    cfg = load_config(None, ["resources.task_gpus=0.5", "resources.task_cpus=2", "resources.decode_cpus=4"])
    gpu_node, cpu_node = {"CPU": 96.0, "GPU": 8.0}, {"CPU": 32.0}
    plan = streaming_plan(cfg, [gpu_node, gpu_node, cpu_node], 64)
    # 2 nodes x 8 GPUs / 0.5 = 32 model actors of 2 CPUs; up to (96 + 96 + 32) / 4 decoders
    assert (plan.embedders, plan.decoders, plan.batch_size, plan.fused) == (32, 56, 64, False)
    on_cpus = streaming_plan(load_config(None, []), [{"CPU": 2.0}], 64)
    assert (on_cpus.decoders, on_cpus.task_gpus, on_cpus.fused) == (2, 0, True)


def test_a_streamed_batch_is_on_the_workers_device_not_on_rays_guess(ray_local):
    """Ray's iter_torch_batches puts batches on Ray Train's GPU by default, also on a node without CUDA where the
    worker computes on its CPU (resources.cpu_fallback). The meta device stands in for the worker's own here."""
    rows = [{"pixels": np.zeros((3, 2, 2), np.float32), "label": i % 2, "index": i} for i in range(8)]
    cfg = load_config(None, ["train.batch_size=4"])
    ingest = StreamedIngest(ray.data.from_items(rows).iterator(), cfg, 8, 1, torch.device("meta"))
    batches = list(ingest.epoch(0))
    assert len(batches) == 2 and {t.device.type for batch in batches for t in batch} == {"meta"}


def test_training_reads_a_ray_data_stream_split_evenly_over_its_workers(ray_local, tmp_path):
    """Two train workers of half a CPU each on the 2-CPU test Ray, images decoded by Ray Data actors beside them:
    both workers take the same number of steps (else DDP's all-reduce would hang), every epoch is logged, and the
    images came from the decode actors."""
    cfg = load_config(
        None,
        [
            *TEACHER,
            ONE_ZERO_SHOT,
            f"data.train.limit={IMAGES}",
            "data.decode=ray_data",
            "train.method=tecoa",
            "resources.decode_cpus=0.5",
            "train.cpus_per_worker=0.5",
            "train.num_workers=2",
            "train.batch_size=16",  # 100 images: 50 a worker, 3 steps of 16
            "train.epochs=2",
            "train.warmup_epochs=0",
            "train.validation=null",
            "eval.attack.steps=1",
            "eval.quick=null",
            "register_models=false",
            f"cache_dir={tmp_path / 'cache'}",
        ],
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = _decode_actors()
    result = run(RunContext(cfg, uri, log=lambda line: None), original=False)
    client = MlflowClient(uri)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    lr = client.get_metric_history(result.run_id, "lr")
    assert [m.step for m in lr] == [1, 2] and lr[-1].value == pytest.approx(0, abs=1e-12)  # the schedule's end
    assert _decode_actors() > before  # TeCoA reads no teacher cache: only training streamed


def _decode_actors() -> int:
    actors = list_actors(address=ray.get_runtime_context().gcs_address, limit=10000, detail=True)
    return sum("DecodeImages" in actor.class_name for actor in actors)


def test_the_console_drops_ray_datas_lines_for_each_dataset_and_keeps_the_runs_own():
    """Lines a worker printed during a teacher-cache build through Ray Data (2026-12-07), as the driver receives them:
    Ray Data's five per dataset and the core worker's ERROR about its actor pool's constructor arguments."""
    import re

    from pipeline.cli import RAY_NOISE

    noise = [
        "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.",
        "Starting execution of Dataset dataset_035Am_0. Full logs are in /tmp/ray/session_x/logs/ray-data",
        "Execution plan of Dataset dataset_035Am_0: InputDataBuffer[Input] -> ActorPoolMapOperator[MapBatches("
        "DecodeAndEmbed)] -> TaskPoolMapOperator[Write]",
        "✔️  Dataset dataset_035Am_0 execution finished in 24.97 seconds",
        "Data sink Parquet finished. 6000 rows and 3.0MiB data written.",
        "[2026-12-07 21:54:25,911 E 4989 4989] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches("
        "DecodeAndEmbed))' and ID: '1bc83ae0' has constructor arguments in the object store and max_restarts > 0.",
        "Actor with class name: 'PreemptionWatcher' and ID: '0a1b' has constructor arguments in the object store",
    ]
    kept = [
        "teacher and text caches: 4/4 tasks (100 %, 33 s)",
        "[cache] teacher: building: rerun requested",
        "ValueError: data.train: no images under /data/imagenet/train",
    ]
    assert [line for line in noise + kept if not re.search(RAY_NOISE, line)] == kept
