"""Token stores without a VAE, for the export and prior tests.

    tokenizer_dir = save_tiny_tokenizer(tmp_path)          # T=8 positions, K=8 codes of d=2, identity rectifier
    store = write_token_store(tmp_path / "t.zarr", ids, labels, tokenizer_dir)   # ids (N, V, T)
    ids, labels = class_patterned_ids(n, seed)             # tokens that depend on the class, plus noise
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from revq_pipe.cache.token_store import TokenStore, TokenWriter
from revq_pipe.pipeline.normalizer import LatentNormalizer
from revq_pipe.pipeline.quantizer import MultiGroupQuantizer
from revq_pipe.pipeline.rectifier import build_rectifier
from revq_pipe.pipeline.rectifier_spec import RectifierSpec
from revq_pipe.pipeline.tokenizer import RevqTokenizer
from revq_pipe.stages.run_dir import tokenizer_identity

LATENT_SHAPE = (4, 2, 2)  # 16 values: T=8 tokens of d=2
NUM_TOKENS, CODEBOOK_SIZE, NUM_CLASSES = 8, 8, 3


def save_tiny_tokenizer(folder: Path, seed: int = 0) -> Path:
    """A tokenizer folder with random codebooks (T=8, K=8, d=2) and the identity rectifier; returns it."""
    directory = Path(folder) / "tokenizer"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        quantizer = MultiGroupQuantizer(LATENT_SHAPE, NUM_TOKENS, CODEBOOK_SIZE)
    spec = RectifierSpec(kind="none")
    tokenizer = RevqTokenizer(LatentNormalizer(torch.zeros(LATENT_SHAPE), torch.ones(LATENT_SHAPE)), quantizer,
                              build_rectifier(spec, LATENT_SHAPE[0]), rectifier_spec=spec,
                              vae_identity={"source": None}, image_recipe={})
    tokenizer.save_pretrained(directory)
    return directory


def write_token_store(path: Path, ids: np.ndarray, labels: np.ndarray, tokenizer_dir: Path,
                      views: tuple[str, ...] | None = None, chunk_size: int = 16) -> TokenStore:
    """A complete store of ids (N, V, T) with labels (N,), written through TokenWriter unit by unit."""
    n, v, t = ids.shape
    views = views or (("original",) if v == 1 else tuple(f"view{i}" for i in range(v)))
    writer = TokenWriter.open(path, num_inputs=n, split="train", num_tokens=t, codebook_size=CODEBOOK_SIZE,
                              layout={"num_tokens": t}, tokenizer=tokenizer_identity(tokenizer_dir),
                              vae={"source": None}, source={"kind": "synthetic", "classes": ["a", "b", "c"]},
                              augment={"name": "test", "views": list(views)}, chunk_size=chunk_size)
    for u in range(writer.num_units):
        start, stop = writer.unit_range(u)
        writer.write_unit(u, ids[start:stop], labels[start:stop], [f"img{i:04d}" for i in range(start, stop)])
    writer.finalize()
    return TokenStore.open(path)


def class_patterned_ids(n: int, seed: int, noise: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """ids (n, 1, T) and labels (n,): class c puts code (c + 2 t) mod K at position t, a random code at rate `noise`."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n)
    ids = (labels[:, None] + 2 * np.arange(NUM_TOKENS)[None]) % CODEBOOK_SIZE
    noisy = rng.random(ids.shape) < noise
    ids = np.where(noisy, rng.integers(0, CODEBOOK_SIZE, ids.shape), ids)
    return ids[:, None].astype(np.int64), labels.astype(np.int64)


def class_pattern(class_id: int) -> np.ndarray:
    """The noiseless ids (T,) of class `class_id` in `class_patterned_ids`."""
    return (class_id + 2 * np.arange(NUM_TOKENS)) % CODEBOOK_SIZE
