"""The local store's atomic writes: a write that fails part-way leaves nothing behind."""

from __future__ import annotations

import errno
import os

import pytest

from jobs.store import Store, StoreError


def test_failed_write_leaves_no_temporary_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    store.write_bytes("manifest.json", b'{"old": true}')
    real_put = Store._put

    def put_then_fill_the_disk(self, path, data):
        real_put(self, path, data[: len(data) // 2])     # half the bytes reach the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Store, "_put", put_then_fill_the_disk)
    with pytest.raises(StoreError, match="No space left"):
        store.write_bytes("manifest.json", b'{"new": true, "padding": "' + b"x" * 1000 + b'"}')
    assert sorted(os.listdir(tmp_path)) == ["manifest.json"]
    assert (tmp_path / "manifest.json").read_bytes() == b'{"old": true}'
