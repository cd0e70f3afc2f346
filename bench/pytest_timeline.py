"""A pytest plugin for bench/suite_cpu.py --by-test: each test's start and end, and the process (the xdist
worker) that ran it, one JSON line per test appended to $AGFT_TIMELINE_OUT."""

import json
import os
import time

_started: dict[str, float] = {}
_echoes = False  # in xdist's controller, which only echoes its workers' hooks: the workers write their own lines


def pytest_configure(config):
    global _echoes
    _echoes = bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")


def pytest_runtest_logstart(nodeid, location):
    _started[nodeid] = time.time()


def pytest_runtest_logfinish(nodeid, location):
    if _echoes:
        return
    line = {"test": nodeid, "pid": os.getpid(), "start": _started.pop(nodeid, None), "end": time.time()}
    with open(os.environ["AGFT_TIMELINE_OUT"], "a") as out:
        out.write(json.dumps(line) + "\n")
