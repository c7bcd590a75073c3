"""MultiGroupQuantizer: exact search (vs brute force), memory plan, gradients, init, reset, usage statistics."""

from __future__ import annotations

import math

import pytest
import torch

from revq_pipe.pipeline.quantizer import (MultiGroupQuantizer, CodeUsage, codebook_usage, perplexity, plan_search)


def brute_force(tokens: torch.Tensor, codebooks: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """Per-position cdist argmin with exact (non-matmul) distances: (B, T, d), (T, K, d) -> (B, T)."""
    return torch.stack([
        torch.cdist(tokens[:, t].to(dtype), codebooks[t].detach().to(dtype),
                    compute_mode="donot_use_mm_for_euclid_dist").argmin(-1)
        for t in range(codebooks.shape[0])], 1)


def make_quantizer(shape, num_tokens, codebook_size, seed=0, **kwargs) -> MultiGroupQuantizer:
    torch.manual_seed(seed)
    return MultiGroupQuantizer(shape, num_tokens, codebook_size, **kwargs)


# --- layout ---------------------------------------------------------------------------------------


def test_tokens_are_contiguous_pieces_of_the_chw_flattening():
    quantizer = make_quantizer((4, 2, 3), 6, 5)
    z = torch.arange(2 * 24.0).view(2, 4, 2, 3)
    tokens = quantizer.to_tokens(z)
    assert tokens.shape == (2, 6, 4)
    assert torch.equal(tokens[1, 2], z[1].flatten()[8:12])
    assert torch.equal(quantizer.from_tokens(tokens), z)


def test_token_count_must_divide_the_latent():
    with pytest.raises(ValueError, match=r"T=7 .* C\*H\*W = 4x2x3 = 24"):
        MultiGroupQuantizer((4, 2, 3), 7, 5)


# --- exact nearest neighbour ----------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens,codebook_size,batch", [(8, 300, 17), (32, 64, 9), (2, 1, 5), (16, 97, 33)])
def test_nearest_matches_brute_force_on_random_data(num_tokens, codebook_size, batch):
    quantizer = make_quantizer((4, 4, 4), num_tokens, codebook_size)
    tokens = torch.randn(batch, num_tokens, quantizer.token_dim, generator=torch.Generator().manual_seed(1))
    ids = quantizer.nearest(tokens)
    assert ids.dtype == torch.int64 and ids.shape == (batch, num_tokens)
    assert torch.equal(ids, brute_force(tokens, quantizer.codebooks))
    assert torch.equal(ids, brute_force(tokens, quantizer.codebooks, torch.float32))


def test_ties_go_to_the_lowest_index():
    # small integers: every distance is exact in any precision and ties are everywhere
    generator = torch.Generator().manual_seed(2)
    quantizer = make_quantizer((2, 4, 4), 8, 40)
    with torch.no_grad():
        quantizer.codebooks.copy_(torch.randint(-2, 3, quantizer.codebooks.shape, generator=generator).float())
        quantizer.codebooks[:, 30:] = quantizer.codebooks[:, :10]  # exact duplicates of earlier codes
    tokens = torch.randint(-2, 3, (64, 8, 4), generator=generator).float()
    ids = quantizer.nearest(tokens)
    assert torch.equal(ids, brute_force(tokens, quantizer.codebooks, torch.float32))
    assert (ids < 30).all()


def test_near_ties_beyond_float32_matmul_precision_are_exact():
    # a large common offset makes |c|^2 - 2 x.c lose the digits that separate the candidates
    generator = torch.Generator().manual_seed(3)
    quantizer = make_quantizer((4, 4, 4), 4, 200)
    with torch.no_grad():
        quantizer.codebooks.copy_(1000.0 + 0.01 * torch.randn(quantizer.codebooks.shape, generator=generator))
    tokens = 1000.0 + 0.01 * torch.randn(50, 4, 16, generator=generator)
    assert torch.equal(quantizer.nearest(tokens), brute_force(tokens, quantizer.codebooks))


def test_result_does_not_depend_on_the_memory_budget():
    quantizer = make_quantizer((8, 4, 4), 32, 128)
    tokens = torch.randn(40, 32, 4, generator=torch.Generator().manual_seed(4))
    tiny = make_quantizer((8, 4, 4), 32, 128, search_memory_mb=0.01)
    tiny.load_state_dict(quantizer.state_dict())
    plan = tiny.search_plan(40)
    assert plan.positions_per_chunk * plan.rows_per_chunk < 32 * 40  # really chunked
    assert torch.equal(tiny.nearest(tokens), quantizer.nearest(tokens))


def test_deferred_search_is_exact_within_its_capacity_and_says_when_it_is_not():
    # ties everywhere (small integers, duplicated codes): many rows need the exact re-decision
    generator = torch.Generator().manual_seed(2)
    quantizer = make_quantizer((4, 4, 4), 8, 40, search_memory_mb=0.05)  # a budget for 8 re-decisions
    assert quantizer.deferred_capacity() == 8
    with torch.no_grad():
        quantizer.codebooks.copy_(torch.randint(-2, 3, quantizer.codebooks.shape, generator=generator).float())
        quantizer.codebooks[:, 30:] = quantizer.codebooks[:, :10]
    many = torch.randint(-2, 3, (64, 8, 8), generator=generator).float()
    exact = brute_force(many, quantizer.codebooks, torch.float32)
    ids, check = quantizer.nearest(many, deferred=True)
    assert not check.holds(), f"{(ids != exact).sum()} ties cannot fit {quantizer.deferred_capacity()} slots"
    few = many[:1]  # at most 8 unsure rows: within the capacity
    ids, check = quantizer.nearest(few, deferred=True)
    assert check.holds() and torch.equal(ids, exact[:1]) and torch.equal(ids, quantizer.nearest(few))
    distinct = make_quantizer((4, 4, 4), 8, 40, search_memory_mb=0.05)  # random codes: no ties at all
    calm = torch.randn(64, 8, 8, generator=generator)
    ids, check = distinct.nearest(calm, deferred=True)
    assert check.holds() and torch.equal(ids, brute_force(calm, distinct.codebooks))


# --- memory bound ---------------------------------------------------------------------------------


def test_plan_keeps_the_working_set_under_budget_at_512_tokens():
    budget = 256 * 2**20
    for batch in (1, 64, 256, 4096):
        plan = plan_search(batch, 512, 16384, 4, budget)
        assert plan.peak_bytes <= budget
        whole = batch * 512 * 16384 * 4  # what a single (B, T, K) float32 tensor would take
        chunk = plan.positions_per_chunk * plan.rows_per_chunk * 16384 * 4
        assert chunk <= budget and (whole <= budget or chunk < whole)


def test_real_batch_at_512_tokens_stays_under_budget(monkeypatch):
    quantizer = make_quantizer((32, 8, 8), 512, 16384, search_memory_mb=16)
    tokens = torch.randn(3, 512, 4, generator=torch.Generator().manual_seed(5))
    largest = []
    real_bmm = torch.bmm

    def recording_bmm(a, b, *, out=None):
        result = real_bmm(a, b, out=out)
        largest.append(result.numel() * result.element_size())
        return result

    monkeypatch.setattr(torch, "bmm", recording_bmm)
    ids = quantizer.nearest(tokens)
    assert largest and max(largest) <= 16 * 2**20 < 3 * 512 * 16384 * 4
    assert len(largest) > 1  # the batch was cut into several chunks
    sample = torch.arange(0, 512, 37)
    expected = brute_force(tokens[:, sample], quantizer.codebooks[sample])
    assert torch.equal(ids[:, sample], expected)


# --- forward and gradients ------------------------------------------------------------------------


def test_gradient_reaches_only_the_selected_codes_and_not_the_input():
    quantizer = make_quantizer((2, 2, 2), 4, 6)
    z = torch.randn(3, 2, 2, 2, requires_grad=True)
    out = quantizer(z)
    assert out.ids.shape == (3, 4) and out.quantized.shape == z.shape
    codes = quantizer.lookup(out.ids)
    assert torch.equal(out.quantized, quantizer.from_tokens(codes))
    torch.testing.assert_close(out.codebook_loss, torch.nn.functional.mse_loss(codes, quantizer.to_tokens(z)))
    (out.codebook_loss + out.quantized.square().sum()).backward()
    assert z.grad is None  # no straight-through estimator: the encoder is frozen
    selected = torch.zeros(4, 6, dtype=torch.bool)
    selected[torch.arange(4).expand(3, 4), out.ids] = True
    row_has_grad = quantizer.codebooks.grad.abs().sum(-1) > 0  # (T, K)
    assert torch.equal(row_has_grad, selected)


def test_wrong_latent_shape_is_refused():
    with pytest.raises(ValueError, match=r"expected \(B, 2, 2, 2\)"):
        make_quantizer((2, 2, 2), 4, 6)(torch.randn(3, 2, 2, 3))


# --- initialisation -------------------------------------------------------------------------------


def distinct_tokens(num: int, num_tokens: int, dim: int) -> torch.Tensor:
    """Tokens whose values encode (sample, position), so every token is unique and traceable."""
    n = torch.arange(num, dtype=torch.float32)[:, None, None]
    t = torch.arange(num_tokens, dtype=torch.float32)[None, :, None]
    return (n * 1000 + t + torch.zeros(1, 1, dim)).contiguous()  # (N, T, d)


def test_sample_init_draws_distinct_tokens_of_each_position():
    quantizer = make_quantizer((2, 2, 4), 4, 20)  # d = 4
    tokens = distinct_tokens(50, 4, 4)
    quantizer.init_from_samples(tokens, generator=torch.Generator().manual_seed(0))
    codes = quantizer.codebooks.detach()
    for t in range(4):
        values = codes[t, :, 0]
        assert len(set(values.tolist())) == 20  # without replacement
        assert torch.equal(torch.remainder(values, 1000), torch.full((20,), float(t)))  # its own position
    again = make_quantizer((2, 2, 4), 4, 20, seed=9)
    again.init_from_samples(tokens, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.codebooks, quantizer.codebooks)


def test_init_refuses_more_codes_than_samples_unless_allowed():
    quantizer = make_quantizer((2, 2, 4), 4, 20)
    tokens = distinct_tokens(8, 4, 4)
    with pytest.raises(ValueError, match=r"K=20 is larger than the N=8 .* allow_replacement=True"):
        quantizer.init_from_samples(tokens)
    quantizer.init_from_samples(tokens, allow_replacement=True, generator=torch.Generator().manual_seed(1))
    for t in range(4):
        assert len(set(quantizer.codebooks[t, :, 0].tolist())) == 8  # every sample used, then repeats


def test_kmeans_pp_init_picks_distinct_samples_independent_of_chunking():
    tokens = torch.randn(60, 8, 2, generator=torch.Generator().manual_seed(6))
    results = []
    for budget in (64, 0.001):  # one chunk of positions vs one position at a time
        quantizer = make_quantizer((2, 2, 4), 8, 12, search_memory_mb=budget)
        quantizer.init_from_samples(tokens, method="kmeans++", generator=torch.Generator().manual_seed(2))
        results.append(quantizer.codebooks.detach().clone())
    assert torch.equal(results[0], results[1])
    for t in range(8):
        codes = results[0][t]
        matches = (codes[:, None, :] == tokens[None, :, t, :]).all(-1)  # (K, N)
        assert (matches.sum(1) == 1).all()  # every code is one of the position's samples
        assert len(set(matches.float().argmax(1).tolist())) == 12  # all different samples


# --- non-activation reset -------------------------------------------------------------------------


def test_reset_follows_the_method_on_a_hand_built_table():
    quantizer = make_quantizer((2, 2, 5), 4, 10)  # T=4, K=10, d=5
    before = quantizer.codebooks.detach().clone()
    counts = torch.tensor([
        [5, 0, 3, 0, 0, 9, 1, 0, 2, 0],  # 5 dead, cap floor(0.2*10)=2 -> codes 1, 3 <- copies of 5, 0
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 0],  # 1 dead -> code 9 <- copy of code 0 (equal counts: lowest id)
        [4, 4, 4, 4, 4, 4, 4, 4, 4, 4],  # nothing dead
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # never used (no source): left alone
    ])
    reset = quantizer.reset_dead_codes(counts, fraction=0.2, noise=0.0)
    assert reset == 3
    after = quantizer.codebooks.detach()
    expected = before.clone()
    expected[0, 1], expected[0, 3], expected[1, 9] = before[0, 5], before[0, 0], before[1, 0]
    assert torch.equal(after, expected)


def test_reset_noise_is_gaussian_and_deterministic():
    counts = torch.zeros(4, 10, dtype=torch.int64)
    counts[:, 9] = 7  # one used code, 9 dead; cap floor(0.5*10)=5 copies of code 9
    results = []
    for _ in range(2):
        quantizer = make_quantizer((2, 2, 5), 4, 10)
        before = quantizer.codebooks.detach().clone()
        assert quantizer.reset_dead_codes(counts, fraction=0.5, noise=0.1,
                                          generator=torch.Generator().manual_seed(3)) == 20
        results.append(quantizer.codebooks.detach().clone())
    assert torch.equal(results[0], results[1])
    jitter = results[0][:, :5] - before[:, 9:10]  # codes 0..4 are code 9 plus noise
    assert torch.equal(results[0][:, 5:], before[:, 5:])
    assert 0.05 < jitter.std().item() < 0.2 and jitter.abs().min() > 0


# --- usage statistics -----------------------------------------------------------------------------


def test_counts_usage_and_perplexity():
    ids = torch.tensor([[0, 2], [0, 1], [3, 1], [0, 1]])  # B=4, T=2
    usage = CodeUsage(2, 4)
    assert usage.summary() == {"codebook_usage": None, "dead_codes": 8, "perplexity": None}
    usage.add(ids[:2])
    usage.add(ids[2:])
    counts = usage.counts
    assert torch.equal(counts, torch.tensor([[3, 0, 0, 1], [0, 3, 1, 0]]))
    assert usage.summary()["dead_codes"] == 4 and usage.summary()["codebook_usage"] == pytest.approx(0.5)
    assert codebook_usage(counts) == pytest.approx(0.5)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert perplexity(counts) == pytest.approx(math.exp(entropy))
    assert perplexity(torch.ones(3, 8, dtype=torch.int64)) == pytest.approx(8.0)
