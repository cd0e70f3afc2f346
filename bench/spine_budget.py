"""Wall time of `agft run` on the embedded default: cold, warm caches, and warm caches with training rerun.

Usage: .venv/bin/python bench/spine_budget.py [--out bench/results/spine_budget.json]
Each run is a fresh `agft` process (Ray start-up included) against a fresh cache and MLflow store.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = {"cold": [], "warm": [], "warm_retrain": ["--rerun", "train"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/spine_budget.json")
    parser.add_argument("--config", default=None)
    args = parser.parse_args()
    agft = Path(sys.executable).with_name("agft")
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in RUNS.items():
            summary = Path(tmp) / f"{name}.json"
            cmd = [str(agft), "run", "--set", f"cache_dir={tmp}/cache", "--tracking-uri",
                   f"sqlite:///{tmp}/mlflow.db", "--summary", str(summary), *extra]
            if args.config:
                cmd += ["--config", args.config]
            start = time.perf_counter()
            subprocess.run(cmd, check=True)
            wall = time.perf_counter() - start
            report["runs"][name] = {"wall_seconds": round(wall, 1), **json.loads(summary.read_text())}
            print(f"{name}: {wall:.1f}s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
