"""Fixtures shared by every test folder: one local Ray per session (tests/jobs and tests/real
both convert through it; a second ``ray.init`` in the same session would fail)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs) for the whole session; stopped at the end."""
    import ray

    # address="local": always a new Ray, never one that another process registered on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    yield ray
    ray.shutdown()
