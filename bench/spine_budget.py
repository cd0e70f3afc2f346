"""Wall time of `agft run` on the embedded default: cold, warm caches, and warm caches with training rerun.

Usage: .venv/bin/python bench/spine_budget.py [--out bench/results/spine_budget.json] [--base-tree DIR]
Each run is a fresh `agft` process (Ray start-up included) against a fresh cache and MLflow store.
--base-tree DIR first runs `agft run` cold from the sources in DIR (a checkout of the commit before a
change), from DIR and with DIR on PYTHONPATH: Ray puts the driver's working directory ahead of PYTHONPATH
on its workers' sys.path, so from another checkout the workers would import that checkout's agft_core.
It reports this tree's cold time as a ratio to it: both measured side by side in one run.
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


def timed_run(tmp: Path, name: str, extra: list[str], config: str | None, tree: str | None = None) -> dict:
    summary = tmp / f"{name}.json"
    cmd = [
        str(Path(sys.executable).with_name("agft")),
        "run",
        "--set",
        f"cache_dir={tmp}/cache",
        "--tracking-uri",
        f"sqlite:///{tmp}/mlflow.db",
        "--summary",
        str(summary),
        *extra,
    ]
    if config:
        cmd += ["--config", config]
    start = time.perf_counter()
    env = (
        os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [tree, os.environ.get("PYTHONPATH")]))}
        if tree
        else None
    )
    subprocess.run(cmd, check=True, env=env, cwd=tree)
    wall = time.perf_counter() - start
    print(f"{name}: {wall:.1f}s", flush=True)
    return {"wall_seconds": round(wall, 1), **json.loads(summary.read_text())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/spine_budget.json")
    parser.add_argument("--config", default=None)
    parser.add_argument("--base-tree", help="sources of the commit before the change, run cold first")
    args = parser.parse_args()
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "runs": {}}
    if args.base_tree:
        with tempfile.TemporaryDirectory() as tmp:
            report["runs"]["cold_base"] = timed_run(
                Path(tmp), "cold_base", [], args.config, str(Path(args.base_tree).resolve())
            )
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in RUNS.items():
            report["runs"][name] = timed_run(Path(tmp), name, extra, args.config)
    if args.base_tree:
        report["cold_ratio_to_base"] = round(
            report["runs"]["cold"]["wall_seconds"] / report["runs"]["cold_base"]["wall_seconds"], 3
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
