import functools
import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from tiny import prepared_by_hand

from agft_core.cache import CacheEntry, embedding_table, embeddings_of, join, read_parquet, write_parquet
from agft_core.catalog import check_location


def _build(entry: CacheEntry, shards: list[np.ndarray]) -> None:
    directory = entry.begin()
    files, start = [], 0
    for i, emb in enumerate(shards):
        table = embedding_table({"index": np.arange(start, start + len(emb))}, emb)
        files.append(write_parquet(table, join(directory, f"part-{i:05d}.parquet")))
        start += len(emb)
    entry.commit(directory, files)


def _entry(root, **inputs):
    return CacheEntry(
        root,
        "teacher",
        {"weights": "w1", "dataset": "d1", "preprocess": "p1", "prompts": ["a photo of a {}."], **inputs},
    )


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
def test_round_trip_preserves_rows_and_fixed_size_list_type(tmp_path, as_uri):
    rng = np.random.default_rng(0)
    shards = [rng.standard_normal((7, 4)).astype(np.float32), rng.standard_normal((5, 4)).astype(np.float32)]
    entry = _entry(tmp_path.as_uri() if as_uri else tmp_path)
    _build(entry, shards)
    assert entry.problem(expected_rows=12) is None
    assert all(f.startswith("file://" if as_uri else "/") for f in entry.files())
    table = read_parquet(entry.files())
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    np.testing.assert_array_equal(embeddings_of(table), np.concatenate(shards))
    np.testing.assert_array_equal(table.column("index").to_numpy(), np.arange(12))
    (attempt,) = (tmp_path / "teacher" / entry.fingerprint).glob("attempt-*")
    assert sorted(p.name for p in attempt.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]


def test_fingerprint_covers_prompts_and_weights(tmp_path):
    base = _entry(tmp_path)
    _build(base, [np.ones((3, 2), np.float32)])
    changed_prompt = _entry(tmp_path, prompts=["a picture of a {}."])
    changed_weights = CacheEntry(tmp_path, "teacher", {**base.inputs, "weights": "w2"})
    assert len({base.fingerprint, changed_prompt.fingerprint, changed_weights.fingerprint}) == 3
    assert changed_prompt.problem() == "missing" and changed_weights.problem() == "missing"
    assert base.problem() is None


def test_truncated_shard_is_detected(tmp_path):
    entry = _entry(tmp_path)
    _build(entry, [np.ones((50, 8), np.float32), np.ones((50, 8), np.float32)])
    shard = Path(entry.files()[1])
    shard.write_bytes(shard.read_bytes()[:-40])
    assert entry.problem(expected_rows=100) == f"corrupt file {shard.parent.name}/{shard.name}"


def test_same_size_corruption_is_detected_by_the_checksum(tmp_path):
    entry = _entry(tmp_path)
    _build(entry, [np.ones((50, 8), np.float32)])
    shard = Path(entry.files()[0])
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert entry.problem() == f"corrupt file {shard.parent.name}/{shard.name}"


def test_missing_shard_wrong_rows_and_bad_manifest_are_detected(tmp_path):
    entry = _entry(tmp_path)
    _build(entry, [np.ones((4, 2), np.float32), np.ones((4, 2), np.float32)])
    assert entry.problem(expected_rows=9) == "row count 8 != expected 9"
    Path(entry.files()[0]).unlink()
    assert entry.problem(expected_rows=8).startswith("missing file")
    Path(entry.file("manifest.json")).write_text("{not json")
    assert entry.problem().startswith("unreadable manifest")


def test_a_build_that_dies_before_its_manifest_is_not_trusted(tmp_path):
    entry = _entry(tmp_path)
    directory = entry.begin()
    write_parquet(
        embedding_table({"index": np.arange(3)}, np.ones((3, 2), np.float32)), join(directory, "part-00000.parquet")
    )
    assert entry.problem() == "missing"


def test_rebuild_replaces_a_corrupt_cache_and_abandoned_attempts_are_pruned(tmp_path):
    entry = _entry(tmp_path)
    _build(entry, [np.zeros((3, 2), np.float32), np.zeros((3, 2), np.float32)])
    Path(entry.files()[0]).write_bytes(b"garbage")
    assert entry.problem() is not None
    abandoned = Path(entry.location) / "attempt-20000101T000000-dead0000"  # a build that died long ago
    abandoned.mkdir()
    running = Path(entry.begin())  # a build under way in another process: its files must survive
    _build(entry, [np.full((3, 2), 2.0, np.float32)])
    assert entry.problem(expected_rows=3) is None
    assert embeddings_of(read_parquet(entry.files())).tolist() == [[2.0, 2.0]] * 3
    assert running.is_dir() and not abandoned.exists()


def test_a_rebuild_keeps_the_files_of_the_entry_it_replaces_however_old(tmp_path):
    """A run that found a two-day-old entry reads its files while another run rebuilds it (--rerun): the old
    attempt is past the abandoned-attempt horizon, but it was the cache until the new manifest, so it stays."""
    entry = _entry(tmp_path)
    old = join(entry.location, "attempt-20000101T000000-old00000")
    Path(old).mkdir(parents=True)
    ones = embedding_table({"index": np.arange(3)}, np.ones((3, 2)))
    entry.commit(old, [write_parquet(ones, join(old, "part-00000.parquet"))])
    held = entry.files()  # what the first run's tasks read
    _build(entry, [np.full((3, 2), 2.0, np.float32)])
    assert entry.files() != held and embeddings_of(read_parquet(held)).tolist() == [[1.0, 1.0]] * 3
    _build(entry, [np.full((3, 2), 3.0, np.float32)])  # replaced twice: now it goes
    assert not Path(old).exists()


def test_a_manifest_whose_row_counts_lie_is_detected(tmp_path):
    entry = _entry(tmp_path)
    _build(entry, [np.ones((4, 2), np.float32), np.ones((4, 2), np.float32)])
    manifest = json.loads(Path(entry.file("manifest.json")).read_text())
    manifest["files"][0]["rows"] += 1
    manifest["rows"] += 1  # consistent with itself, not with the Parquet file
    Path(entry.file("manifest.json")).write_text(json.dumps(manifest))
    assert entry.problem(expected_rows=9) == f"row count of {manifest['files'][0]['name']} != its manifest's 5"
    manifest["files"][0]["rows"] -= 1
    Path(entry.file("manifest.json")).write_text(json.dumps(manifest))
    assert entry.problem() == "manifest row total != the sum of its files"


def _slow_build(root: str, value: float, start, shards: int) -> None:
    """One of two processes building the same cache at the same time."""
    entry = _entry(root)
    directory = entry.begin()
    start.wait()
    files = []
    for i in range(shards):
        table = embedding_table({"index": np.arange(i * 100, (i + 1) * 100)}, np.full((100, 8), value, np.float32))
        files.append(write_parquet(table, join(directory, f"part-{i:05d}.parquet")))
        time.sleep(0.05)
    entry.commit(directory, files)


def test_two_processes_building_one_cache_leave_one_whole_winner_and_readers_never_see_a_mix(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    builders = [ctx.Process(target=_slow_build, args=(str(tmp_path), value, start, 8)) for value in (1.0, 2.0)]
    for b in builders:
        b.start()
    entry = _entry(tmp_path)
    while any(b.is_alive() for b in builders):  # a reader polling while both write
        if entry.problem() is None:
            values = set(np.unique(embeddings_of(read_parquet(entry.files()))).tolist())
            assert len(values) == 1, f"a mix of two builds: {values}"
    for b in builders:
        b.join()
        assert b.exitcode == 0
    assert entry.problem(expected_rows=800) is None
    assert len(set(np.unique(embeddings_of(read_parquet(entry.files()))).tolist())) == 1


def test_locations_accept_paths_and_pyarrow_uris_only():
    assert check_location("relative/cache") is None
    assert check_location("file:///tmp/cache") is None and check_location("s3://bucket/agft") is None
    assert "unsupported URI scheme ftp://" in check_location("ftp://host/cache")


@functools.cache
def _fine_tune_entry(method: str, *overrides: str) -> CacheEntry:
    """The fine-tune's cache entry for the embedded default with these overrides."""
    from pipeline.config.loading import load_config
    from pipeline.context import RunContext
    from pipeline.stages.finetune import cache_entry

    base = [f"train.method={method}", "data.train.limit=128", "train.validation.dataset.limit=32"]
    cfg = load_config(None, [*base, *overrides])
    prepared = prepared_by_hand(cfg, teacher_cache=method == "agft")
    return cache_entry(RunContext(cfg, "sqlite:///unused.db"), prepared)


def _fine_tune_key(method: str, *overrides: str) -> str:
    return _fine_tune_entry(method, *overrides).fingerprint


@pytest.mark.parametrize("method", ["tecoa", "agft"])
@pytest.mark.parametrize(
    "change",
    [
        "data.train.limit=64",
        "data.world_seed=1",
        "data.decode=ray_data",
        "train.validation.dataset.limit=16",
        "eval.batch_size=16",
    ],
)
def test_the_fine_tune_key_follows_the_images_it_trains_and_validates_on(method, change):
    """Whatever the method reads: without a teacher cache (TeCoA), the training set's identity reaches the key only
    if the key holds it. The data order (loader's sampler or Ray Data's stream) and the validation's batches (its
    attack's random starts) change the encoder or its history too."""
    assert _fine_tune_key(method, change) != _fine_tune_key(method)


def test_a_revised_method_keys_its_fine_tunes_apart_and_the_others_keep_their_keys():
    """pmg_aft's loss and training attack changed on 2026-12-07 (its spec's revision): an encoder it trained before
    is not found. A method never revised has no revision in its key: its cached fine-tunes are found as before."""
    from agft_core.catalog import METHOD_SPECS

    assert _fine_tune_entry("pmg_aft").inputs["method_revision"] == METHOD_SPECS["pmg_aft"].revision
    assert not {"method_revision"} & {*_fine_tune_entry("tecoa").inputs, *_fine_tune_entry("pmg_aft_scaled").inputs}
