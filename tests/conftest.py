"""Shared fixtures.

`s3_bucket` gives a test a fresh bucket on a local S3-compatible server (moto, tests/s3_server.py),
started on 127.0.0.1 the first time a test asks for it and stopped when the session ends.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def s3_server():
    """The session's local S3 server (skips the test when moto[server] or s3fs is missing)."""
    hint = "install the test extras: .venv/bin/pip install -e '.[test]' (make setup does)"
    pytest.importorskip("moto.server", reason=f"moto[server] is not importable; {hint}")
    pytest.importorskip("s3fs", reason=f"s3fs is not importable; {hint}")
    from s3_server import S3TestServer

    server = S3TestServer()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """"s3://<new bucket>", with the AWS_* environment pointed at the test server for this test.

    Subprocesses started by the test (torchrun ranks, a killed encode) inherit the environment, so
    they reach the same server. A developer's own ~/.aws files and profile are hidden. fsspec keeps
    one client per set of options for the whole process; the environment it was made with is the
    same in every test, so reusing it is safe (a test that changes the endpoint variables passes
    {"skip_instance_cache": True}).
    """
    from s3_server import CLEARED_ENV

    for name in CLEARED_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    yield f"s3://{s3_server.create_bucket()}"
    s3_server.reset()
