"""Evaluation as many small units: each (dataset, model, attack) cell in shards of images, each cached as it
finishes, the shards spread over every task slot, a failed one reported without losing the others."""

import json
import os
import re
import signal
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from ray.util.state import list_tasks
from ray_cluster import agft_command, ray_cluster, state
from tiny import TEACHER

from agft_core.cache import embeddings_of, read_parquet
from agft_core.datasets import load_dataset
from agft_core.evaluate import zero_shot_counts
from agft_core.model import ImageEncoder, create_clip, logit_scale
from pipeline.config.loading import load_config
from pipeline.context import RunContext
from pipeline.run import prepare
from pipeline.stages import evaluate

PGD = ["eval.attack={name: pgd, eps: 4/255, alpha: 1/255, steps: 3}", "eval.quick=null", "eval.batch_size=8"]


def _context(root: Path, *overrides: str) -> tuple[RunContext, list[str]]:
    cfg = load_config(None, [*TEACHER, *PGD, f"cache_dir={root / 'cache'}", *overrides])
    lines = []
    return RunContext(cfg, f"sqlite:///{root / 'mlflow.db'}", log=lines.append), lines


def _committed(root: Path) -> list[list[int]]:
    """The image ranges of the eval shards whose cache entry is sealed."""
    manifests = (root / "cache" / "eval").glob("*/manifest.json")
    return sorted(json.loads(m.read_text())["inputs"]["images"] for m in manifests)


def test_a_cell_in_shards_adds_up_to_each_shard_scored_on_its_own(ray_local, tmp_path):
    """40 images in shards of 16: three tasks, three cache entries, and the cell's counts are the sum of each
    range scored here with the seed the shard starts at. Scored as one shard, the clean accuracy is the same to
    the image: the shards partition the dataset."""
    sharded, lines = _context(tmp_path, "data.zero_shot=[{name: colours, limit: 40}]", "eval.shard_size=16")
    prepared = prepare(sharded, training=False)
    attack = sharded.cfg.eval.attack.as_tuple()
    (row,) = evaluate.evaluate(sharded, prepared, {"original": None}, [attack])
    assert "[eval original] 0 of 3 shards cached, computing 3" in lines
    assert _committed(tmp_path) == [[0, 16], [16, 32], [32, 40]]

    (key,) = [k for k in prepared.specs if k.startswith("zs")]
    teacher = prepared.teacher
    clip = create_clip(teacher.arch, teacher.weights)
    encoder, scale = ImageEncoder.from_clip(clip), logit_scale(clip)
    text = torch.from_numpy(np.array(embeddings_of(read_parquet(prepared.texts[key].files()))))
    images = load_dataset(prepared.specs[key], teacher.size).images
    name, eps, alpha, steps, _ = attack
    total = {}
    for start, stop in ((0, 16), (16, 32), (32, 40)):
        counts = zero_shot_counts(
            encoder,
            text,
            scale,
            images,
            eps=eps,
            alpha=alpha,
            steps=steps,
            batch_size=8,
            generator=torch.Generator().manual_seed(sharded.cfg.seed + start),
            attack=name,
            indices=range(start, stop),
        )
        total = {k: total.get(k, 0) + v for k, v in counts.items()}
    assert total["n"] == row["n"] == 40
    assert row["clean"] == total["clean"] / 40 and row["attacked"] == total["attacked"] / 40
    assert row["clean_and_attacked"] == total["clean_and_attacked"] / 40

    whole, _ = _context(tmp_path, "data.zero_shot=[{name: colours, limit: 40}]", "eval.shard_size=1000")
    (one_shard,) = evaluate.evaluate(whole, prepare(whole, training=False), {"original": None}, [attack])
    assert one_shard["clean"] == row["clean"]


def test_a_killed_shard_is_reported_in_one_line_and_the_others_are_kept(ray_local, tmp_path):
    """eval.retries=0, and every shard task running at one moment is SIGKILLed: each killed shard is one line
    and leaves its cell incomplete, every other shard is scored and cached, and the next evaluation computes
    exactly the shards that were killed."""
    overrides = ["data.zero_shot=[{name: colours, limit: 96}]", "eval.shard_size=16", "eval.attack.steps=40"]
    ctx, lines = _context(tmp_path, *overrides, "eval.retries=0")
    prepared = prepare(ctx, training=False)
    attack = ctx.cfg.eval.attack.as_tuple()
    out = {}
    evaluating = threading.Thread(
        target=lambda: out.update(rows=evaluate.evaluate(ctx, prepared, {"original": None}, [attack]))
    )
    evaluating.start()
    address = ray.get_runtime_context().gcs_address
    running = []
    deadline = time.time() + 120
    while not running and evaluating.is_alive():
        assert time.time() < deadline, "no shard was seen running"
        tasks = list_tasks(address=address, filters=[("func_or_class_name", "=", "evaluate_shard")], detail=True)
        running = [t.worker_pid for t in tasks if t.state == "RUNNING" and t.worker_pid]
        time.sleep(0.05)
    for pid in running:
        os.kill(pid, signal.SIGKILL)
    evaluating.join()

    failed = len(ctx.failures)
    assert 1 <= failed <= len(running), (running, lines)
    assert all(
        re.fullmatch(r"\[eval\] eval colours \[\d+:\d+\] \(original, pgd, ε 4/255\) failed after 0 retries: .+", line)
        for line in ctx.failures
    ), ctx.failures
    (row,) = out["rows"]
    assert row["robust"] == evaluate.INCOMPLETE and row["n"] == f"{6 - failed}/6 shards"
    assert len(_committed(tmp_path)) == 6 - failed

    again, lines = _context(tmp_path, *overrides)
    (row,) = evaluate.evaluate(again, prepare(again, training=False), {"original": None}, [attack])
    assert f"[eval original] {6 - failed} of 6 shards cached, computing {failed}" in lines
    assert row["n"] == 96 and isinstance(row["robust"], float) and not again.failures
    assert len(_committed(tmp_path)) == 6


SLOTS = 4  # GPUs declared over the cluster's two worker nodes
SHARDS = 32  # 8 waves of them


@pytest.mark.slow
def test_shards_keep_every_gpu_slot_busy_and_a_killed_driver_loses_only_unfinished_ones(tmp_path):
    """2 nodes × 2 declared GPUs, one GPU per eval task: 4 slots. `agft eval` is SIGKILLed once some shards are
    cached; the same command again computes only the shards that were not written. While its shards remain,
    Ray's task events show the slots busy: ≥ 90 % of slot-time from the first shard's start to the last's. (Each
    slot's worker process imports torch and open_clip first: 8 slots on this 2-core machine cost a minute of CI.)"""
    overrides = [
        *TEACHER,
        *PGD,
        f"cache_dir={tmp_path / 'cache'}",
        "experiment=shards",
        "data.zero_shot=[{name: colours, limit: 128}, {name: shapes, limit: 128}]",
        "eval.shard_size=8",
        "eval.matrix.steps=10",
        "resources.task_gpus=1",
        "resources.task_cpus=0.5",
        "resources.cpu_fallback=true",
    ]
    cmd, uri = agft_command("eval", tmp_path, overrides)
    with ray_cluster(head_cpus=1, workers=[{"num-cpus": 2, "num-gpus": SLOTS // 2}] * 2) as cluster:
        env = {**cluster.env, "RAY_ADDRESS": cluster.gcs_address}
        killed = subprocess.Popen(
            cmd, env=env, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 400
        try:
            while len(_committed(tmp_path)) < 8:
                assert time.time() < deadline and killed.poll() is None, "the first shards were not cached in time"
                time.sleep(0.1)
        finally:
            os.killpg(killed.pid, signal.SIGKILL)
            killed.wait()
        time.sleep(5)  # Ray kills a dead driver's tasks: nothing is written after this
        kept = len(_committed(tmp_path))
        assert kept < SHARDS
        rerun = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-4000:]
        assert f"[eval original] {kept} of {SHARDS} shards cached, computing {SHARDS - kept}" in rerun.stdout
        assert len(_committed(tmp_path)) == SHARDS
        tasks = [t for t in state(cluster, "tasks") if t["func_or_class_name"] == "evaluate_shard"]
    second = [t for t in tasks if t["job_id"] == max(t["job_id"] for t in tasks) and t["state"] == "FINISHED"]
    assert len(second) == SHARDS - kept
    assert all(t["required_resources"] == {"GPU": 1, "CPU": 0.5} for t in second)  # one slot each
    # `ray list --format json` gives the task events' times as ISO timestamps. A task's end is when its driver took
    # the result, which on a loaded machine can come after Ray gave its slot to the next shard (a fifth shard seemed
    # to run beside four): the slots are checked by what each task asked for, and the busy time below counts that
    # lag as busy.
    spans = sorted((_seconds(t["start_time_ms"]), _seconds(t["end_time_ms"])) for t in second)
    # From the moment each slot holds a shard (a new job's worker processes first import torch, one after another
    # on this machine's two cores) to the last shard's start: how busy the slots are.
    window = (next(start for start, _ in spans if sum(s <= start < e for s, e in spans) == SLOTS), spans[-1][0])
    busy = sum(max(0.0, min(end, window[1]) - max(start, window[0])) for start, end in spans)
    slot_time = SLOTS * (window[1] - window[0])
    span = window[1] - window[0]
    print(f"{len(second)} shards, {busy / slot_time:.1%} of the {SLOTS} slots' time busy over {span:.1f} s")
    assert busy >= 0.9 * slot_time, f"{busy / slot_time:.0%} of the {SLOTS} slots' time busy"


def _seconds(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp).timestamp()
