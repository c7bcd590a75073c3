"""The embedded demo: deterministic image sets cut from scikit-image photos, and the demo VAE trainer."""

import json
import tarfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("skimage")

from revq_pipe.demo.images import DEMO_PHOTOS, IMAGE_SIZE, split_rows, write_demo_images  # noqa: E402
from revq_pipe.demo.vae_training import train_demo_vae  # noqa: E402

TRAIN_PER_PHOTO, VAL_PER_PHOTO = 3, 2


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "images"
    return out, write_demo_images(out, seed=0, train_per_photo=TRAIN_PER_PHOTO, val_per_photo=VAL_PER_PHOTO)


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_counts_and_layout(demo_images):
    out, summary = demo_images
    assert summary["num_train"] == TRAIN_PER_PHOTO * len(DEMO_PHOTOS)
    assert summary["num_val"] == VAL_PER_PHOTO * len(DEMO_PHOTOS)
    assert summary["classes"] == sorted(summary["classes"]) == [Path(f).stem for f in DEMO_PHOTOS]
    assert sorted(p.name for p in (out / "train").iterdir()) == summary["classes"]
    assert len(sorted(out.glob("shards/train-*.tar"))) == 4 and len(sorted(out.glob("shards/val-*.tar"))) == 4
    from PIL import Image

    with Image.open(next((out / "val").rglob("*.png"))) as img:
        assert img.mode == "RGB" and img.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_same_seed_same_bytes_and_rerun_is_skipped(demo_images, tmp_path):
    out, _ = demo_images
    again = write_demo_images(tmp_path / "images", seed=0, train_per_photo=TRAIN_PER_PHOTO,
                              val_per_photo=VAL_PER_PHOTO)
    assert not again["reused"]
    assert all_files(out) == all_files(tmp_path / "images")
    assert write_demo_images(tmp_path / "images", seed=0, train_per_photo=TRAIN_PER_PHOTO,
                             val_per_photo=VAL_PER_PHOTO)["reused"]
    # A different request rebuilds instead of reusing.
    other = write_demo_images(tmp_path / "images", seed=1, train_per_photo=TRAIN_PER_PHOTO,
                              val_per_photo=VAL_PER_PHOTO)
    assert not other["reused"] and all_files(out) != all_files(tmp_path / "images")


def test_refuses_a_foreign_non_empty_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("not demo images")
    with pytest.raises(FileExistsError, match="manifest"):
        write_demo_images(tmp_path, train_per_photo=1, val_per_photo=1)


def test_train_and_val_regions_are_disjoint(demo_images):
    out, _ = demo_images
    manifest = json.loads((out / "manifest.json").read_text())
    for name, photo in manifest["photos"].items():
        width, height = photo["size"]
        boxes = {split: [b for k, b in manifest["crop_boxes"][split].items() if k.rsplit("_", 1)[0] == name]
                 for split in ("train", "val")}
        assert len(boxes["train"]) == TRAIN_PER_PHOTO and len(boxes["val"]) == VAL_PER_PHOTO
        for split, split_boxes in boxes.items():
            top, bottom = split_rows(height, split)
            for left, y0, right, y1 in split_boxes:
                assert 0 <= left < right <= width and top <= y0 < y1 <= bottom
                assert right - left == y1 - y0 >= IMAGE_SIZE
        for tl, tt, tr, tb in boxes["train"]:
            for vl, vt, vr, vb in boxes["val"]:
                assert tr <= vl or vr <= tl or tb <= vt or vb <= tt, f"{name}: train and val crops overlap"


@pytest.mark.parametrize("split", ["train", "val"])
def test_shards_match_the_folder(demo_images, split):
    out, summary = demo_images
    from_shards = {}
    for shard in sorted(out.glob(f"shards/{split}-*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            key, ext = name.split(".", 1)
            from_shards.setdefault(key, {})[ext] = data
    from_folder = {p.stem: (p.parent.name, p.read_bytes()) for p in (out / split).rglob("*.png")}
    assert sorted(from_shards) == sorted(from_folder)
    for key, sample in from_shards.items():
        class_name, png = from_folder[key]
        assert sample["png"] == png
        assert int(sample["cls"]) == summary["classes"].index(class_name)


def test_shards_read_with_webdataset(demo_images):
    wds = pytest.importorskip("webdataset")
    out, summary = demo_images
    dataset = wds.WebDataset(sorted(str(p) for p in out.glob("shards/val-*.tar")), shardshuffle=False)
    keys = [sample["__key__"] for sample in dataset]
    assert len(keys) == summary["num_val"] == len(set(keys))


def test_train_demo_vae_saves_a_loadable_autoencoder(demo_images, tmp_path):
    from diffusers import AutoencoderDC

    out, summary = demo_images
    result = train_demo_vae(Path(summary["train_folder"]), tmp_path / "vae", steps=3, batch_size=4, seed=0,
                            lr=1e-3, log_every=1)
    assert result["num_val"] == summary["num_val"] and result["val_psnr_rgb"] > 0
    recipe = json.loads((tmp_path / "vae" / "training_recipe.json").read_text())
    assert recipe["steps"] == 3 and recipe["num_train"] == summary["num_train"]
    assert recipe["val_psnr_rgb"] == result["val_psnr_rgb"]

    vae = AutoencoderDC.from_pretrained(tmp_path / "vae").eval()
    with torch.no_grad():
        latents = vae.encode(torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)).latent
        assert latents.shape == (2, 32, IMAGE_SIZE // 8, IMAGE_SIZE // 8)
        assert vae.decode(latents).sample.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_train_demo_vae_never_overwrites_without_being_told(demo_images, tmp_path):
    out, summary = demo_images
    target = tmp_path / "vae"
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite"):
        train_demo_vae(Path(summary["train_folder"]), target, steps=1, batch_size=4)
    assert (target / "config.json").read_text() == "{}"  # checked before training, left untouched

    train_demo_vae(Path(summary["train_folder"]), target, steps=1, batch_size=4, overwrite=True)
    assert (target / "diffusion_pytorch_model.safetensors").is_file()


def test_cli_train_vae_writes_under_the_artifacts_root_and_refuses_a_second_time(demo_images, tmp_path):
    from typer.testing import CliRunner

    from revq_pipe.stages.cli import app

    _, summary = demo_images
    committed = Path(__file__).resolve().parents[1] / "demo" / "vae" / "diffusion_pytorch_model.safetensors"
    before = committed.stat().st_mtime_ns if committed.is_file() else None
    args = ["demo", "train-vae", "--images", summary["train_folder"], "--steps", "1", "--set", f"paths.root={tmp_path}"]
    runner = CliRunner()
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert (tmp_path / "demo" / "vae" / "config.json").is_file()
    assert (committed.stat().st_mtime_ns if committed.is_file() else None) == before

    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output and str(tmp_path / "demo" / "vae") in again.output
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
