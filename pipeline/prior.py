"""A class-conditional autoregressive prior over ReVQ token ids, built for per-position codebooks.

A ReVQ token id means (position, code): position t has its own codebook of K vectors of d values, so
id 5 at position 0 and id 5 at position 1 are different vectors. A GPT with its own embedding and
output table per position would hold 2 x T x K x D parameters (512 x 16,384 x 768 x 2 = 12.9 G at
512T); a GPT over one flat vocabulary of T x K ids holds the same tables. This prior reads every id
through its codebook vector instead, so no parameter grows with K:

    input   e(t, k)        = MLP_in(c[t, k], t) + p[t + 1]        a learned map of the token's own code
    output  logit(t, k)    = q(h_t) . MLP_out(c[t, k], t)         position t's K codes, mapped and scored

c (T, K, d) are the tokenizer's codebooks (standardized latent pieces, a fixed buffer); MLP(c, t) =
norm(W2 gelu(W1 c + b[t])) with a per-position bias b (T x width), so a map can differ between positions
at the cost of T x width parameters, and a LayerNorm, so that code features start at unit scale: the
output score multiplies two learned maps, and with both at a small initialisation neither would get
a gradient worth the name; p are absolute position embeddings; h_t is the transformer's output
at the step that predicts token t. The sequence is [class, x_0, ..., x_{T-2}] -> [x_0, ..., x_{T-1}]:
the class embedding is the first input, as in LlamaGen's class-to-image GPT, and one extra row of the
class table is the null class that classifier-free guidance contrasts with (trained by replacing the
class with it at a rate, `class_dropout` in the training stage).

Sampling runs one step per token; `generate(..., use_cache=True)` keeps every layer's keys and values
(a KV cache) so that each step processes only the newest token instead of the whole prefix.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class PriorSpec:
    """The shapes of a prior.

    Args:
        num_tokens, codebook_size, token_dim: T, K and d of the tokenizer whose ids it models.
        num_classes: class ids 0..num_classes-1; id num_classes is the null class.
        width: the transformer's width D.
        depth: transformer blocks.
        heads: attention heads (width must be a multiple).
        code_width: the width of the two code maps (input hidden width is `width`; output width is this).
    """

    num_tokens: int
    codebook_size: int
    token_dim: int
    num_classes: int
    width: int = 256
    depth: int = 4
    heads: int = 4
    code_width: int = 128

    def __post_init__(self) -> None:
        for name in ("num_tokens", "codebook_size", "token_dim", "width", "depth", "heads", "code_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"prior {name}={getattr(self, name)} must be positive")
        if self.num_classes < 0:
            raise ValueError(f"prior num_classes={self.num_classes} must be 0 or more")
        if self.width % self.heads:
            raise ValueError(f"prior width={self.width} is not a multiple of heads={self.heads}; choose a width "
                             f"such as {self.heads * max(1, self.width // self.heads)}")

    @property
    def null_class(self) -> int:
        return self.num_classes

    def to_json(self) -> dict:
        return asdict(self)


class CodeMap(nn.Module):
    """Code vectors (..., d) at positions t -> features (..., out): norm(W2 gelu(W1 c + b[t])).

    Its linear layers keep PyTorch's default (fan-in scaled) initialisation, so that distinct codes map
    to distinct unit-scale features from the first step.
    """

    def __init__(self, token_dim: int, num_tokens: int, hidden: int, out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(token_dim, hidden)
        self.position_bias = nn.Parameter(torch.zeros(num_tokens, hidden))  # (T, hidden)
        self.fc2 = nn.Linear(hidden, out)
        self.norm = nn.LayerNorm(out)

    def forward(self, codes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """codes (..., d) at positions broadcastable to codes' leading dimensions -> (..., out)."""
        return self.norm(self.fc2(F.gelu(self.fc1(codes) + self.position_bias[positions])))


class KVCache:
    """Keys and values of every layer for a batch of sequences being generated, preallocated to full length."""

    def __init__(self, spec: PriorSpec, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        head_dim = spec.width // spec.heads
        shape = (spec.depth, batch, spec.heads, spec.num_tokens, head_dim)  # (layers, B, heads, T, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled (in every layer)

    def extend(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' keys and values (B, heads, L, head_dim); return the layer's whole prefix."""
        stop = self.length + keys.shape[2]
        self.keys[layer, :, :, self.length:stop] = keys
        self.values[layer, :, :, self.length:stop] = values
        return self.keys[layer, :, :, :stop], self.values[layer, :, :, :stop]


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        b, length, width = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        # each (B, heads, L, head_dim). Without a cache, or filling an empty one, the L positions attend
        # causally among themselves; a step after that (L = 1) attends to every cached position.
        causal = cache is None or cache.length == 0
        if cache is not None:
            if length > 1 and cache.length > 0:
                raise ValueError("a KV cache takes several positions only while it is empty (the prefill)")
            k, v = cache.extend(layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal and length > 1)
        return self.proj(out.transpose(1, 2).reshape(b, length, width))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache, layer)
        return x + self.mlp(self.norm2(x))


class TokenPrior(nn.Module):
    """p(x_0..x_{T-1} | class) over per-position token ids; see the module docstring.

    Args:
        spec: the shapes.
        codebooks: (T, K, d) the tokenizer's codebooks (RevqTokenizer.quantizer.codebooks), kept as a buffer.
    """

    def __init__(self, spec: PriorSpec, codebooks: torch.Tensor) -> None:
        super().__init__()
        expected = (spec.num_tokens, spec.codebook_size, spec.token_dim)
        if tuple(codebooks.shape) != expected:
            raise ValueError(f"codebooks have shape {tuple(codebooks.shape)}; the prior spec expects {expected}")
        self.spec = spec
        self.register_buffer("codebooks", codebooks.detach().float().clone())  # (T, K, d)
        self.class_embedding = nn.Embedding(spec.num_classes + 1, spec.width)  # the last row is the null class
        self.position_embedding = nn.Parameter(torch.zeros(spec.num_tokens, spec.width))  # (T, D)
        self.input_map = CodeMap(spec.token_dim, spec.num_tokens, spec.width, spec.width)
        self.blocks = nn.ModuleList(Block(spec.width, spec.heads) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(spec.width)
        self.query = nn.Linear(spec.width, spec.code_width)  # its bias scores each code a priori
        self.output_map = CodeMap(spec.token_dim, spec.num_tokens, spec.code_width, spec.code_width)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2's initialisation outside the code maps: N(0, 0.02) weights, zero biases, residual projections
        scaled by depth (the query too, so that the first scores are near zero: a near-uniform start)."""
        code_maps = {id(m) for code_map in (self.input_map, self.output_map) for m in code_map.modules()}
        for module in self.modules():
            if id(module) in code_maps:
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.position_embedding, std=0.02)
        for block in self.blocks:
            for projection in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(projection.weight, std=0.02 / math.sqrt(2 * self.spec.depth))

    # --- the pieces of one forward pass ------------------------------------------------------

    def _inputs(self, class_ids: torch.Tensor, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Input embeddings of sequence steps [start, start + L) (B, L, D).

        Step 0 is the class; step s >= 1 is token s - 1, read through position s - 1's codebook. `ids`
        (B, L') are the tokens feeding those steps: tokens start-1 .. start+L-2 (L' = L - 1 when start = 0).
        """
        parts = [self.class_embedding(class_ids)[:, None]] if start == 0 else []
        if ids.shape[1]:
            positions = torch.arange(max(start - 1, 0), max(start - 1, 0) + ids.shape[1], device=ids.device)
            codes = self.codebooks[positions, ids]  # (B, L', d)
            parts.append(self.input_map(codes, positions))
        x = torch.cat(parts, dim=1)
        return x + self.position_embedding[start:start + x.shape[1]]

    def _hidden(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += x.shape[1]
        return self.norm(x)

    def _logits(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """Hidden states (B, L, D) of the steps predicting tokens [start, start + L) -> logits (B, L, K)."""
        positions = torch.arange(start, start + hidden.shape[1], device=hidden.device)
        codes = self.output_map(self.codebooks[positions], positions[:, None])  # (L, K, code_width)
        return torch.einsum("blc,lkc->blk", self.query(hidden), codes)

    # --- training and scoring ------------------------------------------------------------------

    def forward(self, ids: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, T, K) of every token given the ones before it and the class.

        Args:
            ids: (B, T) int64 token ids, each in [0, K) of its position's codebook.
            class_ids: (B,) int64 in [0, num_classes]; num_classes is the null class.
        """
        t = self.spec.num_tokens
        if ids.ndim != 2 or ids.shape[1] != t:
            raise ValueError(f"ids have shape {tuple(ids.shape)}; the prior expects (B, {t})")
        return self._logits(self._hidden(self._inputs(class_ids, ids[:, :-1], 0), None), 0)

    # --- sampling ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, class_ids: torch.Tensor, *, cfg_scale: float = 1.0, temperature: float = 1.0,
                 top_k: int = 0, generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
        """Sample token ids (B, T) for the given classes.

        Args:
            class_ids: (B,) int64 class ids (num_classes = the null class: unconditional samples).
            cfg_scale: classifier-free guidance; the logits are uncond + cfg_scale * (cond - uncond), from
                the same model run on the class and on the null class (1.0 = no guidance, one pass).
            temperature: divides the (guided) logits before sampling; must be positive.
            top_k: sample among the k most likely codes only (0 = all K).
            generator: the random stream (on the model's device), for reproducible samples.
            use_cache: keep keys and values between steps (one position per step); False recomputes the
                whole prefix at every step (the same distribution, for the benchmark and tests).
        """
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be positive (top_k=1 samples greedily)")
        guided = cfg_scale != 1.0
        labels = class_ids.long()
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, self.spec.null_class)])
        batch, steps = len(labels), self.spec.num_tokens
        ids = torch.zeros(batch, 0, dtype=torch.long, device=labels.device)
        cache = KVCache(self.spec, batch, labels.device, self.codebooks.dtype) if use_cache else None
        for t in range(steps):
            if cache is not None:  # only the newest step: the class at t = 0, else token t - 1
                hidden = self._hidden(self._inputs(labels, ids[:, t - 1:t] if t else ids, t), cache)
            else:
                hidden = self._hidden(self._inputs(labels, ids, 0), None)[:, -1:]
            logits = self._logits(hidden, t)[:, 0].float()  # (batch, K)
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + cfg_scale * (cond - uncond)
            chosen = sample_from_logits(logits, temperature, top_k, generator)  # (B,)
            ids = torch.cat([ids, (torch.cat([chosen, chosen]) if guided else chosen)[:, None]], dim=1)
        return ids[:len(class_ids)]


def sample_from_logits(logits: torch.Tensor, temperature: float, top_k: int,
                       generator: torch.Generator | None) -> torch.Tensor:
    """One id per row of logits (B, K): softmax(logits / temperature), restricted to the top_k (0 = all)."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        threshold = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


def bits_per_token(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Negative log2-likelihood of each token (B, T) under logits (B, T, K)."""
    nats = F.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none")
    return nats / math.log(2.0)
