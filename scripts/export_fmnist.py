"""Fashion-MNIST as a user's image folder: OUT/train/<class>/NNNNN.png and OUT/val/<class>/NNNNN.png (the test
split), 28x28 grey PNGs, for `ctfgen fit --data OUT` (issue 22: the folder path must give what the bundled one gives).

    python scripts/export_fmnist.py --out runs/fmnist_png
    ctfgen fit --data runs/fmnist_png --out runs/fit_fmnist_png --preset small

OUT is written whole or not at all, and an existing non-empty OUT is left alone. Class folders are the class
names with "/" as "_" ("T-shirt_top").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from ctfgen.data.datasets import FMNIST_CLASSES, FashionMNIST
from ctfgen.errors import CtfgenError
from ctfgen.files import write_dir_atomic


def export(out: Path, data_dir: str | None) -> dict[str, int]:
    counts = {}

    def write(tmp: Path) -> None:
        for folder, split in (("train", "train"), ("val", "test")):
            dataset = FashionMNIST(split, data_dir)
            for name in FMNIST_CLASSES:
                (tmp / folder / name.replace("/", "_")).mkdir(parents=True)
            for i, (pixels, label) in enumerate(zip(dataset.pixels.numpy(), dataset.labels.tolist())):
                Image.fromarray(pixels).save(tmp / folder / FMNIST_CLASSES[label].replace("/", "_") / f"{i:05d}.png")
            counts[folder] = len(dataset)

    write_dir_atomic(out, write, is_ours=lambda _: False)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="a new (or empty) folder")
    parser.add_argument("--data-dir", help="Fashion-MNIST's IDX files (default: $CTFGEN_DATA or Debian's location)")
    args = parser.parse_args()
    try:
        counts = export(Path(args.out), args.data_dir)
    except CtfgenError as e:
        print(f"export_fmnist: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {counts['train']} training and {counts['val']} held-out images in 10 class folders")
    return 0


if __name__ == "__main__":
    sys.exit(main())
