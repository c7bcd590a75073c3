"""A real S3-compatible HTTP server for the tests: moto's server mode on 127.0.0.1.

s3fs's own test suite does the same. The server runs in a thread of the pytest process, on a
port the OS picks (no race for a "free" port), and serves every S3 call over HTTP, so s3fs,
Zarr's FsspecStore and subprocesses (torchrun ranks, a killed encode) talk to it exactly as they
would to AWS, MinIO or R2.
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.request
import uuid
from typing import Iterator

from moto.server import ThreadedMotoServer

# Fake credentials and region for the test environment; moto accepts any.
FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Variables that would point the tests at a developer's real account or another endpoint.
CLEARED_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3",
               "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
               "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")


class S3TestServer:
    """moto's ThreadedMotoServer bound to 127.0.0.1 on an OS-chosen port."""

    def __init__(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log line per request
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"

    @contextlib.contextmanager
    def environment(self) -> Iterator[None]:
        """Point this process's S3 clients at the server for the duration (benchmarks; tests use monkeypatch)."""
        saved = {key: os.environ.get(key) for key in (*self.env(), *CLEARED_ENV)}
        for key in CLEARED_ENV:
            os.environ.pop(key, None)
        os.environ.update(self.env())
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def env(self) -> dict[str, str]:
        """Environment variables that send boto/s3fs clients (also in subprocesses) to this server."""
        return {**FAKE_ENV, "AWS_ENDPOINT_URL": self.endpoint_url}

    def create_bucket(self) -> str:
        """A new, empty bucket with a unique name; returns the name."""
        name = f"test-{uuid.uuid4().hex[:16]}"
        request = urllib.request.Request(f"{self.endpoint_url}/{name}", method="PUT")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
        return name

    def reset(self) -> None:
        """Drop every bucket and object (moto's reset API), so a session's data does not pile up."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def stop(self) -> None:
        self._server.stop()
