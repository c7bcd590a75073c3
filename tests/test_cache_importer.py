import numpy as np
import pytest
import torch

from revq_pipe.cache.importer import import_tensor
from revq_pipe.cache.reader import LatentCache
from revq_pipe.cache.schema import CacheError

N = 13


def latents(seed=0):
    return np.random.default_rng(seed).normal(size=(N, 3, 2, 2)).astype(np.float32)


def test_import_npy_with_txt_labels(tmp_path):
    np.save(tmp_path / "z.npy", latents())
    (tmp_path / "labels.txt").write_text("".join(f"{i % 4}\n" for i in range(N)))
    manifest = import_tensor(tmp_path / "z.npy", tmp_path / "s.zarr", split="train",
                             labels_path=tmp_path / "labels.txt", chunk_size=4)
    assert manifest.complete and manifest.num_samples == N and manifest.vae["source"] is None
    cache = LatentCache.open(tmp_path / "s.zarr")
    assert np.array_equal(cache.load_latents().numpy(), latents().astype(np.float16))
    assert cache.labels().tolist() == [i % 4 for i in range(N)]
    assert cache.keys()[:2] == ["index:000000", "index:000001"]
    with pytest.raises(CacheError, match="--overwrite"):
        import_tensor(tmp_path / "z.npy", tmp_path / "s.zarr", split="train")


def test_import_pt_tensor_and_single_tensor_dict_give_the_same_store(tmp_path):
    vae = {"source": "demo/vae", "class": "AutoencoderDC", "weights_sha256": "f" * 64}
    torch.save(torch.from_numpy(latents()), tmp_path / "z.pt")
    torch.save({"latents": torch.from_numpy(latents())}, tmp_path / "d.pt")
    torch.save(torch.arange(N), tmp_path / "labels.pt")
    a = import_tensor(tmp_path / "z.pt", tmp_path / "a.zarr", split="val", vae_identity=vae,
                      labels_path=tmp_path / "labels.pt", latent_dtype="float32")
    import_tensor(tmp_path / "d.pt", tmp_path / "b.zarr", split="val", vae_identity=vae,
                  labels_path=tmp_path / "labels.pt", latent_dtype="float32")
    assert a.vae == vae and a.latent_dtype == "float32"
    ca, cb = LatentCache.open(tmp_path / "a.zarr"), LatentCache.open(tmp_path / "b.zarr")
    assert torch.equal(ca.load_latents(), cb.load_latents()) and ca.labels().tolist() == list(range(N))


class Boom:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['BOOM_FILE'], 'w').write('ran')",))


def test_pickled_object_refused_and_never_executed(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOM_FILE", str(tmp_path / "boom"))
    torch.save({"latents": torch.from_numpy(latents()), "evil": Boom()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refused to load latents"):
        import_tensor(tmp_path / "evil.pt", tmp_path / "s.zarr", split="train")
    assert not (tmp_path / "boom").exists() and not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("obj, match", [
    ({"a": torch.zeros(2, 1, 1, 1), "b": torch.zeros(2, 1, 1, 1)}, "exactly one tensor"),
    ([torch.zeros(2, 1, 1, 1)], "found list"),
    (torch.zeros(4, 3), "expected a non-empty \\(N, C, H, W\\)"),
    (torch.zeros(2, 1, 1, 1, dtype=torch.int64), "floating point"),
])
def test_bad_tensor_files_refused(tmp_path, obj, match):
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(ValueError, match=match):
        import_tensor(tmp_path / "x.pt", tmp_path / "s.zarr", split="train")


def test_bad_labels_refused(tmp_path):
    np.save(tmp_path / "z.npy", latents())
    np.save(tmp_path / "short.npy", np.zeros(N - 1, dtype=np.int64))
    (tmp_path / "bad.txt").write_text("1\n2\ncat\n")
    np.save(tmp_path / "obj.npy", np.array([object()] * N, dtype=object), allow_pickle=True)
    for name, match in [("short.npy", "exactly one label per latent"), ("bad.txt", "line 3 is 'cat'"),
                        ("obj.npy", "without pickle"), ("missing.txt", "does not exist")]:
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            import_tensor(tmp_path / "z.npy", tmp_path / "s.zarr", split="train", labels_path=tmp_path / name)
