"""The data of a fit: the bundled Fashion-MNIST, or an image folder checked image by image and split.

An image folder holds one sub-folder per class, or train/ (and val/) holding them. Every image is decoded once, up
front: an unreadable one is named and left out, with a count; a folder with no usable image, or a class with too
few, is refused before any work. Without val/, a fixed share of each class (drawn from the seed) is held out for the
evaluation. The usable images are then laid out under DIR/data/{train,val}/<class>/ as links to the originals, which
every later step reads as an ordinary image folder (ctfgen.data.datasets.ImageFolder: any size and mode, the ADM
crop). Images of Fashion-MNIST's kind (28x28 grey) are written there as copies padded to 32x32 instead, exactly as
the bundled set is, so that the shipped classifier scores them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ctfgen.data.datasets import FMNIST_CLASSES, FMNIST_PAD, FMNIST_SIDE, IMAGE_EXTENSIONS, load_dataset, rgb_image
from ctfgen.errors import CtfgenError
from ctfgen.files import replace_dir

SPLIT_NAME = "split.json"  # in DIR/data: this module's record of the layout
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass
class FitData:
    """The data as the later steps read it: `source` ("fmnist", or DIR/data laid out as an image folder) with a
    training split and a held-out one."""

    source: str
    train_split: str
    val_split: str
    classes: list[str]
    n_train: int
    n_val: int
    fmnist_like: bool  # 32x32 grey images of Fashion-MNIST's kind: the shipped classifier can score them
    held_out: str  # how the held-out images were chosen, in words
    fingerprint: str
    skipped: list[dict] = field(default_factory=list)  # unreadable images: {"path", "reason"}

    def dataset(self, split: str, image_size: int, flip: bool = False):
        name = self.train_split if split == "train" else self.val_split
        dataset = load_dataset(self.source, name, image_size=image_size, flip=flip)
        if self.fmnist_like and self.source != "fmnist" and image_size == 32:
            dataset.original_pad = FMNIST_PAD  # laid out padded as the bundled set is (`write_layout`)
        return dataset

    def to_dict(self) -> dict:
        return asdict(self)


def fmnist_data() -> FitData:
    """The bundled Fashion-MNIST ($CTFGEN_DATA or Debian's location): its test split is the held-out one."""
    from ctfgen.data.datasets import FashionMNIST
    from ctfgen.evaluation.reference import fmnist_fingerprint

    n_train, n_val = len(FashionMNIST("train")), len(FashionMNIST("test"))
    return FitData("fmnist", "train", "test", list(FMNIST_CLASSES), n_train, n_val, True,
                   "Fashion-MNIST's test split",
                   fingerprint=f"{fmnist_fingerprint('train')}-{fmnist_fingerprint('test')}")


@dataclass
class _Folder:
    train_root: Path
    val_root: Path | None
    classes: list[str]

    def candidates(self, root: Path, name: str) -> list[Path]:
        return [p for p in sorted((root / name).rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]


def _folder(data) -> _Folder:
    root = Path(data)
    if not root.is_dir():
        raise CtfgenError(f"--data {data}: no such folder; pass 'fmnist' or a folder with one sub-folder per class")
    train_root = root / "train" if (root / "train").is_dir() else root
    val_root = root / "val" if train_root != root and (root / "val").is_dir() else None
    classes = sorted(d.name for d in train_root.iterdir() if d.is_dir())
    if not classes:
        raise CtfgenError(f"--data {train_root} has no class sub-folders; lay it out as <folder>/<class>/<image>")
    if val_root is not None:
        val_classes = sorted(d.name for d in val_root.iterdir() if d.is_dir())
        if val_classes != classes:
            odd = sorted(set(val_classes) ^ set(classes))
            raise CtfgenError(f"{val_root} and {train_root} hold different classes ({', '.join(odd)} in only one); "
                              f"give val/ the same class folders as train/")
    return _Folder(train_root, val_root, classes)


def folder_fingerprint(data, held_out: float, seed: int) -> str:
    """Of every candidate image's path, size and modification time, and the split options: cheap, and it changes
    when an image is added, removed or rewritten."""
    folder = _folder(data)
    digest = hashlib.sha256(json.dumps([held_out, seed, folder.val_root is not None]).encode())
    for root in (folder.train_root, folder.val_root):
        for name in folder.classes if root is not None else ():
            for path in folder.candidates(root, name):
                stat = path.stat()
                digest.update(f"{path.relative_to(root.parent)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _probe(path: Path) -> tuple[tuple[int, int], str] | str:
    """(size, mode) of a decodable image, or why it is not one."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes it all: a truncated or corrupt file fails here, not in the middle of training
            return image.size, image.mode
    except Exception as e:  # noqa: BLE001 - a decoder may raise anything on a hostile file; it is named and skipped
        return f"{type(e).__name__}: {e}"


def scan_folder(data, held_out: float, seed: int, fingerprint: str, out_data: Path, progress: bool = True) -> tuple:
    """Decode every image of the folder `data`, refuse it when a class has too few usable ones, and split it.
    Returns (FitData for `out_data`, {"train": [[path, ...] per class], "val": ...}, the layout to write)."""
    from tqdm import tqdm

    folder = _folder(data)
    splits = {"train": folder.train_root} | ({"val": folder.val_root} if folder.val_root else {})
    usable, skipped, shapes = {}, [], set()
    jobs = [(split, label, path) for split, root in splits.items() for label, name in enumerate(folder.classes)
            for path in folder.candidates(root, name)]
    for split, label, path in tqdm(jobs, desc="check images", unit="image", disable=None if progress else True):
        probe = _probe(path)
        if isinstance(probe, str):
            skipped.append({"path": str(path), "reason": probe})
            continue
        usable.setdefault((split, label), []).append(path.resolve())
        shapes.add((probe[0], probe[1] in GREY_MODES))
    if not usable:
        raise CtfgenError(f"--data {data}: no usable image ({len(skipped)} unreadable, {len(jobs)} found with "
                          f"extensions {', '.join(sorted(IMAGE_EXTENSIONS))})")
    need = 1 if folder.val_root else 2
    for split, root in splits.items():
        for label, name in enumerate(folder.classes):
            n = len(usable.get((split, label), []))
            if n < need:
                why = "one to train on and one held out" if need == 2 else f"in {split}/"
                raise CtfgenError(f"class {name!r} has {n} usable image(s) in {root / name}; each class needs at "
                                  f"least {need} ({why}): add images or remove the class folder")
    files = {split: [usable[(split, label)] for label in range(len(folder.classes))] for split in splits}
    if folder.val_root:
        words = "the folder's val/"
    else:
        files["train"], files["val"] = _hold_out(files["train"], held_out, seed)
        words = f"{held_out:.0%} of each class, drawn with seed {seed}: the folder has no val/"
    fit_data = FitData(str(out_data), "train", "val", folder.classes, sum(map(len, files["train"])),
                       sum(map(len, files["val"])), shapes == {((FMNIST_SIDE, FMNIST_SIDE), True)}, words,
                       fingerprint, skipped)
    return fit_data, files


def _hold_out(per_class: list[list[Path]], share: float, seed: int) -> tuple[list, list]:
    """A fixed share of each class (at least one image, never all of them) held out, drawn from (seed, class)."""
    train, val = [], []
    for label, paths in enumerate(per_class):
        n_val = min(max(1, round(share * len(paths))), len(paths) - 1)
        held = set(np.random.default_rng([seed, label]).permutation(len(paths))[:n_val].tolist())
        val.append([p for i, p in enumerate(paths) if i in held])
        train.append([p for i, p in enumerate(paths) if i not in held])
    return train, val


def is_data_dir(path) -> bool:
    return (Path(path) / SPLIT_NAME).is_file()


def write_layout(fit_data: FitData, files: dict) -> None:
    """DIR/data/{train,val}/<class>/NNNNNN.ext: links to the usable images (padded copies when Fashion-MNIST-like),
    and split.json; written beside and renamed into place, so a kill leaves no half layout."""
    out = Path(fit_data.source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for split, per_class in files.items():
            for name, paths in zip(fit_data.classes, per_class):
                (tmp / split / name).mkdir(parents=True)
                for i, path in enumerate(paths):
                    if fit_data.fmnist_like:
                        _write_padded(path, tmp / split / name / f"{i:06d}.png")
                    else:
                        os.symlink(path, tmp / split / name / f"{i:06d}{path.suffix.lower()}")
        (tmp / SPLIT_NAME).write_text(json.dumps(fit_data.to_dict(), indent=2) + "\n")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp's directory is private; never chmod through the links
        replace_dir(tmp, out, is_data_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # removes the links, never what they point to
        raise


def _write_padded(path: Path, dest: Path) -> None:
    """A 28x28 grey image as the bundled Fashion-MNIST is: padded to 32x32 with black."""
    with Image.open(path) as image:
        grey = np.asarray(rgb_image(image).convert("L"))
    Image.fromarray(np.pad(grey, FMNIST_PAD)).save(dest)
