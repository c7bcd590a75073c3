import numpy as np

from revq_pipe.cache.stats import MomentAccumulator


def test_matches_numpy_float64_and_survives_large_offsets():
    rng = np.random.default_rng(0)
    x = (rng.normal(0, 1e-2, size=(1000, 3, 2, 2)) + 1e3).astype(np.float32)  # mean >> std
    acc = MomentAccumulator()
    for part in np.array_split(x, 7):
        acc.update(part)
    ref = x.astype(np.float64)
    np.testing.assert_allclose(acc.mean(), ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(acc.std(), ref.std(0), rtol=1e-9)
    assert acc.count == 1000


def test_merge_is_order_defined_and_state_dict_round_trips():
    rng = np.random.default_rng(1)
    parts = [rng.normal(size=(n, 2, 1, 3)) for n in (5, 0, 9, 1)]
    a, b = MomentAccumulator(), MomentAccumulator()
    for p in parts:
        a.update(p)
        single = MomentAccumulator()
        single.update(p)
        b.merge(MomentAccumulator.from_state_dict(single.state_dict()))
    assert np.array_equal(a.mean(), b.mean()) and np.array_equal(a.std(), b.std())
