"""Content-addressed caches: one directory per (kind, fingerprint), trusted only after a check.

Layout:  <root>/<kind>/<fingerprint>/manifest.json + the files it lists.
The root is a local path or a URI of any filesystem pyarrow supports (file://, s3://, gs://,
hdfs://...), so that every worker on every node can read the same cache.

Each build writes into an attempt directory of its own, <fingerprint>/attempt-<time>-<id>/, and
the manifest, written last in one atomic step, names the files of one attempt: it is the only
proof that a cache is complete. A build that dies half-way leaves an attempt but no manifest
naming it, and is rebuilt; two builds at once each write their own attempt, and the last
manifest wins. A read re-checks the fingerprint, the schema version, every file's size and
SHA-256, each Parquet file's row count and the total; anything else is stale or corrupt and
gets rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from agft_core.catalog import is_uri

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ATTEMPT_PREFIX = "attempt-"
STALE_ATTEMPT_S = 24 * 3600  # an uncommitted attempt this old belongs to a build that died


def absolute(location: str) -> str:
    """A URI as given, a local path made absolute: Ray workers run in other directories."""
    return location if is_uri(location) else str(Path(location).resolve())


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem that holds `location`, and the path inside it."""
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def join(location: str, *parts: str) -> str:
    return "/".join([location.rstrip("/"), *parts])


def basename(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[-1]


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(location: str, data: bytes) -> None:
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as f:
        f.write(data)


def replace_bytes(location: str, data: bytes) -> None:
    """Writes a file that readers see whole or not at all: on a local disk through a rename; on an
    object store one PUT already is atomic."""
    fs, path = filesystem(location)
    if not isinstance(fs, pafs.LocalFileSystem):
        write_bytes(location, data)
        return
    partial = f"{path}.{uuid.uuid4().hex}.partial"
    Path(partial).write_bytes(data)
    os.replace(partial, path)


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def upload(local: Path, location: str) -> None:
    fs, path = filesystem(location)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def local_path(location: str) -> str:
    """A local file with the contents of `location`, downloaded once per (location, size, mtime)."""
    fs, path = filesystem(location)
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{location} does not exist")
    key = hashlib.sha256(f"{location}|{info.size}|{info.mtime_ns}".encode()).hexdigest()[:16]
    local = Path(tempfile.gettempdir()) / "agft-remote" / key / basename(location)
    if not local.is_file() or local.stat().st_size != info.size:
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_suffix(local.suffix + ".partial")
        pafs.copy_files(path, str(partial), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        partial.rename(local)
    return str(local)


def fingerprint(inputs: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def file_sha256(location: str) -> str:
    fs, path = filesystem(location)
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe_file(location: str, rows: int | None = None) -> dict[str, Any]:
    fs, path = filesystem(location)
    return {
        "name": basename(location),
        "bytes": fs.get_file_info(path).size,
        "sha256": file_sha256(location),
        "rows": rows,
    }


def describe_parquet_files(directory: str) -> list[dict[str, Any]]:
    """describe_file of every Parquet file in `directory` (a writer such as Ray Data's names them), by name."""
    fs, path = filesystem(directory)
    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path)) if i.base_name.endswith(".parquet"))
    return [
        describe_file(join(directory, name), rows=pq.read_metadata(f"{path}/{name}", filesystem=fs).num_rows)
        for name in names
    ]


@dataclass(frozen=True)
class CacheEntry:
    root: str
    kind: str
    inputs: Mapping[str, Any]

    @property
    def fingerprint(self) -> str:
        return fingerprint({"kind": self.kind, "schema": SCHEMA_VERSION, **self.inputs})

    @property
    def location(self) -> str:
        return join(absolute(str(self.root)), self.kind, self.fingerprint)

    def file(self, name: str) -> str:
        return join(self.location, name)

    def manifest(self) -> dict[str, Any]:
        return json.loads(read_bytes(self.file(MANIFEST)))

    def problem(self, expected_rows: int | None = None) -> str | None:
        """Why this cache can't be used, or None when it is complete and intact."""
        if not exists(self.file(MANIFEST)):
            return "missing"
        try:
            manifest = self.manifest()
        except (OSError, ValueError) as exc:
            return f"unreadable manifest ({exc})"
        if manifest.get("fingerprint") != self.fingerprint or manifest.get("schema") != SCHEMA_VERSION:
            return "fingerprint or schema mismatch"
        fs, directory = filesystem(self.location)
        for entry in manifest["files"]:
            info = fs.get_file_info(f"{directory}/{entry['name']}")
            if info.type != pafs.FileType.File:
                return f"missing file {entry['name']}"
            if info.size != entry["bytes"] or file_sha256(self.file(entry["name"])) != entry["sha256"]:
                return f"corrupt file {entry['name']}"
            if (
                entry["name"].endswith(".parquet")
                and entry["rows"] is not None
                and pq.read_metadata(f"{directory}/{entry['name']}", filesystem=fs).num_rows != entry["rows"]
            ):
                return f"row count of {entry['name']} != its manifest's {entry['rows']}"
        if manifest["rows"] != sum(entry["rows"] or 0 for entry in manifest["files"]):
            return "manifest row total != the sum of its files"
        if expected_rows is not None and manifest["rows"] != expected_rows:
            return f"row count {manifest['rows']} != expected {expected_rows}"
        return None

    def begin(self) -> str:
        """A new directory for one build attempt, returned as its location. Builds of the same cache at
        the same time (two runs, or sweep trials) write into their own attempts and never delete
        each other's files; readers see only what a manifest names."""
        attempt = f"{ATTEMPT_PREFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        fs, path = filesystem(join(self.location, attempt))
        fs.create_dir(path, recursive=True)
        return join(self.location, attempt)

    @contextmanager
    def attempt(self) -> Iterator[str]:
        """begin(), and on an error the attempt's files go: a failed build leaves nothing behind."""
        location = self.begin()
        try:
            yield location
        except BaseException:
            fs, path = filesystem(location)
            fs.delete_dir(path)
            raise

    def commit(self, attempt: str, files: list[dict[str, Any]], extra: Mapping[str, Any] | None = None) -> None:
        """Seals the files of one attempt (from begin()) as this cache, with one write of the manifest:
        a reader finds the previous manifest or this one, never a mix. When two builds commit, the last
        one wins; each manifest names only its own attempt's complete files, and the other attempt's
        files stay for whoever read its manifest. Attempts abandoned more than STALE_ATTEMPT_S ago go, but not
        the one this manifest replaces, however old: it was the cache until now, and a reader may hold its files."""
        name = basename(attempt)
        replaced = self._attempts_named()
        files = [{**f, "name": f"{name}/{f['name']}"} for f in files]
        rows = sum(f["rows"] or 0 for f in files)
        manifest = {
            "fingerprint": self.fingerprint,
            "schema": SCHEMA_VERSION,
            "kind": self.kind,
            "inputs": dict(self.inputs),
            "files": files,
            "rows": rows,
            **(extra or {}),
        }
        replace_bytes(self.file(MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode())
        self._prune(keep={name, *replaced})

    def _attempts_named(self) -> set[str]:
        """The attempts whose files the current manifest names (none when it is missing or unreadable)."""
        try:
            return {f["name"].split("/")[0] for f in self.manifest()["files"]}
        except (OSError, ValueError, KeyError, TypeError):
            return set()

    def _prune(self, keep: set[str]) -> None:
        fs, directory = filesystem(self.location)
        horizon = time.strftime("%Y%m%dT%H%M%S", time.gmtime(time.time() - STALE_ATTEMPT_S))
        for info in fs.get_file_info(pafs.FileSelector(directory)):
            if info.base_name.startswith(ATTEMPT_PREFIX):
                if info.base_name not in keep and info.base_name[len(ATTEMPT_PREFIX) :] < horizon:
                    fs.delete_dir(info.path)
            elif info.base_name != MANIFEST and not info.base_name.endswith(".partial"):
                fs.delete_file(info.path)  # a file of the layout before attempts, which no manifest names now

    def files(self) -> list[str]:
        return [self.file(f["name"]) for f in self.manifest()["files"]]

    def file_named(self, name: str) -> str:
        """The location of the manifest's file called `name`, in whichever attempt wrote it."""
        (found,) = [f for f in self.files() if basename(f) == name]
        return found


def embedding_table(columns: Mapping[str, Any], embeddings: np.ndarray) -> pa.Table:
    """A table with plain columns plus an 'embedding' column of fixed_size_list<float32>."""
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    flat = pa.array(emb.reshape(-1), type=pa.float32())
    return pa.table({**columns, "embedding": pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])})


def write_parquet(table: pa.Table, location: str) -> dict[str, Any]:
    fs, path = filesystem(location)
    pq.write_table(table, path, filesystem=fs)
    return describe_file(location, rows=table.num_rows)


def read_parquet(locations: list[str]) -> pa.Table:
    tables = []
    for location in locations:
        fs, path = filesystem(location)
        tables.append(pq.read_table(path, filesystem=fs))
    return pa.concat_tables(tables)


def embeddings_of(table: pa.Table) -> np.ndarray:
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).copy()  # writable for torch
