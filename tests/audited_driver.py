"""`agft` as a job's driver under audit: a Python audit hook refuses, and logs, every open or listing of
a guarded path (the dataset root, the weights file). The job then fails if its driver reads data.

Usage: python tests/audited_driver.py AUDIT_LOG GUARDED[:GUARDED...] -- agft-args...
"""
import os
import sys

import torch  # noqa: F401 - loaded before the hook: torch's MKL aborts the process when it loads under one
from pipeline.cli import main

READS = {"open", "os.listdir", "os.scandir"}


def guard(audit_log: str, guarded: list[str]) -> None:
    def hook(event: str, args: tuple) -> None:
        if event not in READS or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        try:
            path = os.path.abspath(os.fsdecode(args[0]))
        except FileNotFoundError:  # relative to a working directory that is gone, so under no guarded root
            return
        if any(path == g or path.startswith(g + os.sep) for g in guarded):
            with open(audit_log, "a") as log:  # not guarded: no recursion
                log.write(f"{os.getpid()} {event} {path}\n")
            raise PermissionError(f"the driver read {path}")

    sys.addaudithook(hook)


if __name__ == "__main__":
    log_path, paths, separator, *agft_args = sys.argv[1:]
    assert separator == "--", __doc__
    guard(log_path, [os.path.abspath(p) for p in paths.split(os.pathsep)])
    sys.exit(main(agft_args))
