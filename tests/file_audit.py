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


def traced(command: list[str], log: Path) -> list[str]:
    """`command` under strace, every open it and its children make written to `log`."""
    strace = shutil.which("strace")
    assert strace, "the driver-read test needs strace (.ci/run installs it)"
    return [strace, "-f", "-qq", "--seccomp-bpf", "-e", "trace=open,openat,openat2", "-o", str(log), *command]


def opened_under(log: Path, roots: list[Path]) -> list[str]:
    """The opens in `log` of a path under any of `roots` (a file root: that file), symlinks resolved. The
    config names them by absolute path, so the pipeline opens them by absolute path; an open relative to a
    directory descriptor (openat(fd, name), as os.fwalk does) is not matched."""
    roots = {form for r in roots for form in (os.path.abspath(r), os.path.realpath(r))}
    hits = []
    for line in log.read_text().splitlines():
        match = OPENED.search(line)
        if match and any(path == r or path.startswith(r + os.sep)
                         for path in {match.group(1), os.path.realpath(match.group(1))} for r in roots):
            hits.append(line)
    return hits
