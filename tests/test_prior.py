"""The token prior: causal, the KV cache samples what recomputing the prefix samples, no parameter grows with K,
guidance; `prior train` learns class-dependent tokens, resumes exactly after a crash, computes on 2 ranks what
1 rank computes, refuses what it cannot do; `prior sample` and `prior eval` end to end through a tiny VAE."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from revq_pipe.pipeline.prior import PriorSpec, TokenPrior
from revq_pipe.stages.config import load_config
from revq_pipe.stages.grid import GAP, display_scale
from revq_pipe.stages.prior import TokenRows, load_prior, local_batch_size, run_prior_train
from revq_pipe.stages.prior_eval import run_prior_eval
from revq_pipe.stages.prior_sample import run_prior_sample
from revq_pipe.stages.tokenize import run_tokenize
from tests.helpers_eval import make_eval_setup
from tests.helpers_processes import one_thread, run_ranks
from tests.helpers_tokens import (CODEBOOK_SIZE, NUM_CLASSES, NUM_TOKENS, class_pattern, class_patterned_ids,
                                  save_tiny_tokenizer, write_token_store)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY = ["prior.width=32", "prior.depth=2", "prior.heads=2", "prior.code_width=16", "prior.epochs=6",
        "prior.batch_size=32", "prior.lr=1e-2", "prior.warmup_steps=4", "prior.log_every=0", "prior.device=cpu"]
TIMING_FIELDS = {"tokens_per_s", "elapsed_s"}


def tiny_prior(codebook_size: int = CODEBOOK_SIZE, seed: int = 0) -> TokenPrior:
    spec = PriorSpec(num_tokens=NUM_TOKENS, codebook_size=codebook_size, token_dim=2, num_classes=NUM_CLASSES,
                     width=32, depth=2, heads=4, code_width=16)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TokenPrior(spec, torch.randn(NUM_TOKENS, codebook_size, 2, generator=generator)).eval()


# --- the model ---------------------------------------------------------------------------------


def test_logits_are_causal():
    prior = tiny_prior()
    ids = torch.randint(0, CODEBOOK_SIZE, (4, NUM_TOKENS), generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([0, 1, 2, 3])  # 3 is the null class
    changed = ids.clone()
    changed[:, 4] = (changed[:, 4] + 1) % CODEBOOK_SIZE
    before, after = prior(ids, classes), prior(changed, classes)
    assert torch.equal(before[:, :5], after[:, :5]), "token 4 must not change the logits of tokens 0..4"
    assert not torch.allclose(before[:, 5:], after[:, 5:]), "token 4 must inform the tokens after it"


def test_the_kv_cache_samples_what_recomputing_the_prefix_samples():
    prior = tiny_prior()
    classes = torch.tensor([0, 1, 2, 0, 1])
    greedy = prior.generate(classes, top_k=1, use_cache=True)
    assert torch.equal(greedy, prior.generate(classes, top_k=1, use_cache=False))
    assert torch.equal(prior(greedy, classes).argmax(-1), greedy), "greedy ids are the argmax of their own logits"
    for cfg_scale in (1.0, 3.0):
        cached = prior.generate(classes, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(1))
        recomputed = prior.generate(classes, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(1),
                                    use_cache=False)
        assert torch.equal(cached, recomputed)


def test_guidance_zero_samples_the_null_class():
    prior = tiny_prior()
    classes = torch.tensor([0, 1, 2])
    unguided = prior.generate(torch.full_like(classes, prior.spec.null_class), top_k=1)
    assert torch.equal(prior.generate(classes, cfg_scale=0.0, top_k=1), unguided)
    assert not torch.equal(prior.generate(classes, top_k=1), unguided)


def test_no_parameter_grows_with_the_codebook():
    small, large = tiny_prior(8), tiny_prior(4096)
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in large.parameters())
    assert large.codebooks.shape == (NUM_TOKENS, 4096, 2) and not large.codebooks.requires_grad


@pytest.mark.parametrize("preset", ["prior-demo", "prior-512T"])
def test_prior_presets_parse_and_build_with_parameters_independent_of_K(preset):
    cfg = load_config(CONFIGS / f"{preset}.yaml")
    pc = cfg.prior
    tokens, codes, classes = {"prior-demo": (256, 256, 8), "prior-512T": (512, 16384, 1000)}[preset]

    def parameters(k: int) -> int:
        spec = PriorSpec(num_tokens=tokens, codebook_size=k, token_dim=2048 // tokens, num_classes=classes,
                         width=pc.width, depth=pc.depth, heads=pc.heads, code_width=pc.code_width)
        with torch.device("meta"):  # shapes only
            return sum(p.numel() for p in TokenPrior(spec, torch.zeros(tokens, k, 2048 // tokens)).parameters())

    assert parameters(codes) == parameters(1), "no parameter may grow with the codebook size K"
    assert pc.batch_size % 8 == 0 and "{root}" not in pc.run  # a global batch that 1, 2, 4 or 8 ranks divide


# --- training ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prior")
    tokenizer = save_tiny_tokenizer(folder)
    train = write_token_store(folder / "train.zarr", *class_patterned_ids(384, 0), tokenizer)
    val = write_token_store(folder / "val.zarr", *class_patterned_ids(96, 1), tokenizer)
    return train.path, val.path


def prior_overrides(stores, run: Path, *extra: str) -> list[str]:
    return [*TINY, f"prior.train_tokens={stores[0]}", f"prior.val_tokens={stores[1]}", f"prior.run={run}", *extra]


def prior_config(stores, run: Path, *extra: str):
    return load_config(None, prior_overrides(stores, run, *extra), {})


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in rows]


def test_the_prior_learns_class_dependent_tokens(stores, tmp_path):
    run = run_prior_train(prior_config(stores, tmp_path / "run"))
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == list(range(1, 7)) and metrics[-1]["step"] == 6 * 12  # 384 rows / 32
    raw = NUM_TOKENS * np.log2(CODEBOOK_SIZE)  # 24 bits
    assert metrics[0]["tokenizer_bits_per_image"] == pytest.approx(raw)
    assert metrics[-1]["val_bits_per_image"] < 0.5 * raw < metrics[0]["train_bits_per_image"]
    prior, provenance = load_prior(run, torch.device("cpu"))
    assert provenance["train_tokens"] == str(stores[0]) and prior.spec.num_classes == NUM_CLASSES
    for c in range(NUM_CLASSES):  # the most likely tokens of class c are its pattern, not another class's
        greedy = prior.generate(torch.tensor([c]), top_k=1)[0].numpy()
        assert (greedy == class_pattern(c)).mean() >= 0.75, (c, greedy, class_pattern(c))

    run_prior_train(prior_config(stores, tmp_path / "run"))  # finished: a no-op
    assert read_metrics(run) == metrics


def test_resume_after_a_crash_mid_epoch_is_exact(stores, tmp_path, monkeypatch):
    straight = run_prior_train(prior_config(stores, tmp_path / "straight"))
    original = TokenRows.epoch_batches

    def crash_in_epoch_2(self, *args, **kwargs):
        for taken, batch in enumerate(original(self, *args, **kwargs)):
            if kwargs["epoch"] == 1 and taken == 5:
                raise KeyboardInterrupt("simulated crash")
            yield batch

    monkeypatch.setattr(TokenRows, "epoch_batches", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_prior_train(prior_config(stores, tmp_path / "crashed"))
    assert len(read_metrics(tmp_path / "crashed")) == 1 and not (tmp_path / "crashed" / "prior").exists()
    monkeypatch.setattr(TokenRows, "epoch_batches", original)
    resumed = run_prior_train(prior_config(stores, tmp_path / "crashed"))
    assert without_timing(read_metrics(resumed)) == without_timing(read_metrics(straight))
    assert (resumed / "prior" / "model.safetensors").read_bytes() == \
        (straight / "prior" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_two_ranks_compute_what_one_rank_computes(stores, tmp_path):
    overrides = prior_overrides(stores, tmp_path / "two", "prior.epochs=2")
    command = [sys.executable, "-m", "revq_pipe.stages.cli", "prior", "train", *(a for s in overrides for a in ("--set", s))]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    two = run_ranks(command, env, nproc=2, cwd=REPO)
    assert two.returncode == 0, two.stderr[-3000:]
    with one_thread():
        one = run_prior_train(prior_config(stores, tmp_path / "one", "prior.epochs=2"))
    for a, b in zip(read_metrics(one), read_metrics(tmp_path / "two"), strict=True):
        assert a["step"] == b["step"]  # the global batch of 32 is 16 rows on each rank
        for key in ("train_bits_per_image", "val_bits_per_image", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key


def test_a_global_batch_that_does_not_divide_across_ranks_is_refused():
    assert local_batch_size(64, 4) == 16
    with pytest.raises(ValueError, match=r"prior.batch_size=30 .* 4 ranks; choose a multiple of 4"):
        local_batch_size(30, 4)


def test_refusals_before_anything_is_written(stores, tmp_path):
    run = tmp_path / "run"
    run_prior_train(prior_config(stores, run, "prior.epochs=1"))
    with pytest.raises(ValueError, match=r"changed: prior.width: 32 -> 64"):
        run_prior_train(prior_config(stores, run, "prior.epochs=2", "prior.width=64"))
    with pytest.raises(ValueError, match="more than the 384 rows"):
        run_prior_train(prior_config(stores, tmp_path / "big", "prior.batch_size=512"))
    other = write_token_store(tmp_path / "other.zarr", *class_patterned_ids(16, 2), save_tiny_tokenizer(tmp_path, 1))
    with pytest.raises(ValueError, match="different tokenizers"):
        run_prior_train(prior_config(stores, tmp_path / "mixed", f"prior.val_tokens={other.path}"))
    assert not (tmp_path / "big").exists() and not (tmp_path / "mixed").exists()


# --- sampling and evaluation through a VAE ----------------------------------------------------------------


@pytest.mark.slow
def test_sample_and_eval_through_the_tokenizer_the_tokens_came_from(tmp_path):
    setup = make_eval_setup(tmp_path)  # a tiny VAE, 12 images of 2 classes, a tokenizer with T=16, K=8
    flip = load_config(None, [], {**_flat(setup.cfg), "tokenize.augment": "flip"})
    train = run_tokenize(flip, run=str(setup.run), split="train", images=str(setup.images), cache=None,
                         out=str(tmp_path / "train.zarr"), overwrite=False)
    val = run_tokenize(setup.cfg, run=str(setup.run), split="val", images=str(setup.images), cache=None,
                       out=str(tmp_path / "val.zarr"), overwrite=False)
    settings = {**_flat(setup.cfg), "prior.train_tokens": str(train), "prior.val_tokens": str(val),
                "prior.run": str(tmp_path / "prior"), "prior.batch_size": 8, "prior.epochs": 2,
                "prior.eval_samples_per_class": 4, "prior.cas_epochs": 2,
                "prior.num_workers": 0, "encode.num_workers": -1,  # prior eval decodes with its own setting
                **{k: v for k, v in (s.split("=") for s in TINY) if k not in ("prior.batch_size", "prior.epochs")}}
    cfg = load_config(None, [], settings)
    run = run_prior_train(cfg)

    out = run_prior_sample(cfg, run=str(run), num=4, class_id=None, seed=3)
    samples = np.load(out)
    assert samples["ids"].shape == (4, 16) and samples["ids"].dtype == np.uint16
    assert samples["class_ids"].tolist() == [0, 1, 0, 1]
    assert json.loads(out.with_suffix(".json").read_text())["tokenizer"]["dir"] == str((setup.run / "tokenizer").resolve())
    with Image.open(out.with_suffix(".png")) as grid:
        assert grid.height == 2 * 32 * display_scale(32) + GAP  # one labelled row per class
    again = run_prior_sample(cfg, run=str(run), num=4, class_id=None, seed=3)
    assert np.array_equal(np.load(again)["ids"], samples["ids"]), "seeded samples are reproducible"

    report = json.loads(run_prior_eval(cfg, run=str(run)).read_text())
    assert report["tokenizer_bits_per_image"] == pytest.approx(16 * 3) and np.isfinite(report["val_bits_per_image"])
    cas = report["cas"]
    assert (cas["num_classes"], cas["chance"], cas["classifier"]["train_images"]) == (2, 0.5, 12)
    assert all(0.0 <= cas[k] <= 1.0 for k in ("real_val", "samples", "random_tokens"))
    assert report["rfid"] is None and "FID Inception weights" in report["missing"]["rfid"]
    assert report["sampling"]["num_samples"] == 8 and Path(report["grid"]).is_file()


def _flat(cfg) -> dict:
    """A resolved config as flag values (section.key -> value), to build a variant of it."""
    from revq_pipe.stages.config import config_to_dict

    return {f"{section}.{key}": value for section, values in config_to_dict(cfg).items()
            for key, value in values.items()}


def test_the_real_images_of_an_unlabelled_source_stay_for_the_fid_and_only_classes_go_to_the_classifier(tmp_path):
    from revq_pipe.stages.prior_cas import load_images

    rng = np.random.default_rng(0)
    for folder, count in (("flat", 3), ("tree/a", 2), ("tree/b", 1)):
        (tmp_path / folder).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / folder / f"{i}.png")
    flat = load_images(str(tmp_path / "flat"), 16, limit=0, num_workers=0)
    assert flat.images.shape == (3, 3, 16, 16) and flat.labels.tolist() == [-1, -1, -1]
    assert len(flat.labelled().labels) == 0
    tree = load_images(str(tmp_path / "tree"), 16, limit=0, num_workers=0)
    assert sorted(tree.labelled().labels.tolist()) == [0, 0, 1]
