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


def assert_resumed(rows: list[dict], finished: set, recorded: set, total: int) -> None:
    """The summary ``rows`` of the run after a SIGKILLed one: of the rows whose artifacts were
    there at the kill (``finished``), those the killed run recorded are up to date and the rest
    are adopted as interrupted; so is any row one of its tasks published after the kill (Ray ends
    a dead driver's tasks a moment later). Only the other rows are converted, all ``total`` of them."""
    by_key = {(r["name"], r["precision"]): r for r in rows}
    assert {r["status"] for r in rows} <= {"ok", "skipped"}
    for key in finished:
        assert by_key[key]["status"] == "skipped", by_key[key]
        assert ("up to date" if key in recorded else "interrupted") in by_key[key]["reason"]
    late = {k for k, r in by_key.items() if r["status"] == "skipped"} - finished
    for key in late:
        assert "interrupted" in by_key[key]["reason"], by_key[key]
    assert sum(r["status"] == "ok" for r in rows) == total - len(finished) - len(late)
