"""Where the test suite's CPU time goes, by kind of process: Ray task workers, Ray Train's actors, `agft` drivers,
MLflow servers, Ray's own daemons. On the 2-core CI machine the suite keeps both cores busy, so its wall time follows
its CPU-seconds, and this says which processes to make fewer or cheaper.

Runs a command (by default `make test`, what CI runs: lint, then the suite), reads every new process's CPU time
from /proc once a second, and writes the totals per kind to JSON. A process that lives under a second is missed;
the totals are what the kernel charged each process seen (user + system), so they hold whatever else the machine
did meanwhile.

    .venv/bin/python bench/suite_cpu.py                      # -> bench/results/suite_cpu.json
    .venv/bin/python bench/suite_cpu.py -- .venv/bin/python -m pytest tests/test_e2e.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

SUITE = ["make", "--no-print-directory", "test"]  # the Makefile's pytest options, not a copy of them
TICK = os.sysconf("SC_CLK_TCK")

# (substring of the command line, kind), first match wins; Ray workers name themselves `ray::<task or actor>`
KINDS = [
    ("strace", "strace"),
    ("bin/agft ", "agft driver"),
    ("exec(eval(sys.stdin", "pytest worker"),
    ("-m pytest", "pytest"),
    ("ruff", "ruff"),
    ("gcs_server", "ray gcs"),
    ("raylet", "ray raylet"),
    ("dashboard", "ray dashboard"),
    ("monitor", "ray monitors"),
    ("runtime_env", "ray runtime env agent"),
    ("huey", "mlflow server jobs"),
    ("_job_runner", "mlflow server jobs"),
    ("mlflow server", "mlflow server"),
    ("uvicorn", "mlflow server"),
    ("mlflow models serve", "mlflow models serve"),
    ("postgres", "postgres"),
    ("chrom", "chromium"),
    ("bin/ray ", "ray cli"),
]


def kind(cmdline: str) -> str:
    if cmdline.startswith("ray::"):
        return cmdline.split()[0]
    return next((name for part, name in KINDS if part in cmdline), "other")


def _cpu_and_cmdline(pid: str) -> tuple[float, str]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    with open(f"/proc/{pid}/cmdline") as f:
        cmdline = f.read().replace("\0", " ").strip()
    return (int(fields[11]) + int(fields[12])) / TICK, cmdline


def measure(command: list[str]) -> dict:
    before = set(os.listdir("/proc"))
    cpu: dict[str, float] = {}
    names: dict[str, str] = {}
    start = time.time()
    proc = subprocess.Popen(command)
    while True:
        done = proc.poll() is not None
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or pid in before:
                continue
            try:
                seconds, cmdline = _cpu_and_cmdline(pid)
            except (OSError, IndexError):  # gone meanwhile
                continue
            cpu[pid] = max(cpu.get(pid, 0.0), seconds)
            if cmdline.startswith("ray::") or pid not in names:  # a Ray worker renames itself once it has work
                names[pid] = cmdline
        if done:
            break
        time.sleep(1)
    totals, counts = Counter(), Counter()
    for pid, seconds in cpu.items():
        name = kind(names[pid])
        totals[name] += seconds
        counts[name] += 1
    return {
        "command": command,
        "returncode": proc.returncode,
        "wall_s": round(time.time() - start, 1),
        "cpu_s": round(sum(totals.values()), 1),
        "by_kind": {k: {"cpu_s": round(v, 1), "processes": counts[k]} for k, v in totals.most_common()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/suite_cpu.json"))
    parser.add_argument("command", nargs="*", help="what to run (after --); the test suite by default")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"commit": commit, "date": time.strftime("%Y-%m-%d"), **measure(args.command or SUITE)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, row in result["by_kind"].items():
        print(f"{row['cpu_s']:8.0f} CPU-s {row['processes']:4d} processes  {name}")
    print(f"{result['cpu_s']:8.0f} CPU-s in {result['wall_s']:.0f} s, exit code {result['returncode']}")
    sys.exit(result["returncode"])


if __name__ == "__main__":
    main()
