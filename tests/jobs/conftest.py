"""Shared fixtures for the orchestrator's tests: one local Ray per session, the demo zoo."""

from __future__ import annotations

import json
import os
import shutil

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


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The bundled demo zoo, built (trained) once per session."""
    from jobs.demo.build import build_demo

    dest = tmp_path_factory.mktemp("demo")
    build_demo(str(dest), verbose=False)
    return dest


@pytest.fixture
def demo_copy(demo_dir, tmp_path):
    """A private copy of the demo zoo folder, for tests that change checkpoints."""
    dest = tmp_path / "zoo"
    shutil.copytree(demo_dir, dest)
    return dest


def read_manifest(out) -> dict:
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


def rows_by_key(out) -> dict[tuple[str, str], dict]:
    return {(r["name"], r["precision"]): r for r in read_manifest(out)["rows"]}
