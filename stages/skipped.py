"""Inputs a stage could not use: recorded in full in its output, summarized once on the console."""

from __future__ import annotations

from typing import Any

LISTED_ON_CONSOLE = 20  # skipped keys printed; the store or report records all of them


def skipped_record(skipped: list[tuple[str, str]]) -> dict[str, Any]:
    """{"count", "keys", "reasons"}: what stores and reports record about skipped inputs."""
    return {"count": len(skipped), "keys": [k for k, _ in skipped], "reasons": [r for _, r in skipped]}


def describe_skipped(skipped: list[tuple[str, str]], *, what: str) -> str:
    """One console line: 'skipped N <what>: key (reason); ...; and M more (all are recorded)'."""
    listed = [f"{key} ({reason})" for key, reason in skipped[:LISTED_ON_CONSOLE]]
    more = len(skipped) - len(listed)
    return (f"skipped {len(skipped)} {what}: " + "; ".join(listed)
            + (f"; and {more} more (all are recorded in the output)" if more else ""))
