"""Which VAE made a set of latents, and the one check that two records name the same VAE.

A VAE identity is the dict {"source", "class", "weights_sha256"} that caches, tokenizers, token
stores and reports record (FrozenVAE.identity). Two identities name the same VAE when their
weights hashes agree: the source is only where the weights were read from (the same VAE can sit
in two folders). An identity without a hash (latents imported from elsewhere) matches anything,
and callers say so. Kept free of torch and diffusers so the cache can import it cheaply.
"""

from __future__ import annotations

from typing import Any


class VaeMismatchError(ValueError):
    """Two records name VAEs with different weights; the message says which and what to do."""


def unknown_vae_identity() -> dict[str, Any]:
    """The identity recorded for latents made elsewhere by an unnamed VAE."""
    return {"source": None, "class": None, "weights_sha256": None}


def describe_vae(identity: dict[str, Any]) -> str:
    """'VAE SOURCE (weights sha256 0123456789ab...)' for messages."""
    digest = identity.get("weights_sha256")
    return f"VAE {identity.get('source')} ({f'weights sha256 {digest[:12]}...' if digest else 'no weights hash'})"


def require_same_vae(expected: dict[str, Any], found: dict[str, Any], *, expected_what: str, found_what: str,
                     fix: str, allow_unknown: bool = True) -> None:
    """Raise VaeMismatchError when both identities carry weights hashes and the hashes differ (or, with
    allow_unknown=False, when only one of them carries a hash: two splits of one dataset should agree).

    Args:
        expected, found: the two identities.
        expected_what, found_what: what each belongs to, e.g. "the tokenizer", "the cache at X".
        fix: what the user should do, appended to the message.
    """
    a, b = expected.get("weights_sha256"), found.get("weights_sha256")
    if a != b and ((a and b) or not allow_unknown):
        raise VaeMismatchError(f"VAE mismatch: {found_what} is from the {describe_vae(found)}, but {expected_what} "
                               f"is from the {describe_vae(expected)}; {fix}")
