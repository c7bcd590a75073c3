"""`revq-pipe tokens export`: every format reads back to the store's ids and labels; the flat id mapping."""

from __future__ import annotations

import json

import numpy as np
import pytest

from revq_pipe.cache.token_store import flat_ids, per_position_ids
from revq_pipe.stages.token_export import run_token_export
from tests.helpers_tokens import CODEBOOK_SIZE, NUM_TOKENS, save_tiny_tokenizer, write_token_store

NUM_IMAGES, NUM_VIEWS = 21, 2  # 21 images: the last unit of 16 is partial


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CODEBOOK_SIZE, (NUM_IMAGES, NUM_VIEWS, NUM_TOKENS))
    labels = rng.integers(-1, 3, NUM_IMAGES)
    return write_token_store(folder / "t.zarr", ids, labels, save_tiny_tokenizer(folder), views=("original", "flip")), \
        ids, labels


def test_store_keeps_one_row_per_view_image_by_image(store):
    token_store, ids, labels = store
    assert token_store.num_images == NUM_IMAGES and token_store.num_samples == NUM_IMAGES * NUM_VIEWS
    assert np.array_equal(token_store.ids(), ids.reshape(-1, NUM_TOKENS))
    assert token_store.views().tolist() == [0, 1] * NUM_IMAGES and token_store.view_names == ["original", "flip"]
    assert token_store.labels().tolist() == np.repeat(labels, NUM_VIEWS).tolist()
    assert token_store.keys()[:4] == ["img0000", "img0000", "img0001", "img0001"]


def test_flat_ids_are_one_vocabulary_and_invert_exactly():
    ids = np.array([[0, 0, 7], [3, 5, 7]])
    flat = flat_ids(ids, 8)
    assert flat.tolist() == [[0, 8, 23], [3, 13, 23]]  # t * K + k: id 0 at positions 0 and 1 differ
    assert np.array_equal(per_position_ids(flat, 8), ids)
    assert flat_ids(np.zeros((1, 512), np.uint16), 16384).dtype == np.int32  # 512 x 16,384 = 8.4 M ids
    assert flat_ids(np.zeros((1, 256), np.uint16), 256).dtype == np.uint16  # 65,536 fit
    with pytest.raises(ValueError, match="belongs to position 0"):
        per_position_ids(np.array([[3, 3]]), 8)  # id 3 is position 0's, not position 1's
    with pytest.raises(ValueError, match="outside the codebook"):
        flat_ids(np.array([[8]]), 8)


@pytest.mark.parametrize("flat", [False, True], ids=["per-position", "flat"])
def test_npy_export_reads_back_to_the_same_ids_and_labels(store, tmp_path, flat):
    token_store, ids, labels = store
    paths = run_token_export(str(token_store.path), fmt="npy", out=str(tmp_path / "codes.npy"), flat=flat,
                             overwrite=False)
    codes = np.load(tmp_path / "codes.npy")
    meta = json.loads((tmp_path / "codes.meta.json").read_text())
    assert codes.shape == (NUM_IMAGES, NUM_VIEWS, NUM_TOKENS) and meta["shape"] == list(codes.shape)
    assert np.array_equal(per_position_ids(codes, CODEBOOK_SIZE) if flat else codes, ids)
    assert np.load(tmp_path / "codes.labels.npy").tolist() == labels.tolist()
    assert meta["ids"] == ("flat" if flat else "per-position") and meta["views"] == ["original", "flip"]
    assert meta["vocabulary_size"] == (NUM_TOKENS * CODEBOOK_SIZE if flat else CODEBOOK_SIZE)
    assert meta["store"]["tokenizer"] == token_store.attrs["tokenizer"] and paths["labels"].name == "codes.labels.npy"


@pytest.mark.parametrize("flat", [False, True], ids=["per-position", "flat"])
def test_jsonl_export_reads_back_to_the_same_ids_and_labels(store, tmp_path, flat):
    token_store, ids, labels = store
    run_token_export(str(token_store.path), fmt="jsonl", out=str(tmp_path / "tokens.jsonl"), flat=flat,
                     overwrite=False)
    rows = [json.loads(line) for line in (tmp_path / "tokens.jsonl").read_text().splitlines()]
    assert len(rows) == NUM_IMAGES * NUM_VIEWS
    tokens = np.array([row["tokens"] for row in rows]).reshape(NUM_IMAGES, NUM_VIEWS, NUM_TOKENS)
    assert np.array_equal(per_position_ids(tokens, CODEBOOK_SIZE) if flat else tokens, ids)
    assert [row["class_id"] for row in rows[::NUM_VIEWS]] == labels.tolist()
    assert [row["view"] for row in rows[:2]] == ["original", "flip"] and rows[2]["key"] == "img0001"


def test_an_identical_export_is_a_no_op_and_another_needs_overwrite(store, tmp_path):
    token_store = store[0]
    out = tmp_path / "codes.npy"
    run_token_export(str(token_store.path), fmt="npy", out=str(out), flat=False, overwrite=False)
    before = out.stat().st_mtime_ns
    run_token_export(str(token_store.path), fmt="npy", out=str(out), flat=False, overwrite=False)
    assert out.stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_token_export(str(token_store.path), fmt="npy", out=str(out), flat=True, overwrite=False)
    run_token_export(str(token_store.path), fmt="npy", out=str(out), flat=True, overwrite=True)
    assert json.loads((tmp_path / "codes.meta.json").read_text())["ids"] == "flat"
    with pytest.raises(ValueError, match="should end in .jsonl"):
        run_token_export(str(token_store.path), fmt="jsonl", out=str(out), flat=False, overwrite=False)
