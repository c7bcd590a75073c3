"""Image datasets: every input form, deterministic order, labels, keys and errors."""

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from revq_pipe.stages.datasets import open_image_dataset


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (value, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path, members):
    """members: list of (name, bytes), written in this order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def red(dataset, i):
    return Image.open(io.BytesIO(dataset.read_bytes(i))).getpixel((0, 0))[0]


def test_image_folder(tmp_path):
    for rel, value in [("dog/b.png", 1), ("cat/z.jpg", 2), ("cat/a.png", 3), ("dog/sub/a.PNG", 4),
                       ("cat/notes.txt", 0), (".hidden/x.png", 0), ("dog/.ipynb/x.png", 0)]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(png(value))
    ds = open_image_dataset(tmp_path)
    assert [ds.key(i) for i in range(len(ds))] == ["cat/a.png", "cat/z.jpg", "dog/b.png", "dog/sub/a.PNG"]
    assert [ds.label(i) for i in range(len(ds))] == [0, 0, 1, 1]
    assert ds.classes == ["cat", "dog"]
    assert [red(ds, i) for i in range(len(ds))] == [3, 2, 1, 4]


def test_flat_folder_has_unknown_labels(tmp_path):
    for name in ["b.png", "a.webp", "c.txt"]:
        (tmp_path / name).write_bytes(png(5))
    ds = open_image_dataset(str(tmp_path))
    assert [ds.key(i) for i in range(len(ds))] == ["a.webp", "b.png"]
    assert [ds.label(i) for i in range(len(ds))] == [-1, -1]


def test_folder_mixing_files_and_classes_is_refused(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.png").write_bytes(png(1))
    (tmp_path / "loose.png").write_bytes(png(1))
    with pytest.raises(ValueError, match="loose.png"):
        open_image_dataset(tmp_path)


def make_shards(folder):
    write_tar(folder / "train-000001.tar", [("s2/k3.png", png(30)), ("s2/k3.cls", b"7\n"),
                                            ("k4.json", b"{}"), ("k5.jpg", png(50))])
    write_tar(folder / "train-000000.tar", [("k1.cls", b"2"), ("k1.png", png(10)), ("k2.webp", png(20)),
                                            ("k2.txt", b"caption")])
    write_tar(folder / "val-000000.tar", [("v1.png", png(99))])


def test_tar_shards_in_every_form(tmp_path):
    make_shards(tmp_path)
    expected_keys = ["k1", "k2", "s2/k3", "k5"]
    forms = [str(tmp_path / "train-*.tar"), str(tmp_path / "train-{000000..000001}.tar")]
    for form in forms:
        ds = open_image_dataset(form)
        assert [ds.key(i) for i in range(len(ds))] == expected_keys, form
        assert [ds.label(i) for i in range(len(ds))] == [2, -1, 7, -1]
        assert [red(ds, i) for i in range(len(ds))] == [10, 20, 30, 50]
        assert red(ds, 2) == 30  # random access, out of order
    single = open_image_dataset(tmp_path / "val-000000.tar")
    assert len(single) == 1 and single.key(0) == "v1" and single.label(0) == -1
    folder = open_image_dataset(tmp_path)  # a folder of shards: every .tar in sorted order
    assert [folder.key(i) for i in range(len(folder))] == expected_keys + ["v1"]


def test_brace_pattern_keeps_its_order(tmp_path):
    make_shards(tmp_path)
    ds = open_image_dataset(str(tmp_path / "train-{000001,000000}.tar"))
    assert [ds.key(i) for i in range(len(ds))] == ["s2/k3", "k5", "k1", "k2"]


def test_wrong_paths(tmp_path):
    make_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_image_dataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="test-"):
        open_image_dataset(str(tmp_path / "test-*.tar"))
    with pytest.raises(FileNotFoundError, match="6 of the 8 shards.*first: .*train-000002.tar"):
        open_image_dataset(str(tmp_path / "train-{000000..000007}.tar"))
    (tmp_path / "broken.tar").write_bytes(b"not a tar file" * 100)
    with pytest.raises(ValueError, match="broken.tar"):
        open_image_dataset(tmp_path / "broken.tar")


def test_empty_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*no images"):
        open_image_dataset(tmp_path / "empty")
    write_tar(tmp_path / "meta.tar", [("a.json", b"{}")])
    with pytest.raises(ValueError, match="meta.tar.*no image samples"):
        open_image_dataset(tmp_path / "meta.tar")


def test_bad_label(tmp_path):
    write_tar(tmp_path / "a.tar", [("k.png", png(1)), ("k.cls", b"dog")])
    with pytest.raises(ValueError, match="'k'.*not an integer"):
        open_image_dataset(tmp_path / "a.tar")


def test_labels_are_int(tmp_path):
    make_shards(tmp_path)
    ds = open_image_dataset(str(tmp_path / "train-*.tar"))
    assert all(isinstance(ds.label(i), int) for i in range(len(ds)))
    assert isinstance(ds.read_bytes(0), bytes) and np.frombuffer(ds.read_bytes(0), np.uint8)[1:4].tobytes() == b"PNG"


def test_every_format_pillow_opens_is_an_input_and_other_files_are_counted(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    (root / "cats").mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(root / "cats" / "a.gif")
    Image.new("RGB", (8, 8), (10, 200, 10)).save(root / "cats" / "b.png")
    (root / "cats" / "notes.txt").write_text("not an image")
    (root / "cats" / ".hidden.png").write_bytes(b"")
    dataset = open_image_dataset(root)
    assert [dataset.key(i) for i in range(len(dataset))] == ["cats/a.gif", "cats/b.png"]
    assert dataset.ignored == ["cats/notes.txt"]
