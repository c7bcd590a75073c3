"""Channel multi-group quantization (docs/method.md): T token positions, each with its own codebook of K vectors.

The standardized latent (C, H, W) is flattened in (C, H, W) order and cut into T contiguous tokens of
d = C*H*W / T values. Token position t is quantized to the nearest of its K codes (exact Euclidean
nearest neighbour, lowest index on ties), so an id only means something together with its position.

Search: for every (position, row) the scores a_k = ||c_k||^2 - 2 x.c_k (the squared distance minus the
constant ||x||^2) come from one batched matmul per chunk of positions; a two-level minimum (block minima,
then the winning block) finds the argmin without a full argmin pass. The matmul's rounding error has a
proven bound (Higham's gamma_n for dot products), so a row whose runner-up score lies within that bound
of its minimum -- a tie or a near tie -- is re-decided with exact float64 distances. The result is the
argmin of the exact distances, identical to a brute-force search, while the working set of one chunk
stays below the search budget (`search_memory_mb`, or derived from the device's free memory).

Finding the unsure rows costs a host synchronisation (their number decides the work). A training step on
an accelerator asks for the search with `deferred=True` instead: up to a fixed number of unsure rows are
re-decided on the device without the host knowing how many there were, and the returned
`ExactnessCheck` says later, when the host reads it, whether that capacity sufficed; if not, the caller
repeats the search the synchronous way. Either way the ids are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from revq_pipe.pipeline.choices import INIT_METHODS
from revq_pipe.pipeline.precision import ieee_float32

CPU_SEARCH_BUDGET_MB = 256  # chunks this size stay cache- and page-fault-friendly on a CPU
FREE_MEMORY_SEARCH_SHARE = 4  # on an accelerator the derived budget is 1/4 of the memory free at first use
DEFERRED_CAPACITY = (8, 256)  # unsure rows the deferred check re-decides on the device: at least, at most


@dataclass
class QuantizerOutput:
    """What `MultiGroupQuantizer.forward` returns."""

    ids: torch.Tensor  # (B, T) int64, the chosen code per position
    quantized: torch.Tensor  # (B, C, H, W) the codes; gradient flows into the selected codebook rows only
    codebook_loss: torch.Tensor  # scalar MSE(tokens, codes): gradient-descent k-means on the codebooks


@dataclass(frozen=True)
class SearchPlan:
    """How `nearest` cuts a batch into chunks that fit the memory budget."""

    positions_per_chunk: int
    rows_per_chunk: int
    block: int  # codes per block of the two-level minimum (a divisor of K)
    peak_bytes: int  # working set of one chunk (the matmul scores dominate)
    budget_bytes: int


def token_dim_of(latent_shape: tuple[int, ...], num_tokens: int, name: str = "num_tokens T") -> int:
    """d = C*H*W / T for T tokens cut from (C, H, W) latents; ValueError naming divisors that would fit
    (`name` is how the message calls T)."""
    if len(latent_shape) != 3 or min(latent_shape) < 1:
        raise ValueError(f"latent_shape={tuple(latent_shape)} must be (C, H, W) with positive sizes")
    size = math.prod(latent_shape)
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1 or size % num_tokens:
        divisors = [t for t in range(1, size + 1) if size % t == 0]
        raise ValueError(f"{name}={num_tokens} does not divide the latent size C*H*W = "
                         f"{'x'.join(map(str, latent_shape))} = {size}; choose one of "
                         f"{', '.join(map(str, divisors[-10:]))} (or another divisor of {size})")
    return size // num_tokens


def check_init_samples(codebook_size: int, num_samples: int, allow_replacement: bool, *, what: str = "sample tokens",
                       fix: str = "pass more tokens, a smaller codebook, or allow_replacement=True to accept "
                                  "repeated codes") -> None:
    """ValueError when K distinct codes cannot be drawn from `num_samples` samples (and repeats are not allowed)."""
    if codebook_size > num_samples and not allow_replacement:
        raise ValueError(f"codebook_size K={codebook_size} is larger than the N={num_samples} {what}, so the codes "
                         f"cannot be distinct samples; {fix}")


class ExactnessCheck:
    """Whether a deferred search's ids are exact, read by the host only when asked.

    On CUDA the flag is copied to pinned host memory behind the search on the same stream, so `holds()`
    waits for the search alone, not for the work queued after it. `combine` makes every rank of a job
    take the same answer (one all-reduce), as they must: all of them redo a step or none does.
    """

    def __init__(self, exact: torch.Tensor) -> None:
        self._failures = (~exact).to(torch.int32).reshape(1)  # (1,) on the search's device
        self._host = None

    def combine(self, all_reduce_sum) -> "ExactnessCheck":
        """Sum the failures over ranks with `all_reduce_sum` (e.g. DistContext.all_reduce_sum_)."""
        all_reduce_sum(self._failures)
        return self

    def start_copy(self) -> "ExactnessCheck":
        """Queue the device-to-host copy of the answer (call once the answer is final)."""
        if self._failures.is_cuda:
            self._host = torch.empty(1, dtype=torch.int32, pin_memory=True)
            self._host.copy_(self._failures, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        return self

    def holds(self) -> bool:
        """True when every id is exact; waits only for the search and its copy."""
        if self._host is None:
            return int(self._failures.item()) == 0
        self._ready.synchronize()
        return int(self._host.item()) == 0


class MultiGroupQuantizer(nn.Module):
    """T per-position codebooks over latents of shape (C, H, W).

    Args:
        latent_shape: (C, H, W) of the (standardized) latents.
        num_tokens: T, the number of token positions; must divide C*H*W.
        codebook_size: K, codes per position.
        search_memory_mb: budget for the working set of one chunk of the nearest-neighbour search; the
            search never materializes more (except one row of K scores, its minimum unit of work). 0
            derives it from the device (`search_budget_bytes`). A property of the machine, not of the
            model: it is not saved with the codebooks, and the ids do not depend on it.
    """

    def __init__(self, latent_shape: tuple[int, int, int] | list[int], num_tokens: int, codebook_size: int,
                 search_memory_mb: float = 0) -> None:
        super().__init__()
        self.latent_shape = tuple(int(s) for s in latent_shape)
        token_dim = token_dim_of(self.latent_shape, num_tokens)
        if codebook_size < 1:
            raise ValueError(f"codebook_size K={codebook_size} must be at least 1")
        if search_memory_mb < 0:
            raise ValueError(f"search_memory_mb={search_memory_mb} must be positive, or 0 to derive it from the "
                             "device's free memory")
        self.num_tokens = num_tokens
        self.codebook_size = codebook_size
        self.token_dim = token_dim
        self.search_memory_mb = search_memory_mb
        self._derived_budget: dict[str, int] = {}  # device -> bytes, measured once per device
        self.codebooks = nn.Parameter(torch.randn(num_tokens, codebook_size, self.token_dim))  # (T, K, d)

    def extra_repr(self) -> str:
        return (f"latent_shape={self.latent_shape}, num_tokens={self.num_tokens}, "
                f"codebook_size={self.codebook_size}, token_dim={self.token_dim}")

    # --- layout -------------------------------------------------------------------------------

    def to_tokens(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, H, W) -> tokens (B, T, d): contiguous pieces of the (C, H, W)-ordered flattening."""
        if z.ndim != 4 or tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"latents have shape {tuple(z.shape)}; expected (B, "
                             f"{', '.join(map(str, self.latent_shape))})")
        return z.reshape(z.shape[0], self.num_tokens, self.token_dim)

    def from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, T, d) -> latents (B, C, H, W); the inverse of `to_tokens`."""
        self._check_tokens(tokens)
        return tokens.reshape(tokens.shape[0], *self.latent_shape)

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != (self.num_tokens, self.token_dim):
            raise ValueError(f"tokens have shape {tuple(tokens.shape)}; expected (B, {self.num_tokens}, "
                             f"{self.token_dim})")

    # --- quantization -------------------------------------------------------------------------

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize standardized latents (B, C, H, W).

        The codes carry gradient into the selected codebook rows only; there is no straight-through path
        to the input (the encoder is frozen and the latents are data).
        """
        tokens = self.to_tokens(z).detach()  # (B, T, d)
        ids = self.nearest(tokens)  # (B, T)
        codes = self.lookup(ids)  # (B, T, d), differentiable w.r.t. the codebooks
        loss = F.mse_loss(codes, tokens.to(codes.dtype))
        return QuantizerOutput(ids=ids, quantized=self.from_tokens(codes), codebook_loss=loss)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (B, T) -> codes (B, T, d); gradient flows into codebooks[t, ids[:, t]] only."""
        if ids.ndim != 2 or ids.shape[1] != self.num_tokens:
            raise ValueError(f"ids have shape {tuple(ids.shape)}; expected (B, {self.num_tokens})")
        flat = self.codebooks.view(self.num_tokens * self.codebook_size, self.token_dim)  # (T*K, d)
        return F.embedding(ids + self._offsets(ids.device), flat)

    def _offsets(self, device: torch.device) -> torch.Tensor:
        return torch.arange(self.num_tokens, device=device) * self.codebook_size  # (T,)

    def search_budget_bytes(self) -> int:
        """The search's working-set budget on the codebooks' device: search_memory_mb, else CPU_SEARCH_BUDGET_MB
        on a CPU, else 1/FREE_MEMORY_SEARCH_SHARE of the accelerator memory free when first asked."""
        if self.search_memory_mb > 0:
            return int(self.search_memory_mb * 2**20)
        device = self.codebooks.device
        if device.type != "cuda":
            return CPU_SEARCH_BUDGET_MB * 2**20
        key = str(device)
        if key not in self._derived_budget:
            free = torch.cuda.mem_get_info(device)[0]
            self._derived_budget[key] = max(CPU_SEARCH_BUDGET_MB * 2**20, free // FREE_MEMORY_SEARCH_SHARE)
        return self._derived_budget[key]

    def search_plan(self, batch_size: int) -> SearchPlan:
        """The chunking `nearest` uses for a batch of `batch_size` latents."""
        return plan_search(batch_size, self.num_tokens, self.codebook_size, self.token_dim,
                           self.search_budget_bytes(), self.codebooks.element_size())

    @torch.no_grad()
    def nearest(self, tokens: torch.Tensor, *, deferred: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, "ExactnessCheck"]:
        """Tokens (B, T, d) -> ids (B, T) int64 of the exact nearest code per position (lowest id on ties).

        With deferred=True, returns (ids, check) without synchronising the host: the ids are exact when
        `check.holds()`; otherwise call again without `deferred` (module docstring).
        """
        self._check_tokens(tokens)
        codebooks = self.codebooks.detach()
        tokens = tokens.to(codebooks.device, codebooks.dtype)
        ids, unsure = self._scored_argmin(tokens, codebooks)
        if deferred:
            return ids, self._settle_on_device(tokens, ids, unsure)
        rows, positions = unsure.nonzero(as_tuple=True)
        if rows.numel():
            ids[rows, positions] = self._exact_nearest(tokens[rows, positions], positions)
        return ids

    def _scored_argmin(self, tokens: torch.Tensor, codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, T), unsure (B, T)) from the float32 scores, chunk by chunk within the budget."""
        batch = tokens.shape[0]
        ids = torch.empty(batch, self.num_tokens, dtype=torch.int64, device=codebooks.device)
        unsure = torch.zeros(batch, self.num_tokens, dtype=torch.bool, device=codebooks.device)
        plan = self.search_plan(batch)
        scores = None
        with ieee_float32(codebooks.device):
            for t0 in range(0, self.num_tokens, plan.positions_per_chunk):
                t1 = min(t0 + plan.positions_per_chunk, self.num_tokens)
                scorer = _ChunkScorer(codebooks[t0:t1], plan.block)
                for b0 in range(0, batch, plan.rows_per_chunk):
                    b1 = min(b0 + plan.rows_per_chunk, batch)
                    # one scores buffer for the whole call: fresh allocations of this size cost page faults
                    size = (t1 - t0) * self.codebook_size * (b1 - b0)
                    if scores is None or scores.numel() < size:
                        scores = torch.empty(size, dtype=codebooks.dtype, device=codebooks.device)
                    chunk_ids, chunk_unsure = scorer.argmin(tokens[b0:b1, t0:t1], scores[:size])
                    ids[b0:b1, t0:t1] = chunk_ids.T
                    unsure[b0:b1, t0:t1] = chunk_unsure.T
        return ids, unsure

    def deferred_capacity(self) -> int:
        """How many unsure rows a deferred search re-decides on the device (bounded by the search budget)."""
        per_row = self.codebook_size * (self.token_dim * 20 + 8)
        low, high = DEFERRED_CAPACITY
        return max(low, min(high, self.search_budget_bytes() // per_row))

    def _settle_on_device(self, tokens: torch.Tensor, ids: torch.Tensor, unsure: torch.Tensor) -> "ExactnessCheck":
        """Re-decide the first `deferred_capacity()` unsure rows exactly, with shapes fixed in advance (no host
        synchronisation); the check records whether there were more."""
        flat = unsure.view(-1)
        capacity = min(self.deferred_capacity(), flat.numel())
        # the unsure rows first, in row-major order (a stable sort of the flags)
        chosen = torch.sort(flat.to(torch.uint8), descending=True, stable=True).indices[:capacity]
        rows, positions = chosen // self.num_tokens, chosen % self.num_tokens
        exact = self._exact_nearest(tokens[rows, positions], positions)
        flat_ids = ids.view(-1)
        flat_ids[chosen] = torch.where(flat[chosen], exact, flat_ids[chosen])
        return ExactnessCheck(flat.sum() <= capacity)

    def _exact_nearest(self, points: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Float64 brute force for a few (point (n, d), position (n,)) pairs; first minimum wins."""
        per_row = self.codebook_size * (self.token_dim * 20 + 8)  # gathered codes, as float64, differences, distances
        step = max(1, self.search_budget_bytes() // per_row)
        out = []
        for start in range(0, points.shape[0], step):
            x = points[start:start + step].double()  # (n, d)
            codes = self.codebooks.detach()[positions[start:start + step]].double()  # (n, K, d)
            out.append((codes - x[:, None, :]).square_().sum(-1).argmin(-1))
        return torch.cat(out) if out else torch.empty(0, dtype=torch.int64, device=points.device)

    # --- initialisation and maintenance -------------------------------------------------------

    @torch.no_grad()
    def init_from_samples(self, tokens: torch.Tensor, method: str = "sample",
                          generator: torch.Generator | None = None, allow_replacement: bool = False) -> None:
        """Set every position's K codes from training tokens (N, T, d).

        Args:
            tokens: standardized training tokens, (N, T, d).
            method: "sample" draws K distinct tokens per position uniformly (docs/method.md); "kmeans++" uses
                D^2 seeding per position (cost O(K*N*T*d): meant for an accelerator).
            generator: the random stream (a CPU generator makes the result device independent).
            allow_replacement: K > N is an error unless True; then each position first takes all N tokens
                (in random order) and fills the rest with repeats.
        """
        self._check_tokens(tokens)
        num = tokens.shape[0]
        if num == 0:
            raise ValueError("init_from_samples got no tokens (N = 0)")
        check_init_samples(self.codebook_size, num, allow_replacement)
        tokens = tokens.to(self.codebooks.device, self.codebooks.dtype)
        if method == "sample":
            index = torch.stack([_sample_indices(num, self.codebook_size, generator)
                                 for _ in range(self.num_tokens)])  # (T, K)
            positions = torch.arange(self.num_tokens)[:, None]
            self.codebooks.copy_(tokens[index.to(tokens.device), positions.to(tokens.device)])
        elif method == "kmeans++":
            self._init_kmeans_pp(tokens, generator)
        else:
            raise ValueError(f"method={method!r} is not one of {', '.join(INIT_METHODS)}")

    def _init_kmeans_pp(self, tokens: torch.Tensor, generator: torch.Generator | None) -> None:
        """D^2 seeding (Arthur & Vassilvitskii 2007) per position, positions in memory-bounded chunks."""
        num, k = tokens.shape[0], self.codebook_size
        # one seed per position, so the result does not depend on how positions are chunked
        seeds = torch.randint(0, 2**62, (self.num_tokens,), generator=generator).tolist()
        per_position = num * (self.token_dim * 8 + 16) + k * 8
        step = max(1, self.search_budget_bytes() // per_position)
        for t0 in range(0, self.num_tokens, step):
            t1 = min(t0 + step, self.num_tokens)
            points = tokens[:, t0:t1].transpose(0, 1).contiguous()  # (Tc, N, d)
            uniforms = torch.stack([torch.rand(k, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
                                    for s in seeds[t0:t1]]).to(tokens.device)  # (Tc, K)
            chunk = torch.arange(t1 - t0, device=tokens.device)
            chosen = (uniforms[:, 0] * num).long().clamp_max(num - 1)  # (Tc,) first centre: uniform
            centre = points[chunk, chosen]  # (Tc, d)
            self.codebooks[t0:t1, 0] = centre
            dist = (points - centre[:, None]).square().sum(-1)  # (Tc, N) squared distance to nearest centre
            for j in range(1, k):
                cum = dist.double().cumsum(1)  # (Tc, N)
                total = cum[:, -1]
                target = (uniforms[:, j] * total)[:, None]
                chosen = torch.searchsorted(cum, target, right=True)[:, 0].clamp_max(num - 1)
                # every point already chosen (only with repeats): fall back to a uniform pick
                uniform = (uniforms[:, j] * num).long().clamp_max(num - 1)
                chosen = torch.where(total > 0, chosen, uniform)
                centre = points[chunk, chosen]
                self.codebooks[t0:t1, j] = centre
                torch.minimum(dist, (points - centre[:, None]).square().sum(-1), out=dist)

    @torch.no_grad()
    def reset_dead_codes(self, counts: torch.Tensor, fraction: float = 0.2, noise: float = 0.1,
                         generator: torch.Generator | None = None) -> int:
        """Non-activation reset (docs/method.md); returns how many codes were overwritten.

        Per position: r = min(floor(fraction * K), number of codes with count 0); the r least-used codes
        (all unused; lowest ids first among equals) become copies of the r most-used codes (highest count
        first, lowest id among equals) plus N(0, noise^2) noise. When fewer than r codes were used, the used
        codes are copied in turn; a position with no use at all is left alone. Deterministic given
        `generator` (noise is drawn on the generator's device, CPU when None).
        """
        if tuple(counts.shape) != (self.num_tokens, self.codebook_size):
            raise ValueError(f"counts have shape {tuple(counts.shape)}; expected (T, K) = "
                             f"({self.num_tokens}, {self.codebook_size})")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction={fraction} must be in [0, 1]")
        codebooks = self.codebooks
        counts = counts.to(codebooks.device)
        dead = (counts == 0).sum(1)  # (T,)
        used = self.codebook_size - dead
        resets = torch.minimum(dead, torch.full_like(dead, int(math.floor(fraction * self.codebook_size))))
        resets = torch.where(used > 0, resets, torch.zeros_like(resets))  # (T,)
        width = int(resets.max()) if resets.numel() else 0
        if width == 0:
            return 0
        least_used = torch.sort(counts, dim=1, stable=True).indices[:, :width]  # (T, r_max)
        most_used = torch.sort(counts, dim=1, descending=True, stable=True).indices  # (T, K)
        slot = torch.arange(width, device=codebooks.device)
        source = most_used.gather(1, slot[None, :] % used.clamp_min(1)[:, None])  # (T, r_max)
        valid = slot[None, :] < resets[:, None]  # (T, r_max)
        device = generator.device if generator is not None else torch.device("cpu")
        jitter = torch.randn(self.num_tokens, width, self.token_dim, generator=generator, device=device,
                             dtype=codebooks.dtype).to(codebooks.device) * noise
        position = torch.arange(self.num_tokens, device=codebooks.device)[:, None].expand(-1, width)
        fresh = codebooks[position, source] + jitter  # (T, r_max, d), read before any write
        codebooks[position[valid], least_used[valid]] = fresh[valid]
        return int(resets.sum())


# --- search internals -------------------------------------------------------------------------


def plan_search(batch_size: int, num_tokens: int, codebook_size: int, token_dim: int, budget_bytes: int,
                element_size: int = 4) -> SearchPlan:
    """Largest chunk of (positions x rows) whose working set fits `budget_bytes` (at least 1 x 1)."""
    k, d, e = codebook_size, token_dim, element_size
    block = _block_size(k)
    # per position: the augmented codes [c, ||c||^2], the squared norms and their temporary
    per_position = k * (d + 1) * e + k * e + k * d * e
    # per (position, row): scores, block minima + mask, the winning block's scores + index + mask, row scalars
    per_cell = k * e + (k // block) * (e + 1) + block * (e + 8 + 1) + 8 * (d + 8)
    rows = max(1, min(batch_size, (budget_bytes - per_position) // per_cell))
    positions = max(1, min(num_tokens, budget_bytes // (per_position + rows * per_cell)))
    peak = positions * (per_position + rows * per_cell)
    return SearchPlan(positions_per_chunk=positions, rows_per_chunk=rows, block=block, peak_bytes=peak,
                      budget_bytes=budget_bytes)


def _block_size(k: int) -> int:
    """The divisor of K closest to sqrt(K) (from below): blocks for the two-level minimum."""
    block = max(1, math.isqrt(k))
    while k % block:
        block -= 1
    return block


class _ChunkScorer:
    """Scores of one chunk of positions against their codebooks, with the exactness check."""

    def __init__(self, codes: torch.Tensor, block: int) -> None:  # codes (Tc, K, d)
        square_norms = codes.square().sum(-1, keepdim=True)  # (Tc, K, 1)
        self.augmented = torch.cat([codes, square_norms], -1)  # (Tc, K, d+1): a = [c, |c|^2] . [-2x, 1]
        self.max_norm_sq = square_norms.amax(1)  # (Tc, 1)
        self.block = block
        # Higham, "Accuracy and Stability of Numerical Algorithms", eq. 3.5: |fl(x.y) - x.y| <= gamma_n |x|.|y|
        # for any summation order, gamma_n = n u / (1 - n u); the d+1 products plus the rounding of |c|^2.
        n = codes.shape[-1] + 1
        unit = torch.finfo(codes.dtype).eps / 2
        self.gamma = 2.0 * n * unit / (1 - n * unit)  # doubled as a safety margin

    def argmin(self, x: torch.Tensor, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows x (Bc, Tc, d) -> (ids (Tc, Bc), unsure (Tc, Bc)): unsure rows need the exact check.

        `buffer` is flat storage for the (Tc, K, Bc) scores.
        """
        tc, k, _ = self.augmented.shape
        xt = x.permute(1, 2, 0)  # (Tc, d, Bc)
        rows = torch.cat([-2.0 * xt, torch.ones_like(xt[:, :1])], 1)  # (Tc, d+1, Bc)
        scores = torch.bmm(self.augmented, rows, out=buffer.view(tc, k, -1))  # (Tc, K, Bc): |c|^2 - 2 x.c
        blocks = scores.view(tc, k // self.block, self.block, -1)  # (Tc, K/G, G, Bc)
        block_min = blocks.amin(2)  # (Tc, K/G, Bc)
        best, best_block = block_min.min(1)  # (Tc, Bc): first block holding the minimum
        # |score error| <= gamma (2 |x| |c| + 2 |c|^2), so two scores within 2x that may be in either order
        x_norm = xt.square().sum(1).sqrt()  # (Tc, Bc)
        max_norm = self.max_norm_sq.sqrt()
        tolerance = self.gamma * (2 * x_norm * max_norm + 2 * self.max_norm_sq)
        threshold = best + 2 * tolerance  # (Tc, Bc)
        close_blocks = (block_min <= threshold[:, None]).sum(1)
        index = best_block[:, None, None, :].expand(-1, 1, self.block, -1)
        winner = blocks.gather(1, index)[:, 0]  # (Tc, G, Bc)
        within = winner.argmin(1)  # first minimum inside the block
        close_codes = (winner <= threshold[:, None]).sum(1)
        unsure = (close_blocks > 1) | (close_codes > 1) | ~torch.isfinite(best)
        return best_block * self.block + within, unsure


def _sample_indices(num: int, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """K indices into N samples: distinct when K <= N, else all N (shuffled) followed by repeats."""
    order = torch.randperm(num, generator=generator)
    if k <= num:
        return order[:k]
    return torch.cat([order, torch.randint(0, num, (k - num,), generator=generator)])


# --- usage statistics -------------------------------------------------------------------------


class CodeUsage:
    """How often each code of each position was chosen: counts (T, K) int64 on `device`.

    Training counts an epoch for the non-activation reset; evaluation counts a split for its usage
    and perplexity. Ranks merge by summing `counts` (DistContext.all_reduce_sum_).
    """

    def __init__(self, num_tokens: int, codebook_size: int, device: str | torch.device = "cpu") -> None:
        self.counts = torch.zeros(num_tokens, codebook_size, dtype=torch.int64, device=device)  # (T, K)
        self._offsets = torch.arange(num_tokens, device=device) * codebook_size  # (T,) row starts in the flat view

    def add(self, ids: torch.Tensor) -> None:
        """Count one use per (position, id) in ids (B, T)."""
        if ids.ndim != 2 or ids.shape[1] != self.counts.shape[0]:
            raise ValueError(f"ids have shape {tuple(ids.shape)}; expected (B, {self.counts.shape[0]})")
        flat = (ids.to(self.counts.device) + self._offsets).reshape(-1)
        self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat))

    def zero_(self) -> None:
        self.counts.zero_()

    def summary(self) -> dict[str, float | int | None]:
        """{"codebook_usage", "dead_codes", "perplexity"}; usage and perplexity are None before any count."""
        seen = bool(self.counts.sum() > 0)
        return {"codebook_usage": codebook_usage(self.counts) if seen else None,
                "dead_codes": int((self.counts == 0).sum()),
                "perplexity": perplexity(self.counts) if seen else None}


def codebook_usage(counts: torch.Tensor) -> float:
    """Fraction of codes chosen at least once, averaged over positions (counts (T, K))."""
    return float((counts > 0).double().mean(1).mean())


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of each position's code distribution, averaged over positions that were used."""
    counts = counts.double()
    totals = counts.sum(1, keepdim=True)  # (T, 1)
    used = totals[:, 0] > 0
    if not used.any():
        return 0.0
    p = counts[used] / totals[used]
    entropy = -torch.special.xlogy(p, p).sum(1)
    return float(entropy.exp().mean())
