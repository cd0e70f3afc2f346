"""How the benchmarks run the `agft` CLI: as a user does, one fresh process per command, timed."""

import argparse
import subprocess
import sys
import time
from pathlib import Path


def agft(*args: str) -> float:
    """Runs `agft ARGS` from this virtual environment and returns its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("agft")), *args], check=True)
    return round(time.perf_counter() - start, 1)


def cli_parser(default_out: str, cache_help: str) -> argparse.ArgumentParser:
    """The arguments every CLI benchmark takes: --out, the JSON it writes, and --cache-dir."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--cache-dir", help=cache_help)
    return parser


def output(path: str) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def store_args(tmp: str, cache_dir: str | None) -> list[str]:
    """The --set/--tracking-uri arguments that put a benchmark's caches (default: a fresh folder) and its MLflow
    store under tmp."""
    return ["--set", f"cache_dir={cache_dir or tmp + '/cache'}", "--tracking-uri", f"sqlite:///{tmp}/mlflow.db"]


def field(config: dict, key: str):
    """A config field of a loaded YAML by its dotted name, e.g. "train.lr"."""
    for part in key.split("."):
        config = config[part]
    return config


def sets(*overrides: str) -> list[str]:
    """--set FIELD=VALUE for each override."""
    return [arg for override in overrides for arg in ("--set", override)]
