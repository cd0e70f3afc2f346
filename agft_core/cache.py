"""Content-addressed caches: one directory per (kind, fingerprint), trusted only after a check.

Layout:  <root>/<kind>/<fingerprint>/manifest.json + the files it lists.
The root is a local path or a URI of any filesystem pyarrow supports (file://, s3://, gs://,
hdfs://...), so that every worker on every node can read the same cache.

The manifest is written last and is the only proof that a cache is complete: a build that
dies half-way leaves files but no manifest, and is rebuilt. Object stores cannot rename a
directory, so there is no staging directory to swap in. A read re-checks the fingerprint,
the schema version, every file's size and SHA-256 and the row count; anything else is
stale or corrupt and gets rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
URI_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def is_uri(location: str) -> bool:
    return "://" in location


def absolute(location: str) -> str:
    """A URI as given, a local path made absolute: Ray workers run in other directories."""
    return location if is_uri(location) else str(Path(location).resolve())


def check_location(location: str) -> str | None:
    """Why `location` can't hold caches or checkpoints, or None."""
    scheme = location.partition("://")[0] if is_uri(location) else "file"
    if scheme not in URI_SCHEMES:
        return f"unsupported URI scheme {scheme}://; use a local path or one of " + \
            ", ".join(f"{s}://" for s in URI_SCHEMES)
    return None


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
    return {"name": basename(location), "bytes": fs.get_file_info(path).size, "sha256": file_sha256(location),
            "rows": rows}


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
        if expected_rows is not None and manifest["rows"] != expected_rows:
            return f"row count {manifest['rows']} != expected {expected_rows}"
        return None

    def begin(self) -> str:
        """Clears a stale or corrupt predecessor, manifest first, and returns the directory to write into."""
        fs, directory = filesystem(self.location)
        if exists(self.file(MANIFEST)):
            fs.delete_file(f"{directory}/{MANIFEST}")  # first: if the clean-up dies half-way, nothing looks complete
        fs.delete_dir_contents(directory, missing_dir_ok=True)
        fs.create_dir(directory, recursive=True)
        return self.location

    def commit(self, files: list[dict[str, Any]], extra: Mapping[str, Any] | None = None) -> None:
        """Seals the files written since begin() as this cache."""
        rows = sum(f["rows"] or 0 for f in files)
        manifest = {"fingerprint": self.fingerprint, "schema": SCHEMA_VERSION, "kind": self.kind,
                    "inputs": dict(self.inputs), "files": files, "rows": rows, **(extra or {})}
        write_bytes(self.file(MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode())

    def files(self) -> list[str]:
        return [self.file(f["name"]) for f in self.manifest()["files"]]


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
