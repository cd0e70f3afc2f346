"""Wall time of `agft compare` on the embedded default, from a cold cache (teacher pretraining included).

Usage: .venv/bin/python bench/compare_budget.py [--set compare.methods=[tecoa,agft]] [--out bench/results/compare.json]
                                                 [--keep-cache DIR]
Writes the JSON (wall time, the command, the per-seed numbers) and the markdown table next to it.
--keep-cache DIR builds the caches in DIR, which must not exist yet (the run stays cold), and keeps them.
"""

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/compare.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--keep-cache", type=Path, help="a new directory to build and keep the caches in")
    args = parser.parse_args()
    agft = Path(sys.executable).with_name("agft")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = out.with_suffix(".md")
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        if args.keep_cache:
            args.keep_cache.mkdir(parents=True)  # fails if it exists: a cache there would make the run warm
        cache = args.keep_cache or f"{tmp}/cache"
        cmd = [str(agft), "compare", "--set", f"cache_dir={cache}", "--tracking-uri", uri, "--out", str(table)]
        for o in args.overrides:
            cmd += ["--set", o]
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - start
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        (parent,) = client.search_runs([client.get_experiment_by_name("agft").experiment_id], "tags.kind = 'compare'")
        per_seed = Path(client.download_artifacts(parent.info.run_id, "compare_per_seed.csv", tmp))
        rows = list(csv.DictReader(per_seed.open()))
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "command": "agft compare " + " ".join(f"--set {o}" for o in args.overrides),
        "wall_seconds": round(wall, 1),
        "table": str(table),
        "per_seed": rows,
    }
    out.write_text(json.dumps(report, indent=2))
    print(f"compare: {wall:.1f}s; wrote {out} and {table}")


if __name__ == "__main__":
    main()
