"""Which files a process and its children opened, seen by the kernel: `strace` on the open system calls.

Python's audit hooks miss what native code opens (safetensors, pyarrow), so the driver's reads are
checked here, below every library.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

OPENED = re.compile(r'open(?:at2?)?\((?:AT_FDCWD, )?"([^"]+)"')


OPEN_CALLS, STAT_CALLS = "open,openat,openat2", "stat,lstat,newfstatat,statx"
STATTED = re.compile(r'(?:stat|statx|newfstatat)\((?:AT_FDCWD, )?"([^"]+)"')


def traced(command: list[str], log: Path, calls: str = OPEN_CALLS, paths: list[str] = ()) -> list[str]:
    """`command` under strace, every system call of `calls` it and its children make written to `log`; with
    `paths`, only the calls on those paths. (Without, strace decodes and writes every one: a run's imports stat
    about 860 000 times, a 98 MB log, and the stat-counting test took 11 CPU-s more.)"""
    strace = shutil.which("strace")
    assert strace, "the file-access tests need strace (.ci/run installs it)"
    only = [arg for path in paths for arg in ("-P", path)]
    return [strace, "-f", "-qq", "--seccomp-bpf", "-e", f"trace={calls}", *only, "-o", str(log), *command]


def stats_under(log: Path, root: Path) -> dict[str, int]:
    """How often each path under `root` was stat'ed in a log of STAT_CALLS."""
    counts: dict[str, int] = {}
    prefix = os.path.realpath(root) + os.sep
    for line in log.read_text().splitlines():
        match = STATTED.search(line)
        if match and os.path.realpath(match.group(1)).startswith(prefix):
            counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


def opened_under(log: Path, roots: list[Path]) -> list[str]:
    """The opens in `log` of a path under any of `roots` (a file root: that file), symlinks resolved. The
    config names them by absolute path, so the pipeline opens them by absolute path; an open relative to a
    directory descriptor (openat(fd, name), as os.fwalk does) is not matched."""
    roots = {form for r in roots for form in (os.path.abspath(r), os.path.realpath(r))}
    hits = []
    for line in log.read_text().splitlines():
        match = OPENED.search(line)
        if match and any(
            path == r or path.startswith(r + os.sep)
            for path in {match.group(1), os.path.realpath(match.group(1))}
            for r in roots
        ):
            hits.append(line)
    return hits
