"""Atomic writes: the target is replaced whole or not at all, with ordinary permissions; file hashes."""

from __future__ import annotations

import hashlib
import os

import pytest

from revq_pipe.pipeline.files import atomic_directory, atomic_path, atomic_write_text, file_sha256


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = atomic_write_text(tmp_path / "report.json", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["report.json"]


def test_outputs_get_the_permissions_of_ordinary_files(tmp_path):
    previous = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_directory(tmp_path / "folder") as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755


def test_a_directory_is_replaced_as_a_whole(tmp_path):
    with atomic_directory(tmp_path / "tok") as tmp:
        (tmp / "config.json").write_text("1")
        (tmp / "weights").write_text("1")
    with atomic_directory(tmp_path / "tok") as tmp:
        (tmp / "config.json").write_text("2")
    assert sorted(os.listdir(tmp_path / "tok")) == ["config.json"]
    assert sorted(os.listdir(tmp_path)) == ["tok"]


def test_file_sha256_hashes_every_block_of_the_file(tmp_path):
    payload = os.urandom((5 << 19) + 7)  # 2.5 MiB and 7 bytes: two whole blocks of 1 MiB and a short one
    (tmp_path / "a.bin").write_bytes(payload)
    (tmp_path / "b.bin").write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))  # the last byte differs
    assert file_sha256(tmp_path / "a.bin") == hashlib.sha256(payload).hexdigest()
    assert file_sha256(tmp_path / "b.bin") != file_sha256(tmp_path / "a.bin")
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
