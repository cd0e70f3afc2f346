"""How the benchmarks run the `agft` CLI: as a user does, one fresh process per command, timed."""

import subprocess
import sys
import time
from pathlib import Path


def agft(*args: str) -> float:
    """Runs `agft ARGS` from this virtual environment and returns its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("agft")), *args], check=True)
    return round(time.perf_counter() - start, 1)
