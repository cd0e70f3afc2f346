"""Where the test suite's CPU time goes, by kind of process: Ray task workers, Ray Train's actors, `agft` drivers,
MLflow servers, Ray's own daemons. On the 2-core CI machine the suite keeps both cores busy, so its wall time follows
its CPU-seconds, and this says which processes to make fewer or cheaper.

Runs a command (by default `make test`, what CI runs: lint, then the suite), reads every new process's CPU time
from /proc once a second, and writes the totals per kind to JSON. A process that lives under a second is missed;
the totals are what the kernel charged each process seen (user + system), so they hold whatever else the machine
did meanwhile.

    .venv/bin/python bench/suite_cpu.py                      # -> bench/results/suite_cpu.json
    .venv/bin/python bench/suite_cpu.py --by-test            # and each test's CPU-seconds
    .venv/bin/python bench/suite_cpu.py -- .venv/bin/python -m pytest tests/test_e2e.py

--by-test loads bench/pytest_timeline.py into pytest and charges each second's CPU of a process to the test that
its pytest worker was running then, following parent processes up to that worker (Ray workers, Ray Train's actors,
the nodes of a test's own cluster, an `agft` subprocess and what it starts; the session's local Ray and the worker
itself between tests too).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
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


def _boot_time() -> float:
    with open("/proc/stat") as f:
        return next(float(line.split()[1]) for line in f if line.startswith("btime"))


BOOT = _boot_time()


def _read(pid: str) -> tuple[float, str, int, float]:
    """A process's CPU-seconds so far, command line, parent and start time (epoch seconds)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    with open(f"/proc/{pid}/cmdline") as f:
        cmdline = f.read().replace("\0", " ").strip()
    return (int(fields[11]) + int(fields[12])) / TICK, cmdline, int(fields[1]), BOOT + int(fields[19]) / TICK


def measure(command: list[str], env: dict | None = None) -> tuple[dict, dict[str, dict]]:
    """The totals by kind, and what was seen of each process: cpu_s, cmdline, ppid, start and its CPU-seconds
    by second (time, seconds since the last look)."""
    before = set(os.listdir("/proc"))
    seen: dict[str, dict] = {}
    start = time.time()
    proc = subprocess.Popen(command, env=env)
    while True:
        done = proc.poll() is not None
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or pid in before:
                continue
            try:
                seconds, cmdline, ppid, started = _read(pid)
            except (OSError, IndexError):  # gone meanwhile
                continue
            known = seen.setdefault(
                pid, {"cpu_s": 0.0, "cmdline": cmdline, "ppid": ppid, "start": started, "ticks": []}
            )
            if seconds > known["cpu_s"]:
                known["ticks"].append((time.time(), seconds - known["cpu_s"]))
                known["cpu_s"] = seconds
            if cmdline.startswith("ray::"):  # a Ray worker renames itself once it has work
                known["cmdline"] = cmdline
        if done:
            break
        time.sleep(1)
    totals, counts = Counter(), Counter()
    for process in seen.values():
        name = kind(process["cmdline"])
        totals[name] += process["cpu_s"]
        counts[name] += 1
    result = {
        "command": command,
        "returncode": proc.returncode,
        "wall_s": round(time.time() - start, 1),
        "cpu_s": round(sum(totals.values()), 1),
        "by_kind": {k: {"cpu_s": round(v, 1), "processes": counts[k]} for k, v in totals.most_common()},
    }
    return result, seen


def by_test(seen: dict[str, dict], timeline: list[dict]) -> dict[str, dict]:
    """Each process's CPU-seconds charged to the tests its pytest worker ran meanwhile (see the docstring), in all
    and by kind of process; "(outside any test)" for the rest: collection, lint, a process whose chain of parents
    was not seen."""
    runs: dict[int, list[dict]] = {}
    for test in timeline:
        runs.setdefault(test["pid"], []).append(test)
    charged: dict[str, Counter] = {}
    for pid, process in seen.items():
        worker = int(pid)
        while worker not in runs and str(worker) in seen:
            worker = seen[str(worker)]["ppid"]
        for moment, seconds in process["ticks"]:
            test = next((t["test"] for t in runs.get(worker, ()) if t["start"] <= moment <= t["end"]), None)
            charged.setdefault(test or "(outside any test)", Counter())[kind(process["cmdline"])] += seconds
    totals = sorted(charged, key=lambda test: -sum(charged[test].values()))
    when = {t["test"]: t for t in timeline}
    workers = sorted(runs)
    return {
        test: {
            "cpu_s": round(sum(charged[test].values()), 1),
            **_when(when.get(test), workers),
            "by_kind": {name: round(seconds, 1) for name, seconds in charged[test].most_common() if seconds >= 0.5},
        }
        for test in totals
    }


def _when(test: dict | None, workers: list[int]) -> dict:
    """Which pytest worker ran the test (0, 1, ...), and when (epoch seconds): the tail of the suite, where one
    worker runs alone, shows in these."""
    if test is None or test["start"] is None:
        return {}
    return {
        "worker": workers.index(test["pid"]),
        "start": round(test["start"], 1),
        "wall_s": round(test["end"] - test["start"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/suite_cpu.json"))
    parser.add_argument("--by-test", action="store_true", help="also each test's CPU-seconds (pytest commands)")
    parser.add_argument("command", nargs="*", help="what to run (after --); the test suite by default")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    env = None
    with tempfile.TemporaryDirectory() as scratch:
        timeline = Path(scratch) / "timeline.jsonl"
        if args.by_test:
            timeline.touch()
            bench = str(Path(__file__).resolve().parent)
            plugin = f"{os.environ.get('PYTEST_ADDOPTS', '')} -p pytest_timeline".strip()
            path = os.pathsep.join(filter(None, [bench, os.environ.get("PYTHONPATH")]))
            env = {**os.environ, "PYTEST_ADDOPTS": plugin, "PYTHONPATH": path, "AGFT_TIMELINE_OUT": str(timeline)}
        measured, seen = measure(args.command or SUITE, env)
        result = {"commit": commit, "date": time.strftime("%Y-%m-%d"), **measured}
        if args.by_test:
            result["by_test"] = by_test(seen, [json.loads(line) for line in timeline.read_text().splitlines()])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, row in result["by_kind"].items():
        print(f"{row['cpu_s']:8.0f} CPU-s {row['processes']:4d} processes  {name}")
    for test, row in list(result.get("by_test", {}).items())[:25]:
        print(f"{row['cpu_s']:8.0f} CPU-s  {test}")
    print(f"{result['cpu_s']:8.0f} CPU-s in {result['wall_s']:.0f} s, exit code {result['returncode']}")
    sys.exit(result["returncode"])


if __name__ == "__main__":
    main()
