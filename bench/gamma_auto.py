"""calibration.gamma: auto against the sweep it replaces, on the embedded default.

1. `agft sweep` over γ ∈ {0.2, 0.4, 0.7, 1.0} (1/τ as configured), scored on the validation split: K = 4
   fine-tunes; its choice is "the best γ found by agft sweep".
2. `agft compare` of AGFT at that γ over seeds 0-2, and of AGFT with calibration.gamma: auto.

Reports both tables' zero-shot means, the gap, γ auto's value and the seconds of each way of choosing γ
(the sweep's wall time; auto's calibration step, from the runs' timelines).

Usage: .venv/bin/python bench/gamma_auto.py [--out bench/results/gamma_auto.json] [--cache-dir DIR]
"""

import json
import os
import platform
import tempfile
from pathlib import Path

import yaml
from agft_cli import agft, cli_parser, output, sets, store_args
from mlflow.tracking import MlflowClient

GAMMAS = [0.2, 0.4, 0.7, 1.0]
SEEDS = [0, 1, 2]


def zero_shot_means(uri: str, parent: str) -> dict:
    """The compare's "zero-shot mean" row for AGFT (means over seeds), and the γ each run trained with."""
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    metrics = client.get_run(parent).data.metrics
    return {
        "clean": metrics["agft_clean/zero-shot_mean"],
        "robust": metrics["agft_robust/zero-shot_mean"],
        "gammas": [r.data.metrics.get("calibration_gamma", r.data.params["calibration.gamma"]) for r in runs],
    }


def calibration_seconds(uri: str, parent: str, tmp: str) -> list[float]:
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    seconds = []
    for run in runs:
        timeline = json.loads(Path(client.download_artifacts(run.info.run_id, "timeline.json", tmp)).read_text())
        seconds += [round(bar["end"] - bar["start"], 2) for bar in timeline if bar["step"] == "calibration"]
    return seconds


def main() -> None:
    cache_help = "reuse a cache (the teacher, earlier fine-tunes); default: a fresh one"
    args = cli_parser("bench/results/gamma_auto.json", cache_help).parse_args()
    out = output(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        common = store_args(tmp, args.cache_dir)
        best = Path(tmp) / "best.yaml"
        space = json.dumps({"calibration.gamma": {"grid": GAMMAS}})
        one_pass = sets(f"sweep.space={space}", "sweep.num_samples=1", "sweep.scheduler=fifo")
        sweep_seconds = agft("sweep", *common, *one_pass, "--best-out", str(best))
        chosen = yaml.safe_load(best.read_text())["calibration"]["gamma"]
        report = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "gammas": GAMMAS,
            "seeds": SEEDS,
            "sweep": {"seconds": sweep_seconds, "chosen_gamma": chosen},
        }
        client = MlflowClient(uri)
        for name, gamma in (("swept", chosen), ("auto", "auto")):
            table = out.with_name(f"{out.stem}_{name}.md")
            seconds = agft(
                "compare",
                *common,
                "--out",
                str(table),
                "--set",
                "compare.methods=[agft]",
                "--set",
                f"compare.seeds={json.dumps(SEEDS)}",
                "--set",
                f"calibration.gamma={gamma}",
            )
            experiment = client.get_experiment_by_name("agft").experiment_id
            (parent,) = client.search_runs(
                [experiment], "tags.kind = 'compare'", order_by=["start_time DESC"], max_results=1
            )
            report[name] = {
                "gamma": gamma,
                "compare_seconds": seconds,
                "table": table.read_text(),
                **zero_shot_means(uri, parent.info.run_id),
            }
            if gamma == "auto":
                report[name]["calibration_seconds"] = calibration_seconds(uri, parent.info.run_id, tmp)
            print(f"{name} (γ = {gamma}): {report[name]['clean']:.4f} / {report[name]['robust']:.4f}", flush=True)
        report["robust_gap_points"] = round(100 * (report["swept"]["robust"] - report["auto"]["robust"]), 2)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
