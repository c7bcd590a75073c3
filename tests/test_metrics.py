"""Metric arithmetic against reference formulas and libraries; networks with random weights only."""

import hashlib

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from revq_pipe.pipeline.metrics import (
    LPIPS,
    FeatureStats,
    FidEvaluator,
    FIDInceptionV3,
    InceptionOutput,
    InceptionScoreStats,
    frechet_distance,
    load_fid_inception,
    load_lpips,
    psnr_rgb,
    psnr_y,
    ssim,
    try_load_fid_inception,
    try_load_lpips,
)

# ---- Frechet distance and feature statistics ------------------------------------------------


def _scipy_fid(mu1, s1, mu2, s2):
    """The pytorch-fid formula with scipy's sqrtm (non-singular inputs)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16))
    b = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(*args) == pytest.approx(_scipy_fid(*args), rel=1e-8)
    assert frechet_distance(args[0], args[1], args[0], args[1]) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_exact_for_singular_covariances():
    # Fewer samples than dimensions (as in small evaluations): with centred samples A, B,
    # tr sqrt(S1 S2) is the sum of singular values of A B^T / (n - 1), a small exact reference.
    rng = np.random.default_rng(1)
    a, b = np.abs(rng.normal(size=(10, 64))), np.abs(rng.normal(size=(10, 64))) + 0.1
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)  # rank 9
    centred_a, centred_b = a - a.mean(0), b - b.mean(0)
    trace_sqrt = np.linalg.svd(centred_a @ centred_b.T / 9, compute_uv=False).sum()
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert frechet_distance(a.mean(0), s1, b.mean(0), s2) == pytest.approx(expected, rel=1e-10)


def test_feature_stats_match_numpy_and_merge_exactly():
    rng = np.random.default_rng(2)
    feats = torch.from_numpy(rng.normal(size=(40, 6)) + 3.0).float()
    whole, part1, part2 = FeatureStats(6), FeatureStats(6), FeatureStats(6)
    whole.update(feats)
    part1.update(feats[:15])
    part2.update(feats[15:])
    for mine, theirs in zip(part1.tensors(), part2.tensors()):  # what an all-reduce (sum) of two ranks does
        mine += theirs
    mean, cov = whole.mean_and_covariance()
    np.testing.assert_allclose(mean, feats.double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(feats.double().numpy(), rowvar=False), rtol=1e-9)
    for merged, single in zip(part1.tensors(), whole.tensors()):
        torch.testing.assert_close(merged, single, rtol=1e-12, atol=1e-12)


# ---- FID / IS plumbing with a tiny stand-in feature network ---------------------------------


class TinyFeatures(nn.Module):
    """Linear stand-in: features are 2x2 average pools of the raw pixel values (12-d)."""

    feature_dim, num_classes = 12, 5

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(self.feature_dim, self.num_classes)

    def forward(self, images):
        features = nn.functional.adaptive_avg_pool2d(images.double(), 2).flatten(1)  # (B, 12)
        return InceptionOutput(features=features, logits=self.head(features.float()))


def _images(seed, n=24, size=8, high=200):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (n, 3, size, size), generator=generator, dtype=torch.uint8)


def test_fid_of_each_set_against_one_reference_identical_is_zero_and_a_shift_is_closed_form():
    real, shift = _images(0), 7  # every feature moves by 7, covariances unchanged: FID = 12 * 7^2
    evaluator = FidEvaluator(TinyFeatures(), ["same", "shifted"], splits=2)
    for batch in (real[:10], real[10:]):
        evaluator.update_real(batch)  # the reference set's features are extracted once for both sets
        evaluator.update_fake(batch, "same")
        evaluator.update_fake(batch + shift, "shifted")
    same, shifted = evaluator.compute("same"), evaluator.compute("shifted")
    assert same.fid == pytest.approx(0.0, abs=1e-7) and (same.num_real, same.num_fake) == (24, 24)
    assert shifted.fid == pytest.approx(12 * shift**2, rel=1e-7)
    assert same.inception_score is not None and same.missing == {} and shifted.missing == {}

    plain = FidEvaluator(TinyFeatures(), inception_score=False)
    plain.update_real(real)
    plain.update_fake(real + shift)
    result = plain.compute()
    assert result.fid == pytest.approx(12 * shift**2, rel=1e-7)
    assert result.inception_score is None and "not asked for" in result.missing["inception_score"]


class FeaturesOnly(nn.Module):
    """A feature network that gives plain (B, 12) features, no class logits, and no num_classes attribute."""

    feature_dim = 12

    def forward(self, images):
        return nn.functional.adaptive_avg_pool2d(images.double(), 2).flatten(1)


def test_a_network_without_logits_gives_the_fid_and_a_null_inception_score_and_names_are_checked():
    evaluator = FidEvaluator(FeaturesOnly(), ["tokenizer"], splits=2)  # sized for the Inception's 1,008 classes
    evaluator.update_real(_images(0))
    evaluator.update_fake(_images(0) + 3, "tokenizer")
    result = evaluator.compute("tokenizer")
    assert result.fid == pytest.approx(12 * 3**2, rel=1e-7)
    assert result.inception_score is None and result.missing == {"inception_score": "the feature network gives "
                                                                                    "no class logits"}
    with pytest.raises(ValueError, match=r"source='fake' is not one of the sets this evaluator compares: "
                                         r"\['tokenizer'\]"):
        evaluator.update_fake(_images(1), "fake")


def test_what_too_few_images_cannot_give_is_null_with_the_reason():
    evaluator = FidEvaluator(TinyFeatures(), splits=10)
    evaluator.update_real(_images(0, n=5))
    evaluator.update_fake(_images(1, n=1))
    result = evaluator.compute()
    assert result.fid is None and "at least 2 images in each set, got 5 reference and 1 fake" in result.missing["rfid"]
    assert result.inception_score is None and "at least 10 images" in result.missing["inception_score"]


def test_evaluator_state_sums_across_ranks():
    real, fake = _images(1), _images(2)
    net = TinyFeatures()
    single = FidEvaluator(net, splits=3)
    single.update_real(real)
    single.update_fake(fake)
    ranks = [FidEvaluator(net, splits=3) for _ in range(2)]
    for rank, evaluator in enumerate(ranks):  # rank r gets images r, r+2, ... with their global indices
        indices = torch.arange(rank, 24, 2)
        evaluator.update_real(real[indices])
        evaluator.update_fake(fake[indices], indices=indices)
    # What an all-reduce does: every state tensor summed over ranks.
    other_rank = iter(ranks[1].tensors())
    ranks[0].all_reduce_(lambda tensor: tensor.add_(next(other_rank)))
    for merged, whole in zip(ranks[0].tensors(), single.tensors()):
        torch.testing.assert_close(merged, whole, rtol=1e-12, atol=1e-9)
    merged, whole = ranks[0].compute(), single.compute()
    assert merged.fid == pytest.approx(whole.fid, rel=1e-9)
    assert merged.inception_score == pytest.approx(whole.inception_score, rel=1e-12)


def test_inception_score_closed_forms_and_reference():
    classes, splits = 4, 3
    # Confident predictions spread evenly over all classes in every split: IS = number of classes.
    labels = torch.arange(classes * splits) // splits
    stats = InceptionScoreStats(classes, splits)
    stats.update(100.0 * nn.functional.one_hot(labels, classes).double())
    mean, std = stats.compute()
    assert mean == pytest.approx(classes, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)

    uniform = InceptionScoreStats(classes, splits)
    uniform.update(torch.zeros(9, classes))
    assert uniform.compute()[0] == pytest.approx(1.0)

    # Random logits against the textbook per-split formula on the same split assignment.
    logits = torch.randn(30, classes, generator=torch.Generator().manual_seed(3)) * 2
    stats = InceptionScoreStats(classes, splits)
    stats.update(logits[:11])
    stats.update(logits[11:])
    probs = torch.softmax(logits.double(), 1).numpy()
    scores = []
    for s in range(splits):
        p = probs[np.arange(30) % splits == s]
        kl = (p * (np.log(p) - np.log(p.mean(0, keepdims=True)))).sum(1)
        scores.append(np.exp(kl.mean()))
    mean, std = stats.compute()
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-8)


# ---- PSNR and SSIM --------------------------------------------------------------------------


def test_psnr_closed_form():
    a = torch.full((2, 3, 16, 16), 100, dtype=torch.uint8)
    b = a.clone()
    b[0] += 10  # mse 100 on every channel
    rgb = psnr_rgb(a, b)
    assert rgb[0].item() == pytest.approx(10 * np.log10(255**2 / 100))
    assert torch.isinf(rgb[1])
    luma_step = 10 * (65.481 + 128.553 + 24.966) / 255  # Y difference of a grey step of 10
    assert psnr_y(a, b)[0].item() == pytest.approx(10 * np.log10(255**2 / luma_step**2))
    with pytest.raises(ValueError, match="uint8"):
        psnr_rgb(a.float(), b.float())


def _photo_pairs():
    data = pytest.importorskip("skimage.data")
    rng = np.random.default_rng(4)
    crops = [data.astronaut()[100:164, 180:244], data.chelsea()[80:144, 200:264]]
    clean = np.stack(crops)  # (2, 64, 64, 3)
    noisy = np.clip(clean + rng.normal(0, 12, clean.shape), 0, 255).round().astype(np.uint8)
    return clean, noisy


def test_ssim_matches_scikit_image_on_luma():
    structural_similarity = pytest.importorskip("skimage.metrics").structural_similarity
    clean, noisy = _photo_pairs()
    ours = ssim(torch.from_numpy(clean).permute(0, 3, 1, 2), torch.from_numpy(noisy).permute(0, 3, 1, 2))

    def luma(rgb):  # BT.601 studio swing on the 0..255 scale, written out independently
        rgb = rgb.astype(np.float64)
        return 16 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255

    for i in range(len(clean)):
        expected = structural_similarity(
            luma(clean[i]), luma(noisy[i]), gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=255,
        )
        assert ours[i].item() == pytest.approx(expected, abs=1e-4)
        assert 0.2 < expected < 0.99  # the pair is neither identical nor unrelated
    same = torch.from_numpy(clean).permute(0, 3, 1, 2)
    assert ssim(same, same).tolist() == pytest.approx([1.0, 1.0])


# ---- FID InceptionV3 ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception():
    torch.manual_seed(0)
    return FIDInceptionV3()


def test_inception_architecture_and_key_names(inception):
    # torchvision's InceptionV3 (with AuxLogits, 1000 classes) has 27,161,264 parameters; without the
    # aux head (3,326,696) and with the FID graph's 1008-way fc (+8 * 2049) that is 23,850,960.
    assert sum(p.numel() for p in inception.parameters()) == 23_850_960
    state = inception.state_dict()
    for key in ("Conv2d_1a_3x3.conv.weight", "Conv2d_4a_3x3.bn.running_var", "Mixed_5b.branch5x5_2.conv.weight",
                "Mixed_6e.branch7x7dbl_5.bn.bias", "Mixed_7a.branch7x7x3_4.conv.weight",
                "Mixed_7c.branch3x3dbl_3b.conv.weight", "Mixed_7c.branch_pool.conv.weight", "fc.bias"):
        assert key in state, key
    assert state["fc.weight"].shape == (1008, 2048)
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
    assert not any(key.startswith("AuxLogits") for key in state)


def test_inception_forward_shapes(inception):
    out = inception(_images(5, n=2, size=32))
    assert out.features.shape == (2, 2048) and out.logits.shape == (2, 1008)
    assert torch.isfinite(out.features).all() and out.features.dtype == torch.float32


def test_inception_weights_load_strictly_and_fail_clearly(inception, tmp_path, monkeypatch):
    path = tmp_path / "pt_inception.pth"
    state = {k: v for k, v in inception.state_dict().items() if k.startswith(("Conv2d_1a", "fc."))}
    torch.save(state, path)
    with pytest.raises(ValueError, match="not the FID InceptionV3 state_dict"):
        load_fid_inception(path)  # a partial file is incompatible, not silently half-loaded
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        load_fid_inception(tmp_path / "absent.pth")
    monkeypatch.delenv("REVQ_FID_WEIGHTS", raising=False)
    model, reason = try_load_fid_inception("")
    assert model is None and "REVQ_FID_WEIGHTS" in reason and "pt_inception-2015-12-05" in reason


def test_inception_full_round_trip(inception, tmp_path, monkeypatch):
    path = tmp_path / "weights.pth"
    torch.save(inception.state_dict(), path)
    monkeypatch.setenv("REVQ_FID_WEIGHTS", str(path))
    loaded, reason = try_load_fid_inception(None)
    assert reason is None
    assert loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    torch.testing.assert_close(loaded.Mixed_7c.branch_pool.conv.weight, inception.Mixed_7c.branch_pool.conv.weight)


# ---- LPIPS ----------------------------------------------------------------------------------


def _alexnet_file_state(model: LPIPS) -> dict:
    """What torchvision's alexnet-owt file holds: features.{0,3,6,8,10} plus the classifier."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("net."):
            _, _, index, kind = key.split(".")
            state[f"features.{index}.{kind}"] = value.clone()
    for index in (1, 4, 6):  # the classifier is ignored; tiny stand-ins keep the file small
        state[f"classifier.{index}.weight"] = torch.zeros(1)
        state[f"classifier.{index}.bias"] = torch.zeros(1)
    return state


def test_lpips_identity_and_both_weight_layouts(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = LPIPS()
    for k in range(5):  # the trained heads are non-negative, which makes the distance non-negative
        getattr(model, f"lin{k}").model[1].weight.abs_()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert torch.equal(model(x, x), torch.zeros(2))
    distance = model(x, y)
    assert distance.shape == (2,) and (distance > 0).all()
    torch.testing.assert_close(model(y, x), distance)
    as_uint8 = ((x + 1) * 127.5).round().to(torch.uint8)
    assert model(as_uint8, as_uint8).abs().max() == 0

    # (a) a full lpips.LPIPS state_dict: constants, heads under lin<k> and the lins.<k> alias.
    full = {"scaling_layer.shift": torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1),
            "scaling_layer.scale": torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)}
    full.update(model.state_dict())
    full.update({f"lins.{k}.model.1.weight": model.state_dict()[f"lin{k}.model.1.weight"] for k in range(5)})
    assert "net.slice2.3.weight" in full and full["lin0.model.1.weight"].shape == (1, 64, 1, 1)
    torch.save(full, tmp_path / "lpips_alex.pth")
    torch.testing.assert_close(load_lpips(tmp_path / "lpips_alex.pth")(x, y), distance)

    # (b) torchvision's AlexNet file next to lpips' alex.pth.
    directory = tmp_path / "lpips_dir"
    directory.mkdir()
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith("lin")}, directory / "alex.pth")
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        load_lpips(directory)
    torch.save(_alexnet_file_state(model), directory / "alexnet-owt-7be5be79.pth")
    monkeypatch.setenv("REVQ_LPIPS_WEIGHTS", str(directory))
    loaded, reason = try_load_lpips("")
    assert reason is None and set(loaded.weights_sha256) == {"alex.pth", "alexnet-owt-7be5be79.pth"}
    torch.testing.assert_close(loaded(x, y), distance)


def test_lpips_unavailable_without_weights(monkeypatch):
    monkeypatch.delenv("REVQ_LPIPS_WEIGHTS", raising=False)
    model, reason = try_load_lpips(None)
    assert model is None and "REVQ_LPIPS_WEIGHTS" in reason and "alex.pth" in reason
