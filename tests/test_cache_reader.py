import json

import numpy as np
import pytest
import torch
import zarr

from revq_pipe.cache.reader import LatentCache, cache_info
from revq_pipe.cache.schema import CacheError
from tests.helpers_cache import SHAPE, build_store, make_inputs, open_writer, write_units

N = 49  # 42 samples after skipping: 9 chunks of 5 rows, the last one short


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("reader") / "s.zarr"
    build_store(path, N)
    return path


def test_read_rows_returns_any_rows_in_the_order_asked(store):
    cache = LatentCache.open(store)
    stored = cache.load_latents()
    rows = np.array([17, 3, 40, 3 + 5, 0, 41])  # across chunks, unsorted
    picked = cache.read_rows(rows)
    assert picked.dtype == np.float16 and picked.shape == (6, *SHAPE)
    assert np.array_equal(picked, stored[torch.from_numpy(rows)].numpy())
    assert cache.read_rows(np.array([], dtype=np.int64)).shape == (0, *SHAPE)
    with pytest.raises(ValueError, match=r"rows range over \[0, 42\], outside the 42 latents"):
        cache.read_rows(np.array([0, 42]))


def test_incomplete_cache_refused_with_resume_hint(tmp_path):
    writer = open_writer(tmp_path / "s.zarr", N)
    write_units(writer, make_inputs(N), [0, 1])
    with pytest.raises(CacheError, match="incomplete.*rerun `revq-pipe encode` with the same arguments"):
        LatentCache.open(tmp_path / "s.zarr")
    info = cache_info(tmp_path / "s.zarr")
    assert info["complete"] is False and info["units_staged"] == 2 and info["units_total"] == 10


def test_missing_and_foreign_stores_refused(tmp_path):
    with pytest.raises(CacheError, match="no latent cache at .*revq-pipe encode"):
        LatentCache.open(tmp_path / "nothing.zarr")
    zarr.open_group(tmp_path / "other.zarr", mode="w").attrs["format"] = "something-else"
    with pytest.raises(CacheError, match="not a latent cache"):
        LatentCache.open(tmp_path / "other.zarr")


def test_future_format_version_refused(tmp_path):
    build_store(tmp_path / "s.zarr", 6)
    zarr.open_group(tmp_path / "s.zarr", mode="r+").attrs["format_version"] = 99
    with pytest.raises(CacheError, match="format version 99"):
        LatentCache.open(tmp_path / "s.zarr")


def test_check_compatible(tmp_path, store):
    cache = LatentCache.open(store)
    cache.check_compatible(cache)
    build_store(tmp_path / "kl.zarr", 6, vae_identity={"source": "x", "class": "AutoencoderKL", "weights_sha256": "1"})
    with pytest.raises(CacheError, match="VAE mismatch.*same VAE"):
        cache.check_compatible(LatentCache.open(tmp_path / "kl.zarr"))
    build_store(tmp_path / "big.zarr", 6, latent_shape=(4, 2, 4))
    with pytest.raises(CacheError, match="shape"):
        cache.check_compatible(LatentCache.open(tmp_path / "big.zarr"))


def test_cache_info_summarises(store):
    info = cache_info(store)
    json.dumps(info)
    cache = LatentCache.open(store)
    assert info["complete"] is True and info["num_samples"] == cache.num_samples
    assert info["storage"]["num_chunks"] == 9 and info["storage"]["chunk_shape"] == [5, *SHAPE]
    assert info["statistics"]["min_std"] == pytest.approx(float(cache.std.min()))
    assert info["labels"]["unknown"] == int((cache.labels() < 0).sum())
    assert info["bytes_on_disk"] > info["storage"]["latent_bytes_on_disk"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_latents_onto_gpu(store):
    cache = LatentCache.open(store)
    on_gpu = cache.load_latents("cuda")
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), cache.load_latents())
