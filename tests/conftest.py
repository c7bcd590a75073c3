"""Fixtures that tests in more than one module use.

`s3_bucket` gives a test a fresh bucket on a local S3-compatible server (moto, tests/s3_server.py),
started on 127.0.0.1 the first time a test asks for it and stopped when the session ends.
`encode_data` (stage one's images and tiny VAE) and `encode_reference` (an uninterrupted encode of them,
what every multi-process, resumed or object-store encode must equal byte for byte) are built once per session.
`eval_setup` is a tiny trained-looking run (tests/helpers_eval.py), one per test module.
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
    from tests.s3_server import S3TestServer

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
    from tests.s3_server import CLEARED_ENV

    for name in CLEARED_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    yield f"s3://{s3_server.create_bucket()}"
    s3_server.reset()


@pytest.fixture(scope="session")
def encode_data(tmp_path_factory):
    """42 small images of varied sizes in two classes, two of them unreadable, and a tiny VAE (helpers_encode)."""
    from tests.helpers_encode import make_encode_data

    return make_encode_data(tmp_path_factory.mktemp("encode"))


@pytest.fixture(scope="session")
def encode_reference(encode_data):
    """An uninterrupted 1-process local encode of encode_data with the driver's settings."""
    from tests.helpers_encode import encode_in_process

    out = encode_data["root"] / "reference.zarr"
    encode_in_process(encode_data, out)
    return out


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    """A tiny VAE, 12 images (+ 1 broken file), their val cache and RUN/tokenizer (helpers_eval.make_eval_setup)."""
    from tests.helpers_eval import make_eval_setup

    return make_eval_setup(tmp_path_factory.mktemp("eval_setup"))
