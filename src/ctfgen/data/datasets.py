"""Image datasets: the bundled Fashion-MNIST (IDX files) and image folders in ImageNet layout.

Every dataset yields `(image, label)` with `image` a float tensor [3, H, W] in [-1, 1], so the
same tokenizer and models serve grey and RGB data alike.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ctfgen.errors import CtfgenError

FMNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FMNIST_PAD = 2  # 28 -> 32: the original image is the centre crop [2:30, 2:30]
FMNIST_SIDE = 28
MAX_IDX_ITEMS = 10**8  # Fashion-MNIST's largest file holds 4.7e7 pixels; a header claiming more is not it
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}


def fmnist_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Where Fashion-MNIST lives: the argument, else $CTFGEN_DATA, else Debian's location."""
    return Path(data_dir or os.environ.get("CTFGEN_DATA") or FMNIST_DEFAULT_DIR)


def find_idx(root: Path, stem: str) -> Path:
    """The Fashion-MNIST IDX file `stem` in `root`, plain or gzipped, or one clear error."""
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise CtfgenError(
        f"Fashion-MNIST not found: no {stem}[.gz] in {root}. Install it with "
        "`apt-get install -y dataset-fashion-mnist`, or point --data-dir / CTFGEN_DATA at the IDX files."
    )


def read_idx(path: Path, max_items: int = MAX_IDX_ITEMS) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes into an array of its shape. The header's shape
    bounds what is read, so a gzip bomb is never inflated past it; shapes beyond `max_items` are refused."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[:3] != b"\x00\x00\x08":
                raise CtfgenError(f"{path} is not an IDX file of unsigned bytes; reinstall the dataset")
            ndim = magic[3]
            dims = f.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise CtfgenError(f"{path} is truncated (a {4 + len(dims)}-byte header for {ndim} dimensions); "
                                  f"reinstall the dataset")
            shape = struct.unpack(f">{ndim}I", dims)
            size = math.prod(shape)
            if size > max_items:
                raise CtfgenError(f"{path} declares shape {shape}: {size} values, more than the {max_items} a dataset "
                                  f"file may hold here; it is not Fashion-MNIST")
            raw = f.read(size + 1)  # one byte more than the shape needs tells a longer file
    except (OSError, EOFError, zlib.error) as e:
        raise CtfgenError(f"cannot read {path}: {e}; reinstall the dataset") from None
    if len(raw) != size:
        what = "truncated" if len(raw) < size else "longer than its shape"
        raise CtfgenError(f"{path} is {what} ({len(raw)} bytes for shape {shape}); reinstall the dataset")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W] or [..., C, H, W] -> float in [-1, 1]."""
    return pixels.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Model images in [-1, 1] -> uint8 pixels, rounded the way a saved PNG would be."""
    return images.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


class FashionMNIST(Dataset):
    """Fashion-MNIST padded to 32x32 with black and repeated to 3 channels."""

    image_size = 32
    classes = FMNIST_CLASSES
    original_pad = FMNIST_PAD  # the black border around each original image (`crop_original`)

    def __init__(self, split: str = "train", data_dir: str | os.PathLike | None = None, flip: bool = False):
        if split not in FMNIST_FILES:
            raise CtfgenError(f"unknown Fashion-MNIST split {split!r}; use one of {sorted(FMNIST_FILES)}")
        root = fmnist_dir(data_dir)
        image_file, label_file = (find_idx(root, stem) for stem in FMNIST_FILES[split])
        images, labels = read_idx(image_file), read_idx(label_file)
        if images.ndim != 3 or images.shape[1:] != (FMNIST_SIDE, FMNIST_SIDE) or len(images) == 0:
            raise CtfgenError(f"{image_file} holds images of shape {images.shape}, not [N, 28, 28]; reinstall the "
                              f"dataset")
        if labels.ndim != 1 or len(images) != len(labels):
            raise CtfgenError(f"{image_file} and {label_file} do not match; reinstall the dataset")
        if labels.max() >= len(FMNIST_CLASSES):
            raise CtfgenError(f"{label_file} holds label {labels.max()}; Fashion-MNIST has classes 0 to "
                              f"{len(FMNIST_CLASSES) - 1}: reinstall the dataset")
        self.pixels = torch.from_numpy(images.copy())  # uint8 [N, 28, 28]
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.flip = flip

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, index) -> torch.Tensor:
        """A batch of images [B, 3, 32, 32] for a tensor/list of indices, without Python loops."""
        x = to_model_range(self.pixels[index])
        x = torch.nn.functional.pad(x, (FMNIST_PAD,) * 4, value=-1.0)
        if self.flip:
            mirror = torch.rand(x.shape[0]) < 0.5
            x = torch.where(mirror[:, None, None], x.flip(-1), x)
        return x[:, None].expand(-1, 3, -1, -1).contiguous()

    def __getitem__(self, i: int):
        return self.images([i])[0], int(self.labels[i])

    def __getitems__(self, indices):
        # DataLoader fetches a whole batch through this, so a batch costs one tensor op.
        index = torch.as_tensor(indices)
        return [(self.images(index), self.labels[index])]


def rgb_image(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, as ADM's `convert("RGB")`, except 16- and 32-bit integer grey (16-bit PNGs and
    TIFFs): `convert` would clip their values at 255, a white image, so they are scaled to 8 bits first."""
    if image.mode.startswith("I"):
        values = np.asarray(image, dtype=np.float64)
        high = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(np.round(values * (255.0 / high)), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM / LlamaGen centre crop: box-halve while large, bicubic-resize the short side, crop."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageFolder(Dataset):
    """One sub-folder per class (ImageNet layout); classes are the sorted sub-folder names.

    If `root/<split>` exists it is used, so `root` may be an ImageNet root with train/ and val/.
    A file that cannot be decoded raises a CtfgenError naming it, or with `skip_bad=True` is
    dropped from its batch with a warning (see `collate_images`), never replaced by another image.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", image_size: int = 256,
                 flip: bool = False, skip_bad: bool = False):
        root = Path(root)
        if (root / split).is_dir():
            root = root / split
        if not root.is_dir():
            raise CtfgenError(f"image folder {root} does not exist; pass a folder with one sub-folder per class")
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not self.classes:
            raise CtfgenError(f"{root} has no class sub-folders; expected ImageNet layout root/<class>/<image>")
        self.files: list[tuple[Path, int]] = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.files:
            raise CtfgenError(f"{root} has class folders but no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        self.root, self.image_size, self.flip, self.skip_bad = root, image_size, flip, skip_bad

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path, label = self.files[i]
        try:
            with Image.open(path) as f:
                image = center_crop(rgb_image(f), self.image_size)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            if not self.skip_bad:
                raise CtfgenError(f"cannot decode image {path} ({e}); remove it or pass --skip-bad-images") from None
            warnings.warn(f"skipping unreadable image {path}: {e}", stacklevel=2)
            return None
        if self.flip and torch.rand(()) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return to_model_range(pixels), label


def collate_images(items):
    """Stack (image, label) items into a batch; a batch from `__getitems__` passes through.

    Returns (images [B,3,H,W], labels [B], n_skipped) where n_skipped counts unreadable files
    dropped by a dataset made with skip_bad=True.
    """
    if len(items) == 1 and isinstance(items[0], tuple) and items[0][0].dim() == 4:
        images, labels = items[0]
        return images, labels, 0
    kept = [item for item in items if item is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), len(items)
    images = torch.stack([image for image, _ in kept])
    labels = torch.tensor([label for _, label in kept], dtype=torch.long)
    return images, labels, len(items) - len(kept)


def load_dataset(data: str, split: str, *, data_dir=None, image_size: int = 256, flip: bool = False,
                 skip_bad: bool = False) -> Dataset:
    """`fmnist` for the bundled Fashion-MNIST, otherwise a path to an image folder."""
    if data == "fmnist":
        return FashionMNIST(split, data_dir=data_dir, flip=flip)
    return ImageFolder(data, split=split, image_size=image_size, flip=flip, skip_bad=skip_bad)


def crop_original(images: torch.Tensor, dataset: Dataset) -> torch.Tensor:
    """The region of the original image: inside the black border a dataset says it padded its images with
    (`original_pad`: Fashion-MNIST's 28x28 centre), or the whole image."""
    pad = getattr(dataset, "original_pad", 0)
    return images[..., pad:-pad, pad:-pad] if pad else images
