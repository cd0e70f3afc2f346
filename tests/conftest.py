import os
import sys

import pytest

from pipeline.cli import _skip_ray_noise, local_ray_options

# Keep Ray and torch polite on a 2-core machine.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Every Ray these tests start (in process, `agft` subprocesses, `ray start` nodes) keeps its idle task workers,
# torch and open_clip already imported, for the next stage: by default a 2-CPU node keeps 2 and kills the
# others after 1 s idle, so each run's tasks paid the imports again (~5 s of CPU a process).
os.environ.setdefault("RAY_num_workers_soft_limit", "8")
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "600000")
# No test reads Ray's metrics: a node's reporter agent polls every Ray process's stats every 5 s (here 60 s) and each
# process exports metrics (here off): an idle Ray with 8 pooled workers cost 7-9 CPU-s a minute instead of 12-19.
os.environ.setdefault("REPORTER_UPDATE_INTERVAL_MS", "60000")
os.environ.setdefault("RAY_enable_metrics_collection", "0")
# A node's log monitor lists its log directory for new worker logs every 0.1 s while it holds under 1 000 files
# (Ray's threshold for "many"), every 0.5 s above; at 0.5 s an idle local Ray's monitors took 1.8 CPU-s in 100 s
# instead of 2.7 (2026-12-07). A new worker's first lines reach the driver up to 0.4 s later.
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
# Torch computes on one thread in the test processes, as it does in Ray's workers: two pytest workers already share
# the 2 cores, and torch's second thread made an in-process AutoAttack test 10.1 -> 15.8 CPU-s at the same wall time
# (2026-12-07). Tasks that are granted more CPUs still use them (tasks/common.py sets their threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")
_skip_ray_noise()  # the console as `agft` keeps it: set before Ray is imported


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray in this process, started (by the hook below) before the first test that asks for it or for a
    fixture built on it, and stopped before a `slow` test that does not: those start Rays and servers of their own
    for minutes, beside which an idle local Ray with its pooled workers burnt 5-9 CPU-seconds a minute on this
    2-core machine (2026-12-06). Between quick tests it stays up: a restart costs its workers' imports again."""
    import ray

    return ray


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures are built
def pytest_runtest_setup(item):
    if "ray_local" in item.fixturenames:
        import ray

        if not ray.is_initialized():
            ray.init(num_cpus=2, logging_level="WARNING", **local_ray_options())


@pytest.hookimpl(trylast=True)  # after the test's fixtures are torn down
def pytest_runtest_teardown(item, nextitem):
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    if nextitem is None or ("ray_local" not in nextitem.fixturenames and nextitem.get_closest_marker("slow")):
        ray.shutdown()


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group markers
def pytest_collection_modifyitems(config, items):
    """How `make test` spreads the suite over its pytest-xdist workers (--dist loadgroup). A test that shares a
    module-scoped fixture runs in its module's group, so the fixture is built once; any other test may run on any
    worker. Groups holding a `slow` test go first, so that the longest work starts at once and the short tests
    fill in around it."""
    group_of = {}
    for item in items:
        shared = any(d.scope not in ("function", "session") for defs in _fixture_defs(item) for d in defs)
        group_of[item.nodeid] = item.module.__name__ if shared else item.nodeid
        if shared:
            item.add_marker(pytest.mark.xdist_group(group_of[item.nodeid]))
    slow = {group_of[i.nodeid] for i in items if i.get_closest_marker("slow")}
    items.sort(key=lambda i: group_of[i.nodeid] not in slow)  # stable: a module's group stays in one piece


def _fixture_defs(item):
    info = getattr(item, "_fixtureinfo", None)  # doctest items and the like have none
    return info.name2fixturedefs.values() if info else ()
