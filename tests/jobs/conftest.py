"""Shared fixtures for the orchestrator's tests: the demo zoo (the session's local Ray,
``ray_local``, is in ``tests/conftest.py``: tests/real uses it too)."""

from __future__ import annotations

import json
import os
import shutil

import pytest


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
