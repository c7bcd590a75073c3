"""The tokenizer as a library: VAE wrapper, normalizer, quantizer, rectifier, RevqTokenizer, metrics.

Installed as `revq_pipe.pipeline`; `from revq_pipe.pipeline import RevqTokenizer` is the entry point.
Names are resolved on first use (PEP 562), so importing a light module such as `rectifier_spec`
does not pull in torch and diffusers.
"""

from __future__ import annotations

from revq_pipe.pipeline.lazy import lazy_attributes

_EXPORTS = {
    "RevqTokenizer": "tokenizer",
    "FrozenVAE": "vae",
    "LatentNormalizer": "normalizer",
    "MultiGroupQuantizer": "quantizer",
    "RectifierSpec": "rectifier_spec",
    "build_rectifier": "rectifier",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_attributes("revq_pipe.pipeline", _EXPORTS)
