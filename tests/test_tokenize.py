"""`revq-pipe tokenize`: the token store, decode of exported ids = the evaluation's reconstruction, resume."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from revq_pipe.cache.reader import LatentCache
from revq_pipe.cache.schema import CacheError
from revq_pipe.cache.token_store import TokenStore, TokenWriter
from revq_pipe.pipeline.images import to_uint8
from revq_pipe.pipeline.tokenizer import RevqTokenizer
from revq_pipe.pipeline.vae import FrozenVAE
from revq_pipe.stages.datasets import open_image_dataset
from revq_pipe.stages.datasets import DecodedImages
from revq_pipe.stages.tokenize import run_tokenize
from tests.helpers_cache import ThreadRanks, store_files, write_units
from tests.helpers_eval import CODEBOOK_SIZE, NUM_GOOD_IMAGES, NUM_TOKENS, RESOLUTION, make_config


REPO = Path(__file__).resolve().parents[1]


def export(setup, out, cfg=None, split="val", cache=None) -> Path:
    """`revq-pipe tokenize` of the setup's images (or of the latent cache `cache`) into the token store `out`."""
    return run_tokenize(cfg or setup.cfg, run=str(setup.run), split=split, images=None if cache else str(setup.images),
                        cache=cache and str(cache), out=str(out), overwrite=False)


def test_export_from_images_decodes_to_the_evaluation_reconstruction(eval_setup, tmp_path):
    out = export(eval_setup, tmp_path / "{split}.zarr")
    assert out == tmp_path / "val.zarr" and (tmp_path / "val.config.yaml").is_file()
    store = TokenStore.open(out)
    ids = store.ids()
    assert ids.shape == (NUM_GOOD_IMAGES, NUM_TOKENS) and ids.dtype == np.uint16
    assert store.keys() == LatentCache.open(eval_setup.cache).keys()
    assert store.labels().tolist() == LatentCache.open(eval_setup.cache).labels().tolist()
    attrs = store.attrs
    assert attrs["complete"] and attrs["codebook_size"] == CODEBOOK_SIZE and attrs["skipped"]["count"] == 1
    assert len(attrs["layout"]["positions"]) == NUM_TOKENS and attrs["layout"]["latent_shape"] == [4, 4, 4]
    assert attrs["layout"]["positions"][1] == {"position": 1, "channel": 0, "row": 1, "col_start": 0, "col_stop": 4,
                                               "flat_start": 4, "flat_stop": 8, "num_rows": 1}
    assert len(attrs["tokenizer"]["model_sha256"]) == 64 and attrs["source"]["kind"] == "images"
    assert attrs["vae"] == LatentCache.open(eval_setup.cache).manifest.vae

    # decode(ids from the store) == the tokenizer reconstruction of the evaluation path, bit for bit
    vae = FrozenVAE.load(str(eval_setup.vae), device="cpu")
    tokenizer = RevqTokenizer.from_pretrained(eval_setup.run / "tokenizer", vae=vae, device="cpu")
    dataset = open_image_dataset(eval_setup.images)
    decoded = [DecodedImages(dataset, RESOLUTION)[i] for i in range(len(dataset))]
    rec = tokenizer.reconstruct(torch.stack([x for _, x, _ in decoded if x is not None]))
    assert torch.equal(torch.from_numpy(ids.astype(np.int64)), rec.latents.ids)
    assert torch.equal(to_uint8(tokenizer.decode(torch.from_numpy(ids.astype(np.int64)))), rec.tokenizer)

    # the identical export again is a no-op; another export into the same store is refused
    before = (out / "zarr.json").stat().st_mtime_ns
    assert export(eval_setup, out) == out
    assert (out / "zarr.json").stat().st_mtime_ns == before
    with pytest.raises(CacheError, match="--overwrite"):
        export(eval_setup, out, split="test")


def test_export_from_cache_matches_the_image_path_closely(eval_setup, tmp_path):
    from_images = export(eval_setup, tmp_path / "images.zarr")
    from_cache = export(eval_setup, tmp_path / "cache.zarr", cache=eval_setup.cache)
    cached = TokenStore.open(from_cache)
    assert cached.attrs["source"]["kind"] == "cache" and "float16" in cached.attrs["source"]["latent_dtype"]
    assert cached.keys() == TokenStore.open(from_images).keys()
    agreement = (cached.ids() == TokenStore.open(from_images).ids()).mean()
    assert agreement > 0.9  # float16-rounded latents may flip a few near-tie ids


def test_interrupted_export_resumes_to_the_same_store(eval_setup, tmp_path, monkeypatch):
    """Units of tokenize.chunk_size; encode's settings (a chunk size of 1, workers no DataLoader takes) never reach it."""
    cfg = make_config(eval_setup.run.parent, eval_setup.vae, eval_setup.images,
                      **{"tokenize.chunk_size": 5, "tokenize.batch_size": 3, "tokenize.num_workers": 0,
                         "encode.chunk_size": 1, "encode.num_workers": -1})
    whole = export(eval_setup, tmp_path / "whole.zarr", cfg=cfg)

    calls = []
    original_write_unit = TokenWriter.write_unit

    def write_unit(self, u, *args, crash_after=None, **kwargs):
        if crash_after is not None and len(calls) >= crash_after:
            raise KeyboardInterrupt("simulated crash")
        original_write_unit(self, u, *args, **kwargs)
        calls.append(u)

    monkeypatch.setattr(TokenWriter, "write_unit", lambda self, u, *a, **k: write_unit(self, u, *a, crash_after=1, **k))
    with pytest.raises(KeyboardInterrupt):
        export(eval_setup, tmp_path / "resumed.zarr", cfg=cfg)
    with pytest.raises(CacheError, match="incomplete"):
        TokenStore.open(tmp_path / "resumed.zarr")
    monkeypatch.setattr(TokenWriter, "write_unit", write_unit)
    resumed = export(eval_setup, tmp_path / "resumed.zarr", cfg=cfg)
    assert calls == [0, 1, 2]  # unit 0 before the crash, then only the missing units 1 and 2 (13 inputs / 5)
    assert TokenStore.open(resumed).attrs["chunk_size"] == 5
    assert np.array_equal(TokenStore.open(resumed).ids(), TokenStore.open(whole).ids())
    assert TokenStore.open(resumed).keys() == TokenStore.open(whole).keys()


def test_token_writer_checks_its_inputs(tmp_path):
    spec = dict(num_inputs=3, split="val", num_tokens=2, codebook_size=70000, layout={}, tokenizer={"dir": "t"},
                vae={"source": None}, source={"kind": "cache"}, augment={"name": "none", "views": ["original"]},
                chunk_size=2)
    writer = TokenWriter.open(tmp_path / "t.zarr", **spec)
    assert writer.attrs["ids_dtype"] == "int32"  # K > 65536 does not fit uint16
    with pytest.raises(ValueError, match="outside the codebook"):
        writer.write_unit(0, np.array([[[0, 70000]], [[1, 2]]]), np.array([0, 0]), ["a", "b"])
    with pytest.raises(ValueError, match="do not describe"):
        writer.write_unit(1, np.zeros((2, 1, 2)), np.zeros(2), ["c", "d"])  # unit 1 holds one input
    with pytest.raises(ValueError, match="1 views of 2 tokens"):
        writer.write_unit(0, np.zeros((2, 2)), np.zeros(2), ["a", "b"])  # ids without the view axis
    with pytest.raises(CacheError, match="units of .* are not written"):
        writer.finalize()
    with pytest.raises(CacheError, match="other settings"):
        TokenWriter.open(tmp_path / "t.zarr", **{**spec, "codebook_size": 8})
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not a Zarr store"):
        TokenWriter.open(tmp_path / "junk", **spec, overwrite=True)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_assemble_the_token_store_in_parallel_to_the_same_bytes(tmp_path, monkeypatch, world_size):
    """Every rank writes a share of the chunks (chunk_size images of V rows each) and summarizes a share of the
    units; skipped inputs make the units' rows straddle chunks, and small blocks make the merge tree deep."""
    monkeypatch.setattr("revq_pipe.cache.staging.STATS_BLOCK_UNITS", 3)
    monkeypatch.setattr("revq_pipe.cache.staging.WRITE_BLOCK_CHUNKS", 2)
    n, views, tokens, codes = 61, ["original", "flip"], 6, 300
    rng = np.random.default_rng(0)
    ids, labels = rng.integers(0, codes, (n, len(views), tokens)), rng.integers(-1, 4, n)
    keys, skipped = [f"img_{i:03d}" for i in range(n)], {i for i in range(n) if i % 5 == 2}
    spec = dict(num_inputs=n, split="train", num_tokens=tokens, codebook_size=codes, layout={}, tokenizer={"dir": "t"},
                vae={"source": None}, source={"kind": "images", "path": "/images"},
                augment={"name": "flip", "views": views}, chunk_size=4)

    def export_with(ranks, path):
        writer = TokenWriter.open(path, **spec)
        write_units(writer, (ids, labels, keys, skipped), writer.pending_units())
        return ranks.run(lambda rank: writer.finalize(collective=rank))

    one = export_with(ThreadRanks(1), tmp_path / "one.zarr")[0]
    writers, real_setitem = set(), zarr.Array.__setitem__

    def setitem(array, selection, value):  # which rank (thread) writes rows of the ids
        if array.basename == "ids":
            writers.add(threading.get_ident())
        real_setitem(array, selection, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", setitem)
    many = export_with(ThreadRanks(world_size), tmp_path / "many.zarr")
    assert len(writers) == world_size, "every rank writes its share of the chunks"
    assert all(attrs == one for attrs in many)
    assert store_files(tmp_path / "one.zarr") == store_files(tmp_path / "many.zarr")
    store, good = TokenStore.open(tmp_path / "many.zarr"), [i for i in range(n) if i not in skipped]
    assert (store.num_images, store.num_samples) == (len(good), 2 * len(good))
    assert np.array_equal(store.ids(), ids[good].reshape(-1, tokens))  # image by image, view by view
    assert store.keys() == [keys[i] for i in good for _ in views] and store.views().tolist() == [0, 1] * len(good)
    assert store.labels().tolist() == np.repeat(labels[good], 2).tolist()
    assert store.attrs["skipped"]["keys"] == [keys[i] for i in sorted(skipped)]


@pytest.mark.slow
def test_two_processes_through_the_cli_write_the_same_ids(eval_setup, tmp_path):
    # the real torchrun launcher here (the other multi-process tests start their ranks directly)
    # small units so both ranks get work; train.run via --set (torchrun would take "--run" for "--run-path")
    settings = [f"vae.source={eval_setup.vae}", "vae.device=cpu", f"data.resolution={RESOLUTION}",
                "tokenize.num_workers=0", "tokenize.chunk_size=4", "tokenize.batch_size=16", f"train.run={eval_setup.run}",
                f"paths.root={tmp_path}"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "revq_pipe.stages.cli", "tokenize", "--split", "val", "--images", str(eval_setup.images),
               "--out", str(tmp_path / "two.zarr")]
    command += [arg for s in settings for arg in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as torchrun:
        single = export(eval_setup, tmp_path / "one.zarr")  # while the ranks start
        _, stderr = torchrun.communicate(timeout=240)
    assert torchrun.returncode == 0, stderr[-3000:]
    two = TokenStore.open(tmp_path / "two.zarr")
    assert two.keys() == TokenStore.open(single).keys()
    assert np.array_equal(two.ids(), TokenStore.open(single).ids())


# --- augmented exports: every view of every image, one row per view (pipeline/views.py) ---------------


def test_views_are_the_flip_and_the_ten_crops_of_the_decoded_image():
    from revq_pipe.pipeline.views import view_set

    ten = view_set("ten-crop", 4)
    assert ten.source_resolution == 4 and ten.num_views == 10  # int(4 * 1.1) = 4: every crop is the whole image
    ten = view_set("ten-crop", 10)  # S = 11: crops at offsets 0 and 1, the centre at round(0.5) = 0
    image = torch.arange(3 * 11 * 11, dtype=torch.float32).view(1, 3, 11, 11)
    views = ten(image)[0]  # (10, 3, 10, 10)
    assert views.shape == (10, 3, 10, 10)
    corners = [views[v, 0, 0, 0].item() for v in range(5)]  # top-left pixel of tl, tr, bl, br, centre
    assert corners == [0.0, 1.0, 11.0, 12.0, 0.0]
    assert all(torch.equal(views[v + 5], views[v].flip(-1)) for v in range(5))
    assert ten.names[5] == "top-left-flip" and ten.describe()["num_views"] == 10
    flip = view_set("flip", 11)(image)[0]
    assert torch.equal(flip[0], image[0]) and torch.equal(flip[1], image[0].flip(-1))


def test_flip_export_stores_both_views_of_every_image(eval_setup, tmp_path):
    from revq_pipe.pipeline.views import view_set

    cfg = make_config(eval_setup.run.parent, eval_setup.vae, eval_setup.images, **{"tokenize.augment": "flip"})
    store = TokenStore.open(export(eval_setup, tmp_path / "flip.zarr", cfg=cfg))
    assert (store.num_images, store.num_samples, store.view_names) == (NUM_GOOD_IMAGES, 2 * NUM_GOOD_IMAGES,
                                                                       ["original", "flip"])
    assert store.views().tolist() == [0, 1] * NUM_GOOD_IMAGES and store.attrs["augment"]["name"] == "flip"
    keys = LatentCache.open(eval_setup.cache).keys()
    assert store.keys() == [k for k in keys for _ in range(2)] and store.attrs["source"]["classes"] == ["cats", "dogs"]

    # each row's ids are the tokenizer's ids of that view of its image
    vae = FrozenVAE.load(str(eval_setup.vae), device="cpu")
    tokenizer = RevqTokenizer.from_pretrained(eval_setup.run / "tokenizer", vae=vae, device="cpu")
    dataset = open_image_dataset(eval_setup.images)
    images = torch.stack([x for _, x, _ in (DecodedImages(dataset, RESOLUTION)[i] for i in range(len(dataset)))
                          if x is not None])
    expected = tokenizer.encode(view_set("flip", RESOLUTION)(images).flatten(0, 1))  # (2 N, T), image by image
    assert torch.equal(torch.from_numpy(store.ids().astype(np.int64)), expected)
    original = tokenizer.encode(images)
    assert torch.equal(torch.from_numpy(store.ids()[0::2].astype(np.int64)), original)
    assert not np.array_equal(store.ids()[0::2], store.ids()[1::2]), "a mirror image has other tokens"


def test_ten_crop_export_cuts_ten_views_from_a_larger_resize(eval_setup, tmp_path):
    from revq_pipe.pipeline.views import view_set

    views = view_set("ten-crop", RESOLUTION)
    cfg = make_config(eval_setup.run.parent, eval_setup.vae, eval_setup.images, **{"tokenize.augment": "ten-crop",
                                                                     "tokenize.batch_size": 20})
    store = TokenStore.open(export(eval_setup, tmp_path / "ten.zarr", cfg=cfg))
    assert store.num_samples == 10 * NUM_GOOD_IMAGES and store.attrs["augment"]["source_resolution"] == 35
    vae = FrozenVAE.load(str(eval_setup.vae), device="cpu")
    tokenizer = RevqTokenizer.from_pretrained(eval_setup.run / "tokenizer", vae=vae, device="cpu")
    dataset = open_image_dataset(eval_setup.images)
    first = DecodedImages(dataset, views.source_resolution)[0][1]  # (3, 35, 35): the recipe at S = int(1.1 R)
    expected = tokenizer.encode(views(first[None])[0])  # (10, T)
    assert torch.equal(torch.from_numpy(store.ids()[:10].astype(np.int64)), expected)


def test_a_latent_cache_cannot_be_augmented(eval_setup, tmp_path):
    cfg = make_config(eval_setup.run.parent, eval_setup.vae, eval_setup.images, **{"tokenize.augment": "flip"})
    with pytest.raises(ValueError, match="--augment flip needs images"):
        export(eval_setup, tmp_path / "c.zarr", cfg=cfg, cache=eval_setup.cache)
