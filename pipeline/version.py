"""The installed package's version, recorded in every store, tokenizer and report the project writes."""

from __future__ import annotations

import importlib.metadata


def package_version() -> str:
    """Version of the installed revq-pipe distribution ("0+unknown" when running from a bare checkout)."""
    try:
        return importlib.metadata.version("revq-pipe")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
