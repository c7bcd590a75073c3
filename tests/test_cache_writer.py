import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from revq_pipe.cache.reader import LatentCache
from revq_pipe.cache.schema import CacheError
from revq_pipe.cache.writer import CacheWriter
from tests.helpers_cache import (RECIPE, SHAPE, SOURCE, VAE, ThreadRanks, build_store, make_inputs, open_writer,
                                 store_files, write_units)

N = 23  # 5 units of 5 inputs, the last one short


def test_round_trip_keeps_values_order_labels_keys_and_skips(tmp_path):
    build_store(tmp_path / "s.zarr", N)
    latents, labels, keys, skipped = make_inputs(N)
    good = [i for i in range(N) if i not in skipped]
    cache = LatentCache.open(tmp_path / "s.zarr")
    stored = cache.load_latents()
    assert stored.dtype.is_floating_point and stored.element_size() == 2 and tuple(stored.shape) == (len(good), *SHAPE)
    assert np.array_equal(stored.numpy(), latents[good].astype(np.float16))
    assert np.array_equal(cache.labels(), labels[good].astype(np.int32))
    assert cache.keys() == [keys[i] for i in good]
    attrs = dict(zarr.open_group(tmp_path / "s.zarr", mode="r").attrs)
    assert attrs["complete"] is True and attrs["num_samples"] == len(good) and attrs["num_inputs"] == N
    assert attrs["skipped"] == {"count": len(skipped), "keys": [keys[i] for i in sorted(skipped)],
                                "reasons": ["truncated file"] * len(skipped)}
    assert attrs["vae"]["weights_sha256"] == "ab" * 32 and attrs["image"]["resolution"] == 16
    assert attrs["latent_dtype"] == "float16" and attrs["chunk_size"] == 5
    assert not (tmp_path / "s.zarr" / "_staging").exists()


def test_stats_match_numpy_float64_over_the_stored_array(tmp_path):
    build_store(tmp_path / "s.zarr", N)
    cache = LatentCache.open(tmp_path / "s.zarr")
    ref = cache.load_latents().numpy().astype(np.float64)
    np.testing.assert_allclose(cache.mean.numpy(), ref.mean(0), rtol=1e-6)
    np.testing.assert_allclose(cache.std.numpy(), ref.std(0), rtol=1e-6)
    assert cache.mean.dtype == cache.std.dtype == __import__("torch").float32


def test_float32_on_request(tmp_path):
    build_store(tmp_path / "s.zarr", N, latent_dtype="float32")
    latents, _, _, skipped = make_inputs(N)
    stored = LatentCache.open(tmp_path / "s.zarr").load_latents()
    assert np.array_equal(stored.numpy(), latents[[i for i in range(N) if i not in skipped]])


def test_two_ranks_write_the_same_bytes_as_one(tmp_path):
    build_store(tmp_path / "one.zarr", N)
    inputs = make_inputs(N)
    rank0 = open_writer(tmp_path / "two.zarr", N, create=True)
    rank1 = open_writer(tmp_path / "two.zarr", N, create=False)
    missing = rank0.missing_units()  # one listing, shared by the ranks
    assert rank0.pending_units(0, 2, missing) == [0, 2, 4] and rank1.pending_units(1, 2, missing) == [1, 3]
    write_units(rank1, inputs, rank1.pending_units(1, 2, missing))
    write_units(rank0, inputs, rank0.pending_units(0, 2, missing))
    rank0.finalize()
    assert store_files(tmp_path / "one.zarr") == store_files(tmp_path / "two.zarr")


def test_what_a_partial_run_left_is_spread_over_the_ranks_of_the_next(tmp_path):
    # units 0, 1 and 3 of 8 were staged by an earlier run: five remain, shared 3 + 2, not by u % world_size
    writer = open_writer(tmp_path / "s.zarr", 40)
    write_units(writer, make_inputs(40), [0, 1, 3])
    missing = writer.missing_units()
    assert missing == [2, 4, 5, 6, 7]
    assert [writer.pending_units(r, 2, missing) for r in (0, 1)] == [[2, 5, 7], [4, 6]]


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_assemble_the_store_in_parallel_to_the_same_bytes(tmp_path, monkeypatch, world_size):
    """Every rank writes a share of the chunks and summarizes a share of the units; skipped inputs make the
    units' rows straddle chunks, and small merge blocks make the statistics' merge tree deep."""
    monkeypatch.setattr("revq_pipe.cache.staging.STATS_BLOCK_UNITS", 3)
    monkeypatch.setattr("revq_pipe.cache.staging.WRITE_BLOCK_CHUNKS", 2)
    n, inputs = 200, make_inputs(200)

    def encode(path, ranks):
        writer = open_writer(path, n)
        write_units(writer, inputs, writer.pending_units(0, 1))
        return ranks.run(lambda rank: writer.finalize(ignored=["notes.txt"], collective=rank))

    one = encode(tmp_path / "one.zarr", ThreadRanks(1))[0]
    many = encode(tmp_path / "many.zarr", ThreadRanks(world_size))
    assert all(m.to_attrs() == one.to_attrs() for m in many)
    assert store_files(tmp_path / "one.zarr") == store_files(tmp_path / "many.zarr")
    cache = LatentCache.open(tmp_path / "many.zarr")
    latents, _, _, skipped = inputs
    assert np.array_equal(cache.load_latents().numpy(), latents[[i for i in range(n) if i not in skipped]].astype(np.float16))


def test_resume_after_an_error_inside_write_unit_is_bit_identical(tmp_path):
    build_store(tmp_path / "ref.zarr", N)
    inputs = make_inputs(N)
    writer = open_writer(tmp_path / "s.zarr", N)
    write_units(writer, inputs, [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        bad = list(inputs)
        bad[0] = inputs[0].copy()
        bad[0][11] = np.nan
        write_units(writer, bad, [2])
    with pytest.raises(CacheError, match="incomplete"):
        LatentCache.open(tmp_path / "s.zarr")
    resumed = open_writer(tmp_path / "s.zarr", N)
    assert resumed.pending_units(0, 1) == [2, 3, 4] and resumed.num_staged == 2
    write_units(resumed, inputs, resumed.pending_units(0, 1))
    resumed.finalize()
    assert store_files(tmp_path / "ref.zarr") == store_files(tmp_path / "s.zarr")


KILLED_WRITER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from tests import helpers_cache as h
calls = []
real_fsync = os.fsync
def fsync_then_die(fd):
    calls.append(fd)
    if len(calls) == 3:  # SIGKILL while unit 2 is written: its temp file is left behind
        os.kill(os.getpid(), signal.SIGKILL)
    real_fsync(fd)
os.fsync = fsync_then_die
writer = h.open_writer({path!r}, {n})
h.write_units(writer, h.make_inputs({n}), writer.pending_units(0, 1))
"""


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    build_store(tmp_path / "ref.zarr", N)
    store = tmp_path / "s.zarr"
    here = Path(__file__).resolve().parent
    script = KILLED_WRITER.format(root=str(here.parent), path=str(store), n=N)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    staged = sorted(p.name for p in (store / "_staging").iterdir())
    assert staged[0].startswith(".unit_000002.") and staged[1:] == ["unit_000000.npz", "unit_000001.npz"]
    writer = open_writer(store, N)
    assert writer.pending_units(0, 1) == [2, 3, 4]
    write_units(writer, make_inputs(N), writer.pending_units(0, 1))
    writer.finalize()
    assert store_files(tmp_path / "ref.zarr") == store_files(store)


def test_crash_inside_finalize_is_recovered_by_rerunning(tmp_path, monkeypatch):
    build_store(tmp_path / "ref.zarr", N)
    writer = open_writer(tmp_path / "s.zarr", N)
    write_units(writer, make_inputs(N), writer.pending_units(0, 1))
    real = zarr.Group.create_array

    def fail_on_std(self, name, **kwargs):
        if name == "std":
            raise OSError("disk full")
        return real(self, name, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", fail_on_std)
    with pytest.raises(OSError):
        writer.finalize()
    monkeypatch.undo()
    with pytest.raises(CacheError, match="rerun `revq-pipe encode` with the same arguments"):
        LatentCache.open(tmp_path / "s.zarr")
    again = open_writer(tmp_path / "s.zarr", N)
    assert again.pending_units(0, 1) == []
    again.finalize()
    assert store_files(tmp_path / "ref.zarr") == store_files(tmp_path / "s.zarr")


def test_non_empty_target_refused_without_overwrite(tmp_path):
    build_store(tmp_path / "s.zarr", N)
    with pytest.raises(CacheError, match="already holds a complete 'train' cache.*--overwrite"):
        open_writer(tmp_path / "s.zarr", N)
    first = LatentCache.open(tmp_path / "s.zarr").load_latents()
    build_store(tmp_path / "s.zarr", N, seed=1, overwrite=True)
    assert not LatentCache.open(tmp_path / "s.zarr").load_latents().equal(first)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not a Zarr store"):
        open_writer(other, N, overwrite=True)
    assert (other / "notes.txt").exists()


OTHER_VAE = {"source": "x", "class": "AutoencoderDC", "weights_sha256": "0"}


@pytest.mark.parametrize("change", [dict(num_inputs=24), dict(chunk_size=4), dict(latent_dtype="float32"),
                                    dict(split="val"), dict(latent_shape=(4, 3, 2)), dict(vae_identity=OTHER_VAE),
                                    dict(image_recipe={**RECIPE, "resolution": 32}), dict(source="/data/images/val")])
def test_unfinished_store_with_other_spec_refused(tmp_path, change):
    writer = open_writer(tmp_path / "s.zarr", N)
    write_units(writer, make_inputs(N), [0])
    n = change.pop("num_inputs", N)
    with pytest.raises(CacheError, match="other settings.*--overwrite"):
        open_writer(tmp_path / "s.zarr", n, **change)
    with pytest.raises(CacheError, match="other settings"):
        open_writer(tmp_path / "s.zarr", n, create=False, **change)
    fresh = open_writer(tmp_path / "s.zarr", n, overwrite=True, **change)
    assert fresh.num_staged == 0


def test_an_unfinished_store_of_an_older_version_resumes_or_is_refused_with_the_way_out(tmp_path):
    """Older versions opened a store with source None (they recorded it at finalize): such a store resumes, and
    the finished store records the images it came from. A staged format they wrote and this one does not read is
    refused naming --overwrite, not "the original settings", which cannot help."""
    inputs = make_inputs(N)
    writer = open_writer(tmp_path / "old.zarr", N, source=None)
    write_units(writer, inputs, [0, 1])
    resumed = open_writer(tmp_path / "old.zarr", N)
    assert resumed.num_staged == 2
    write_units(resumed, inputs, resumed.pending_units(0, 1))
    assert resumed.finalize().source == SOURCE
    build_store(tmp_path / "fresh.zarr")
    assert store_files(tmp_path / "old.zarr") == store_files(tmp_path / "fresh.zarr")

    writer = open_writer(tmp_path / "v0.zarr", N)
    write_units(writer, inputs, [0])
    zarr.open_group(tmp_path / "v0.zarr", mode="r+").attrs["format_version"] = 0
    with pytest.raises(CacheError, match=r"format version 0, started by an older revq-pipe.*pass --overwrite"):
        open_writer(tmp_path / "v0.zarr", N)


@pytest.mark.parametrize("bad, match", [
    (dict(num_inputs=0), "num_inputs=0"), (dict(latent_shape=(4, 2)), "latent_shape"),
    (dict(split="tr/ain"), "split='tr/ain'"), (dict(chunk_size=0), "chunk_size=0"),
    (dict(latent_dtype="bfloat16"), "latent_dtype='bfloat16'"), (dict(vae_identity={"source": "x"}), "vae_identity"),
])
def test_arguments_validated_before_touching_disk(tmp_path, bad, match):
    n = bad.pop("num_inputs", N)
    with pytest.raises(ValueError, match=match):
        open_writer(tmp_path / "s.zarr", n, **bad)
    assert not (tmp_path / "s.zarr").exists()


def test_write_unit_and_finalize_validation(tmp_path):
    writer = open_writer(tmp_path / "s.zarr", N)
    latents, labels, keys, _ = make_inputs(N)
    with pytest.raises(ValueError, match="4 latents \\+ 0 skipped != 5"):
        writer.write_unit(0, latents[:4], labels[:4], keys[:4], [])
    with pytest.raises(ValueError, match="beyond the float16 range.*float32"):
        writer.write_unit(0, latents[:5] * 1e5, labels[:5], keys[:5], [])
    with pytest.raises(ValueError, match="unit 9 is out of range"):
        writer.unit_range(9)
    with pytest.raises(CacheError, match="5 of 5 units .* not written yet"):
        writer.finalize()
    assert os.listdir(tmp_path / "s.zarr" / "_staging") == []


def test_completed_finds_only_a_finished_store_with_the_same_spec(tmp_path):
    spec = dict(num_inputs=23, latent_shape=SHAPE, split="train", vae_identity=VAE, image_recipe=RECIPE, source=SOURCE,
                chunk_size=5)
    assert CacheWriter.completed(tmp_path / "s", **spec) is None  # nothing there yet
    writer = open_writer(tmp_path / "s", 23)
    assert CacheWriter.completed(tmp_path / "s", **spec) is None  # unfinished
    write_units(writer, make_inputs(23), writer.pending_units(0, 1))
    writer.finalize()
    assert CacheWriter.completed(tmp_path / "s", **spec).num_samples == 23 - 3
    assert CacheWriter.completed(tmp_path / "s", **{**spec, "split": "val"}) is None
    assert CacheWriter.completed(tmp_path / "s", **{**spec, "source": "/data/other"}) is None  # other images


def test_a_refusal_names_each_difference_whole_paths_and_short_hashes(tmp_path):
    build_store(tmp_path / "s.zarr", N)
    other_vae = {**VAE, "weights_sha256": "cd" * 32}
    with pytest.raises(CacheError) as refused:
        open_writer(tmp_path / "s.zarr", N, vae_identity=other_vae, source="/data/images/train-2026-12-02/imagenet/"
                    "ILSVRC2012_img_train_resized_to_256_px")
    message = str(refused.value)
    assert "vae.weights_sha256: 'abababababab...' -> 'cdcdcdcdcdcd...'" in message  # only the entry that differs
    assert "vae.source" not in message and "chunk_size" not in message
    assert ("source: '/data/images/train' -> '/data/images/train-2026-12-02/imagenet/ILSVRC2012_img_train_resized_"
            "to_256_px'") in message  # a path whole, however long
