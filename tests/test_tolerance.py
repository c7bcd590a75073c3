"""`revq-pipe tolerance`: PSNR/SSIM vs latent noise, the tokenizer's points, JSON and PNG."""

from __future__ import annotations

import json

from PIL import Image

from revq_pipe.stages.tolerance import run_tolerance
from tests.helpers_eval import make_config, make_eval_setup


def test_tolerance_curve_and_tokenizer_points(tmp_path, monkeypatch):
    monkeypatch.delenv("REVQ_FID_WEIGHTS", raising=False)
    monkeypatch.delenv("REVQ_LPIPS_WEIGHTS", raising=False)
    setup = make_eval_setup(tmp_path)
    cfg = make_config(tmp_path, setup.vae, setup.images, **{"tolerance.sigmas": [0.1, 0.5, 2.0]})
    path = run_tolerance(cfg, run=str(setup.run), images=str(setup.images))
    assert path == setup.run / "tolerance.json"
    report = json.loads(path.read_text())
    assert report["num_images"] == 8  # tolerance.limit
    psnr = [point["psnr"] for point in report["curve"]]
    ssim = [point["ssim"] for point in report["curve"]]
    assert [p["sigma"] for p in report["curve"]] == [0.1, 0.5, 2.0]
    assert psnr[0] > psnr[1] > psnr[2], psnr
    assert ssim[0] > ssim[2], ssim
    for name in ("quantized", "rectified"):
        point = report["tokenizer_points"][name]
        assert point["sigma_effective"] > 0 and point["psnr"] > 0 and -1 <= point["ssim"] <= 1
        assert point["rfid"] is None
    assert "--fid-weights" in report["missing"]["rfid"]
    assert (setup.run / "tolerance.config.yaml").is_file()
    figure = Image.open(setup.run / "tolerance.png")
    assert figure.format == "PNG" and figure.size[0] > figure.size[1]

    again = json.loads(run_tolerance(cfg, run=str(setup.run), images=str(setup.images)).read_text())
    assert again["curve"] == report["curve"], "the seeded noise makes the analysis reproducible"


def test_tolerance_reads_its_own_section(tmp_path, monkeypatch):
    """The noise draw is tolerance.seed's (not train.seed's) and decoding uses tolerance.num_workers (not encode's)."""
    monkeypatch.delenv("REVQ_FID_WEIGHTS", raising=False)
    monkeypatch.delenv("REVQ_LPIPS_WEIGHTS", raising=False)
    setup = make_eval_setup(tmp_path)

    def curve(**settings):
        cfg = make_config(tmp_path, setup.vae, setup.images, **{"tolerance.sigmas": [0.5], "tolerance.limit": 4,
                                                                 **settings})
        return json.loads(run_tolerance(cfg, run=str(setup.run), images=str(setup.images)).read_text())["curve"]

    reference = curve()
    assert curve(**{"train.seed": 7, "encode.num_workers": -1}) == reference  # -1: no DataLoader takes it
    assert curve(**{"tolerance.seed": 7}) != reference
