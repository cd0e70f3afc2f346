"""The embedded benchmark with every method tuned alike: `agft sweep` over each method's own key
hyperparameters (the same number of trials each, scored on the validation split), then `agft compare` of
the tuned methods over 3 seeds, each method at its best values (compare.per_method).

Usage: .venv/bin/python bench/tuned_compare.py [--out bench/results/tuned_compare.json] [--cache-dir DIR]
                                                [--reuse EARLIER.json]
Writes the JSON (the search spaces, each sweep's trials and choice, wall times) and the table next to it.
--reuse takes the choices of the methods an earlier run of this script swept, and sweeps only the others.
"""

import json
import os
import platform
import tempfile
from pathlib import Path

import yaml
from agft_cli import agft, cli_parser, field, output, sets, store_args

# Four trials per method: what each method's authors or the paper name as its knobs.
SPACES = {
    "agft": {"calibration.gamma": {"grid": [0.4, 1.0]}, "calibration.inv_tau": {"grid": [15, 30]}},
    "tecoa": {"train.lr": {"grid": [1.0e-4, 2.0e-4, 5.0e-4, 1.0e-3]}},
    "fare": {"train.lr": {"grid": [2.0e-4, 5.0e-4]}, "train.attack.eps": {"grid": ["2/255", "4/255"]}},
    # Like TeCoA, cross-entropy methods with the authors' loss weights (train.pmg_aft, train.tga_zsr): the lr.
    "pmg_aft": {"train.lr": {"grid": [1.0e-4, 2.0e-4, 5.0e-4, 1.0e-3]}},
    "tga_zsr": {"train.lr": {"grid": [1.0e-4, 2.0e-4, 5.0e-4, 1.0e-3]}},
}
SEEDS = [0, 1, 2]


def main() -> None:
    parser = cli_parser("bench/results/tuned_compare.json", "reuse a cache (the teacher); default: a fresh one")
    parser.add_argument("--reuse", help="an earlier result of this script: its sweeps' choices are kept")
    args = parser.parse_args()
    out = output(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        common = store_args(tmp, args.cache_dir)
        report = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "spaces": SPACES,
            "seeds": SEEDS,
            "sweeps": json.loads(Path(args.reuse).read_text())["sweeps"] if args.reuse else {},
        }
        tuned = {method: sweep["chosen"] for method, sweep in report["sweeps"].items()}
        for method, space in SPACES.items():
            if method in tuned:
                continue
            best = Path(tmp) / f"best-{method}.yaml"
            one_pass = sets(f"sweep.space={json.dumps(space)}", "sweep.num_samples=1", "sweep.scheduler=fifo")
            seconds = agft("sweep", *common, *sets(f"train.method={method}"), *one_pass, "--best-out", str(best))
            chosen = yaml.safe_load(best.read_text())
            tuned[method] = {key: field(chosen, key) for key in space}
            report["sweeps"][method] = {"seconds": seconds, "chosen": tuned[method]}
            out.write_text(json.dumps(report, indent=2))  # a long run keeps each sweep's result
            print(f"sweep {method}: {tuned[method]} in {seconds}s", flush=True)
        table = out.with_suffix(".md")
        report["compare_seconds"] = agft(
            "compare",
            *common,
            "--out",
            str(table),
            "--set",
            f"compare.methods={json.dumps(list(SPACES))}",
            "--set",
            f"compare.seeds={json.dumps(SEEDS)}",
            "--set",
            f"compare.per_method={json.dumps(tuned)}",
        )
        report["table"] = table.read_text()
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out} and {table}")


if __name__ == "__main__":
    main()
