import os

import pytest

from pipeline.cli import _skip_ray_noise

# Keep Ray and torch polite on a 2-core machine.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
_skip_ray_noise()  # the console as `agft` keeps it: set before Ray is imported


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=2, logging_level="WARNING")
    yield ray
    ray.shutdown()
