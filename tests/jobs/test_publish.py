"""Artifact folders in a local DEST: first writer wins, --force replaces atomically, a record counts
only while its files check out, and the start-of-run sweep spares live writers. No Ray."""

from __future__ import annotations

import os
import time

from jobs import layout
from jobs.publish import files_intact, files_present, intact_record, publish_dir, stored_files
from jobs.store import Store


def _folder(tmp_path, name: str, payload: bytes) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model.pt").write_bytes(payload)
    (folder / "recipe.json").write_bytes(b"{}")
    return str(folder)


def test_the_first_writer_wins_and_the_second_describes_what_is_stored(tmp_path):
    store = Store(str(tmp_path / "dest"))
    rel = layout.artifact_dir("m", "int8", "k" * 24)
    assert publish_dir(store, _folder(tmp_path, "a", b"first"), rel) == []
    kept = publish_dir(store, _folder(tmp_path, "b", b"second!"), rel)
    assert kept == ["model.pt", "recipe.json"]
    assert store.read_bytes(f"{rel}/model.pt") == b"first"
    assert {f["path"]: f["bytes"] for f in stored_files(store, rel, kept)} == {
        "model.pt": 5, "recipe.json": 2}


def test_replace_swaps_the_whole_folder_and_leaves_no_temporary(tmp_path):
    store = Store(str(tmp_path / "dest"))
    rel = layout.artifact_dir("m", "fp16", "k" * 24)
    publish_dir(store, _folder(tmp_path, "a", b"damaged"), rel)
    (tmp_path / "dest" / rel / "stale.txt").write_bytes(b"only in the old folder")
    assert publish_dir(store, _folder(tmp_path, "b", b"fresh"), rel, replace=True) == []
    assert sorted(os.listdir(tmp_path / "dest" / rel)) == ["model.pt", "recipe.json"]
    assert store.read_bytes(f"{rel}/model.pt") == b"fresh"
    leftovers = [p for p in (tmp_path / "dest").rglob("*") if p.name.startswith(".tmp")]
    assert leftovers == []


def test_a_record_counts_only_while_its_files_are_intact(tmp_path):
    store = Store(str(tmp_path / "dest"))
    key = "k" * 24
    rel = layout.artifact_dir("m", "int8", key)
    publish_dir(store, _folder(tmp_path, "a", b"weights"), rel)
    files = stored_files(store, rel)
    store.write_json(layout.record_path("m", "int8", key),
                     {"status": "ok", "key": key, "files": files})
    assert intact_record(store, "m", "int8", key)["files"] == files
    assert files_present(store, rel, files) and files_intact(store, rel, files)
    (tmp_path / "dest" / rel / "model.pt").write_bytes(b"weighTs")      # same size, one byte
    assert files_present(store, rel, files) and not files_intact(store, rel, files)
    assert intact_record(store, "m", "int8", key) is None
    (tmp_path / "dest" / rel / "recipe.json").unlink()
    assert not files_present(store, rel, files)
    assert intact_record(store, "m", "int8", "z" * 24) is None           # no record at all


def test_the_sweep_deletes_only_temporaries_nobody_touched_for_a_while(tmp_path):
    store = Store(str(tmp_path / "dest"))
    base = tmp_path / "dest" / "artifacts" / "m" / "int8"
    fresh, stale = base / ".tmp-fresh-k", base / ".tmp-stale-k"
    for folder in (fresh, stale):
        folder.mkdir(parents=True)
        (folder / "model.pt").write_bytes(b"...")
    old = time.time() - 10_000
    for path in (stale / "model.pt", stale):
        os.utime(path, (old, old))
    os.utime(fresh, (old, old))         # an old folder still being written into is live
    assert store.sweep_temporaries() == 1
    assert fresh.exists() and not stale.exists()
