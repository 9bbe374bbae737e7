"""An upload that hits a full disk: DiskFull (RESOURCE_EXHAUSTED) saying so, from the
data folder, and nothing of it kept (no partial file, no orphan content)."""

from __future__ import annotations

import errno
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.domain.datasets import store as store_module
from service.domain.datasets.store import DatasetStore
from service.errors import DiskFull


def _npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros((4, 3), np.float32), y=np.zeros(4))
    return buffer.getvalue()


class _FullFile(io.BytesIO):
    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_chunk_the_disk_refuses_fails_the_upload_and_leaves_no_file(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path / "data" / "datasets", 10**6)
    upload = store.begin_upload("d", "npz")
    upload._file.close()
    upload._file = _FullFile()

    with pytest.raises(DiskFull) as caught:
        upload.write(_npz())
    upload.abort()

    message = caught.value.message
    assert "refused the upload while storing it under <data folder>/datasets" in message
    assert "(No space left on device)" in message
    assert str(tmp_path) not in message
    assert caught.value.code == "RESOURCE_EXHAUSTED"
    assert list(store.incoming_dir.iterdir()) == []


def test_content_stored_without_its_name_is_removed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DatasetStore(tmp_path / "data" / "datasets", 10**6)
    real = store_module.write_json_atomic

    def names_full(path: Path, data: Any) -> None:
        if path.parent == store.names_dir:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(store_module, "write_json_atomic", names_full)
    upload = store.begin_upload("d", "npz")
    upload.write(_npz())
    with pytest.raises(DiskFull):
        upload.finish()

    assert list(store.blobs_dir.iterdir()) == []
    assert list(store.incoming_dir.iterdir()) == []
    monkeypatch.undo()  # space freed: the same upload is stored
    upload = store.begin_upload("d", "npz")
    upload.write(_npz())
    assert upload.finish().num_examples == 4
