"""Content-addressed caches: one directory per (kind, fingerprint), trusted only after a check.

Layout:  <root>/<kind>/<fingerprint>/manifest.json + the files it lists.
The manifest is written last, into a staging directory that is then renamed into place,
so a half-written cache never looks complete. A read re-checks the fingerprint, the
schema version, every file's size and SHA-256 and the row count; anything else is stale
or corrupt and gets rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def fingerprint(inputs: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe_file(path: Path, rows: int | None = None) -> dict[str, Any]:
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path), "rows": rows}


@dataclass(frozen=True)
class CacheEntry:
    root: Path
    kind: str
    inputs: Mapping[str, Any]

    @property
    def fingerprint(self) -> str:
        return fingerprint({"kind": self.kind, "schema": SCHEMA_VERSION, **self.inputs})

    @property
    def path(self) -> Path:
        return Path(self.root) / self.kind / self.fingerprint

    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / MANIFEST).read_text())

    def problem(self, expected_rows: int | None = None) -> str | None:
        """Why this cache can't be used, or None when it is complete and intact."""
        try:
            manifest = self.manifest()
        except FileNotFoundError:
            return "missing"
        except (OSError, ValueError) as exc:
            return f"unreadable manifest ({exc})"
        if manifest.get("fingerprint") != self.fingerprint or manifest.get("schema") != SCHEMA_VERSION:
            return "fingerprint or schema mismatch"
        for entry in manifest["files"]:
            path = self.path / entry["name"]
            if not path.is_file():
                return f"missing file {entry['name']}"
            if path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
                return f"corrupt file {entry['name']}"
        if expected_rows is not None and manifest["rows"] != expected_rows:
            return f"row count {manifest['rows']} != expected {expected_rows}"
        return None

    def staging(self) -> Path:
        path = Path(self.root) / self.kind / f".staging-{self.fingerprint}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def commit(self, staging: Path, files: list[dict[str, Any]], extra: Mapping[str, Any] | None = None) -> None:
        """Seal a staging directory as this cache; a stale or corrupt predecessor is replaced."""
        rows = sum(f["rows"] or 0 for f in files)
        manifest = {"fingerprint": self.fingerprint, "schema": SCHEMA_VERSION, "kind": self.kind,
                    "inputs": dict(self.inputs), "files": files, "rows": rows, **(extra or {})}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if self.path.exists():
            trash = self.path.with_name(f".trash-{self.fingerprint}-{uuid.uuid4().hex[:8]}")
            self.path.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        staging.rename(self.path)

    def files(self) -> list[Path]:
        return [self.path / f["name"] for f in self.manifest()["files"]]


def embedding_table(columns: Mapping[str, Any], embeddings: np.ndarray) -> pa.Table:
    """A table with plain columns plus an 'embedding' column of fixed_size_list<float32>."""
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    flat = pa.array(emb.reshape(-1), type=pa.float32())
    return pa.table({**columns, "embedding": pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])})


def write_parquet(table: pa.Table, path: Path) -> dict[str, Any]:
    pq.write_table(table, path)
    return describe_file(path, rows=table.num_rows)


def read_parquet(paths: list[Path]) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in paths])


def embeddings_of(table: pa.Table) -> np.ndarray:
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).copy()  # writable for torch
