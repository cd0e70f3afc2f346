"""Sweep overhead: K Tune trials against K times the train-only time of one trial.

Usage: .venv/bin/python bench/sweep_budget.py [--trials 4] [--out bench/results/sweep_budget.json]

1. builds the text and teacher caches once (forced rebuild, timed);
2. times one plain Ray Train fine-tune of the base config (`fit`, trainer start-up included);
3. times `sweep` over K random (γ, 1/τ) trials with the FIFO scheduler, so every trial
   runs every epoch and the ratio measures overhead, not early stopping.
Reports ratio = sweep seconds / (K × train-only seconds); the budget is ≤ 1.05.
"""
import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import ray

from pipeline import tracking
from pipeline.config import load_config
from pipeline.dag import Pipeline
from pipeline.sweep import sweep
from pipeline.train import fit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--config", default=None)
    parser.add_argument("--out", default="bench/results/sweep_budget.json")
    args = parser.parse_args()
    ray.init(logging_level="WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        cfg = load_config(args.config, [f"sweep.num_samples={args.trials}", "sweep.scheduler=fifo"])

        Pipeline(cfg, uri, log=print).teacher_weights()  # the embedded teacher, if not cached yet: not timed
        start = time.perf_counter()
        inputs = Pipeline(cfg, uri, rerun={"text", "teacher"}, log=print).prepare_training(run_id="")
        cache_build = time.perf_counter() - start

        run_id = tracking.start_run(uri, cfg.experiment, {}, {"bench": "train-only"})
        start = time.perf_counter()
        fit(replace(inputs, run_id=run_id), f"{tmp}/train_only", "train-only")
        train_only = time.perf_counter() - start

        start = time.perf_counter()
        result = sweep(cfg, uri, Path(tmp) / "best.yaml", log=print)
        sweep_seconds = time.perf_counter() - start

    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "trials": args.trials, "epochs_per_trial": cfg.train.epochs,
        "cache_build_seconds": round(cache_build, 1), "train_only_seconds": round(train_only, 1),
        "sweep_seconds": round(sweep_seconds, 1),
        "ratio_sweep_to_k_train_only": round(sweep_seconds / (args.trials * train_only), 3),
        "sweep_cache_hits": result.cache_hits, "trials_table": result.trials,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({k: v for k, v in report.items() if k != "trials_table"}, indent=2, default=str))


if __name__ == "__main__":
    main()
