"""ctfgen.data.datasets on synthetic data only: IDX files and tiny image folders built in tmp_path."""

import gzip
import struct
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ctfgen.data.datasets import (
    FashionMNIST,
    ImageFolder,
    center_crop,
    collate_images,
    load_dataset,
    read_idx,
    to_model_range,
    to_uint8,
)
from ctfgen.errors import CtfgenError

# --- helpers ----------------------------------------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_file(path, array: np.ndarray, gz: bool):
    """Write `array` as IDX to `path` (+ '.gz' when gz); return the path actually written."""
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_fmnist(root, n_train=7, n_test=5, gz=True, seed=0):
    """A Fashion-MNIST-shaped IDX directory with random pixels; returns the arrays written."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx_file(root / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx_file(root / f"{prefix}-labels-idx1-ubyte", labels, gz)
        arrays[split] = (images, labels)
    return arrays


CLASS_COLOURS = {"apple": (255, 0, 0), "banana": (0, 255, 0), "cherry": (0, 0, 255)}


def solid_png(path, colour, size=(20, 12)):
    Image.new("RGB", size, colour).save(path)


def make_folder(root, per_class=2, size=(20, 12)):
    """root/<class>/imgK.png, each image a solid colour that identifies its class."""
    for name, colour in CLASS_COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            solid_png(root / name / f"img{k}.png", colour, size)
    return root


def colour_label(image: torch.Tensor) -> int:
    """The class whose solid colour an image [3,H,W] in [-1,1] shows (its brightest channel)."""
    return int(image.mean(dim=(1, 2)).argmax())


# --- IDX reader -------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("shape", [(6,), (4, 5, 3)])
def test_read_idx_shape_and_values(tmp_path, gz, shape):
    array = np.arange(int(np.prod(shape)), dtype=np.uint8).reshape(shape)[::-1].copy()
    path = write_idx_file(tmp_path / "data-idx", array, gz)
    out = read_idx(path)
    assert out.dtype == np.uint8
    assert out.shape == shape
    np.testing.assert_array_equal(out, array)


def test_read_idx_truncated_data(tmp_path):
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((3, 4, 4), np.uint8))[:-5])
    with pytest.raises(CtfgenError, match="truncated") as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_read_idx_truncated_gzip_stream(tmp_path):
    good = write_idx_file(tmp_path / "cut-idx3-ubyte", np.arange(200, dtype=np.uint8).reshape(2, 10, 10), gz=True)
    blob = good.read_bytes()
    good.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CtfgenError) as e:
        read_idx(good)
    assert str(good) in str(e.value)


@pytest.mark.parametrize("header", [bytes([0, 0, 0x0D, 1]), bytes([1, 0, 0x08, 1]), b"\x89PNG", b""])
def test_read_idx_bad_magic(tmp_path, header):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(header + struct.pack(">I", 2) + b"\x01\x02")
    with pytest.raises(CtfgenError, match="not an IDX file") as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_read_idx_not_gzip_but_named_gz(tmp_path):
    path = tmp_path / "fake-idx1-ubyte.gz"
    path.write_bytes(b"this is not gzip data at all")
    with pytest.raises(CtfgenError) as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_read_idx_truncated_header(tmp_path):
    path = tmp_path / "header-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 3, 0, 0]))  # says 3 dims, holds half of one
    with pytest.raises(CtfgenError) as e:
        read_idx(path)
    assert str(path) in str(e.value)


# --- Fashion-MNIST ----------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("split", ["train", "test"])
def test_fashion_mnist_items(tmp_path, gz, split):
    arrays = make_fmnist(tmp_path / "fm", gz=gz)
    pixels, labels = arrays[split]
    ds = FashionMNIST(split, data_dir=tmp_path / "fm")
    assert len(ds) == len(labels)
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.dtype == torch.float32
        assert image.shape == (3, 32, 32)
        assert image.min() >= -1 and image.max() <= 1
        assert isinstance(label, int) and label == int(labels[i])
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        assert torch.all(image[:, border] == -1.0)
        expected = torch.from_numpy(pixels[i].astype(np.float32)) / 127.5 - 1
        torch.testing.assert_close(image[0, 2:30, 2:30], expected, rtol=0, atol=1e-6)
        assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])


def test_fashion_mnist_getitems_matches_getitem(tmp_path):
    make_fmnist(tmp_path / "fm", n_train=9)
    ds = FashionMNIST("train", data_dir=tmp_path / "fm")
    indices = [4, 0, 8, 4, 2]
    batch = ds.__getitems__(indices)
    assert len(batch) == 1
    images, labels = batch[0]
    assert images.shape == (len(indices), 3, 32, 32)
    assert torch.equal(images, torch.stack([ds[i][0] for i in indices]))
    assert labels.tolist() == [ds[i][1] for i in indices]
    # collate_images passes such a batch through, and a DataLoader uses it
    images2, labels2, skipped = collate_images(batch)
    assert skipped == 0 and torch.equal(images2, images) and torch.equal(labels2, labels)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_images)
    got = list(loader)
    assert [len(b[0]) for b in got] == [4, 4, 1]
    assert torch.equal(torch.cat([b[0] for b in got]), torch.stack([ds[i][0] for i in range(len(ds))]))
    assert torch.cat([b[1] for b in got]).tolist() == ds.labels.tolist()


def test_fashion_mnist_flip_mirrors_or_keeps(tmp_path):
    make_fmnist(tmp_path / "fm", n_train=16)
    plain = FashionMNIST("train", data_dir=tmp_path / "fm")
    flipped = FashionMNIST("train", data_dir=tmp_path / "fm", flip=True)
    torch.manual_seed(0)
    a = plain.images(torch.arange(16))
    b = flipped.images(torch.arange(16))
    same = [torch.equal(a[i], b[i]) for i in range(16)]
    mirrored = [torch.equal(a[i].flip(-1), b[i]) for i in range(16)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert any(mirrored) and any(same)  # seeded: a mix of mirrored and kept images


def test_fashion_mnist_env_var(tmp_path, monkeypatch):
    make_fmnist(tmp_path / "envdata", n_train=3, n_test=2)
    monkeypatch.setenv("CTFGEN_DATA", str(tmp_path / "envdata"))
    assert len(FashionMNIST("train")) == 3
    assert len(FashionMNIST("test", data_dir=None)) == 2
    assert len(load_dataset("fmnist", "test")) == 2


def test_fashion_mnist_missing_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("CTFGEN_DATA", raising=False)
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(CtfgenError) as e:
        FashionMNIST("train", data_dir=missing)
    assert str(missing) in str(e.value)
    assert "apt-get install" in str(e.value)


def test_fashion_mnist_missing_label_file(tmp_path):
    make_fmnist(tmp_path / "fm")
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(CtfgenError, match="t10k-labels-idx1-ubyte"):
        FashionMNIST("test", data_dir=tmp_path / "fm")


def test_fashion_mnist_mismatched_files(tmp_path):
    root = tmp_path / "fm"
    make_fmnist(root, n_train=4)
    write_idx_file(root / "train-labels-idx1-ubyte", np.zeros(3, np.uint8), gz=True)
    with pytest.raises(CtfgenError, match="do not match"):
        FashionMNIST("train", data_dir=root)


def test_fashion_mnist_unknown_split(tmp_path):
    make_fmnist(tmp_path / "fm")
    with pytest.raises(CtfgenError, match="split"):
        FashionMNIST("validation", data_dir=tmp_path / "fm")


# --- image folders ----------------------------------------------------------------------------

def test_image_folder_classes_and_labels(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=2)
    (root / "apple" / "notes.txt").write_text("not an image")
    (root / "cherry" / "sub").mkdir()
    solid_png(root / "cherry" / "sub" / "deep.PNG", CLASS_COLOURS["cherry"])
    Image.new("RGB", (20, 12), CLASS_COLOURS["banana"]).save(root / "banana" / "photo.jpeg", quality=95)
    ds = ImageFolder(root, image_size=8)
    assert ds.classes == ["apple", "banana", "cherry"]
    assert len(ds) == 2 + 3 + 3  # notes.txt ignored, nested and upper-case/jpeg files found
    assert [label for _, label in ds.files] == [0, 0, 1, 1, 1, 2, 2, 2]
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.shape == (3, 8, 8) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1
        assert colour_label(image) == label


def test_image_folder_class_order_is_sorted_not_creation_order(tmp_path):
    root = tmp_path / "imgs"
    for name in ["zebra", "Ant", "mole"]:  # created out of order; sorted() puts upper case first
        (root / name).mkdir(parents=True)
        solid_png(root / name / "a.png", (0, 0, 0))
    ds = ImageFolder(root, image_size=4)
    assert ds.classes == ["Ant", "mole", "zebra"]
    assert {path.parent.name: label for path, label in ds.files} == {"Ant": 0, "mole": 1, "zebra": 2}


@pytest.mark.parametrize("size, image_size, axis", [((60, 20), 10, "w"), ((20, 60), 10, "h"),
                                                     ((36, 12), 12, "w"), ((13, 39), 7, "h")])
def test_center_crop_size_and_centre(tmp_path, size, image_size, axis):
    """Three equal bands along the long side (red | green | blue): the crop is the green centre."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    if axis == "w":
        a[:, : w // 3, 0], a[:, w // 3: 2 * w // 3, 1], a[:, 2 * w // 3:, 2] = 255, 255, 255
    else:
        a[: h // 3, :, 0], a[h // 3: 2 * h // 3, :, 1], a[2 * h // 3:, :, 2] = 255, 255, 255
    cropped = center_crop(Image.fromarray(a), image_size)
    assert cropped.size == (image_size, image_size)
    c = np.asarray(cropped).astype(int)
    # the middle of the crop is pure green; no red or blue band reaches it
    m = image_size // 4
    centre = c[m:image_size - m, m:image_size - m]
    assert centre[..., 1].min() >= 200
    assert centre[..., 0].max() <= 60 and centre[..., 2].max() <= 60


@pytest.mark.parametrize("size", [(50, 18), (18, 50), (16, 16), (9, 30), (300, 200)])
def test_image_folder_output_size(tmp_path, size):
    root = tmp_path / "imgs"
    (root / "only").mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / "only" / "x.png")
    image, label = ImageFolder(root, image_size=16)[0]
    assert image.shape == (3, 16, 16)
    assert label == 0
    assert image.min() >= -1 and image.max() <= 1


def test_image_folder_grey_image_becomes_rgb(tmp_path):
    root = tmp_path / "imgs"
    (root / "g").mkdir(parents=True)
    Image.new("L", (8, 8), 255).save(root / "g" / "white.png")
    image, _ = ImageFolder(root, image_size=8)[0]
    assert image.shape == (3, 8, 8)
    assert torch.all(image == 1.0)


def test_image_folder_16_bit_grey_is_scaled_not_clipped(tmp_path):
    """A 16-bit grey PNG (mode I;16) at a quarter of its range reads as a quarter grey, not as white."""
    root = tmp_path / "imgs"
    (root / "g").mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 16384, dtype=np.uint16)).save(root / "g" / "deep.png")
    assert Image.open(root / "g" / "deep.png").mode == "I;16"
    image, _ = ImageFolder(root, image_size=8)[0]
    assert torch.all(to_uint8(image) == round(16384 * 255 / 65535))


def test_image_folder_corrupt_image_raises(tmp_path):
    root = make_folder(tmp_path / "imgs")
    bad = root / "banana" / "bad.jpg"
    bad.write_bytes(b"\x00garbage, not a jpeg\xff" * 10)
    ds = ImageFolder(root, image_size=8)
    i = [path for path, _ in ds.files].index(bad)
    with pytest.raises(CtfgenError) as e:
        ds[i]
    assert str(bad) in str(e.value)
    assert "--skip-bad-images" in str(e.value)
    # the good ones still load
    assert ds[0][1] == 0


def test_image_folder_truncated_jpeg_raises(tmp_path):
    root = tmp_path / "imgs"
    (root / "c").mkdir(parents=True)
    path = root / "c" / "cut.jpg"
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CtfgenError) as e:
        ImageFolder(root, image_size=8)[0]
    assert str(path) in str(e.value)


def test_skip_bad_drops_image_and_keeps_labels(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=2)
    bad = root / "banana" / "bad.jpg"  # sorts first inside banana/
    bad.write_bytes(b"garbage" * 20)
    ds = ImageFolder(root, image_size=8, skip_bad=True)
    assert len(ds) == 7
    with pytest.warns(UserWarning, match="bad.jpg"):
        items = [ds[i] for i in range(len(ds))]
    assert sum(item is None for item in items) == 1
    images, labels, n_skipped = collate_images(items)
    assert n_skipped == 1
    assert images.shape == (6, 3, 8, 8)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    # each label still belongs to its own image (no shift after the dropped one)
    assert [colour_label(img) for img in images] == labels.tolist()


def test_skip_bad_through_dataloader(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=2)
    (root / "apple" / "bad.jpg").write_bytes(b"\xff\xd8\xff nope")
    ds = ImageFolder(root, image_size=8, skip_bad=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
    assert sum(b[2] for b in batches) == 1
    labels = torch.cat([b[1] for b in batches]).tolist()
    assert labels == [0, 0, 1, 1, 2, 2]
    assert [colour_label(img) for b in batches for img in b[0]] == labels


def test_collate_all_bad_batch():
    images, labels, n_skipped = collate_images([None, None])
    assert n_skipped == 2 and len(images) == 0 and len(labels) == 0 and labels.dtype == torch.long


def test_image_folder_without_class_folders(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    solid_png(root / "loose.png", (1, 2, 3))
    with pytest.raises(CtfgenError, match="no class sub-folders") as e:
        ImageFolder(root)
    assert str(root) in str(e.value)


def test_image_folder_class_folders_without_images(tmp_path):
    root = tmp_path / "empty"
    (root / "a").mkdir(parents=True)
    (root / "a" / "readme.txt").write_text("x")
    with pytest.raises(CtfgenError, match="no images"):
        ImageFolder(root)


def test_image_folder_missing_root(tmp_path):
    with pytest.raises(CtfgenError, match="does not exist") as e:
        ImageFolder(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)


def test_image_folder_uses_split_subfolder(tmp_path):
    root = tmp_path / "imagenet"
    make_folder(root / "train", per_class=2)
    (root / "val" / "banana").mkdir(parents=True)
    solid_png(root / "val" / "banana" / "v.png", CLASS_COLOURS["banana"])
    (root / "val" / "cherry").mkdir(parents=True)
    solid_png(root / "val" / "cherry" / "v.png", CLASS_COLOURS["cherry"])
    train = ImageFolder(root, split="train", image_size=4)
    assert train.root == root / "train"
    assert train.classes == ["apple", "banana", "cherry"] and len(train) == 6
    val = load_dataset(str(root), "val", image_size=4)
    assert isinstance(val, ImageFolder)
    assert val.root == root / "val"
    assert val.classes == ["banana", "cherry"] and len(val) == 2
    # without a matching sub-folder, root itself is the class folder root
    flat = ImageFolder(root / "train", split="val", image_size=4)
    assert flat.root == root / "train" and len(flat) == 6


# --- value range ------------------------------------------------------------------------------

def test_uint8_round_trip_all_values():
    x = torch.arange(256, dtype=torch.uint8)
    y = to_model_range(x)
    assert y.dtype == torch.float32
    assert y.min() == -1.0 and y.max() == 1.0
    assert torch.equal(to_uint8(y), x)
    # and for an image-shaped tensor
    img = x.view(1, 16, 16).expand(3, -1, -1)
    assert torch.equal(to_uint8(to_model_range(img)), img)


def test_to_uint8_clamps_and_rounds():
    out = to_uint8(torch.tensor([-3.0, -1.0, 1.0, 5.0, 0.0]))
    assert out.tolist() == [0, 0, 255, 255, 128]  # 0.0 -> 127.5 rounds half to even -> 128
