import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import test modules by name

from distributed import PoolRegistry  # noqa: E402


@pytest.fixture(scope="session")
def run_distributed():
    """``run_distributed(world_size, fn, *args, timeout=...)`` → list of per-rank results.

    ``fn(rank, world_size, *args)`` must be a module-level function of a test module.
    """
    registry = PoolRegistry()
    yield registry
    registry.close()
