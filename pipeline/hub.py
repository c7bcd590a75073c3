"""Whether the Hugging Face hub can be reached, decided in seconds instead of a minute of retries.

huggingface_hub retries a failed request several times with back-off before giving up. A hub id on
a machine without network should fail at once and say that the network is the cause.
"""

from __future__ import annotations

import contextlib
import os
import socket
import warnings
from typing import Iterator
from urllib.parse import urlparse

DEFAULT_ENDPOINT = "https://huggingface.co"
CONNECT_TIMEOUT_S = 3.0


def hub_unreachable_reason() -> str | None:
    """None when the hub endpoint accepts a TCP connection, else why it cannot be used."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except OSError as error:
        return f"no network connection to {host}:{port} ({type(error).__name__}: {error})"


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """Hide huggingface_hub's warnings inside the block: they are about arguments diffusers passes it (e.g.
    the deprecated `local_dir_use_symlinks`), nothing a user can act on, and would print before our own
    one-line error. Errors still propagate."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"huggingface_hub(\.|$)")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"huggingface_hub(\.|$)")
        yield
