"""The Fashion-MNIST feature classifier's settings, free of torch: the network's (`ClassifierConfig`) and its
training's (`ClassifierTrainConfig`), from whose fields `ctfgen eval train-classifier` makes its flags."""

from __future__ import annotations

from dataclasses import dataclass, field

from ctfgen.choices import WEIGHT_DTYPES
from ctfgen.errors import CtfgenError
from ctfgen.validation import (
    DECAY,
    IMAGE_SIZE,
    MAX_CLASSES,
    MAX_WIDTH,
    NON_NEGATIVE,
    POSITIVE,
    RATE,
    SEED,
    Real,
    Whole,
    check_fields,
)

CHECKPOINT_KIND = "fmnist-classifier"
WIDTH = Whole(1, MAX_WIDTH)


@dataclass
class ClassifierConfig:
    channels: tuple[int, ...] = field(default=(32, 64, 96), metadata={
        "help": "conv widths: one 3x3 conv + BN + ReLU per stage, a 2x2 max-pool after each"})
    hidden: int = field(default=128, metadata={"help": "width of the penultimate layer: the FID / precision-recall "
                                                       "features", "rule": WIDTH})
    num_classes: int = field(default=10, metadata={"help": "classes", "rule": Whole(1, MAX_CLASSES)})
    image_size: int = field(default=32, metadata={"help": "input side in pixels", "rule": IMAGE_SIZE})
    spatial_channels: int = field(default=7, metadata={
        "help": "sFID features: the first channels of the last conv map, flattened", "rule": WIDTH})
    dropout: float = field(default=0.1, metadata={"help": "dropout between the penultimate layer and the class head",
                                                  "rule": DECAY})
    pool_grid: int = field(default=4, metadata={
        "help": "average-pool the last map to this grid before the penultimate layer", "rule": IMAGE_SIZE})

    def __post_init__(self):
        if isinstance(self.channels, list):  # as read back from config.json
            self.channels = tuple(self.channels)
        check_fields(self)
        stages = len(self.channels)
        if not 1 <= stages or self.image_size >> stages < 1 or any(not 1 <= c <= MAX_WIDTH for c in self.channels):
            raise CtfgenError(f"channels must be 1 to log2(image_size) = {self.image_size.bit_length() - 1} widths of "
                              f"1 to {MAX_WIDTH}, got {list(self.channels)}")
        if self.spatial_channels > self.channels[-1]:
            raise CtfgenError(f"spatial_channels {self.spatial_channels} exceeds the last stage's "
                              f"{self.channels[-1]} channels")


@dataclass
class ClassifierTrainConfig:
    """`ctfgen eval train-classifier` takes its flags from these fields and the model's (ClassifierConfig)."""

    out: str = field(metadata={"help": "checkpoint directory to write (the shipped one: pretrained/fmnist/classifier)"})
    data_dir: str | None = field(default=None, metadata={
        "help": "Fashion-MNIST IDX directory (default $CTFGEN_DATA or /usr/share/datasets/fashion-mnist)"})
    epochs: int = field(default=8, metadata={"help": "passes over the training split", "rule": POSITIVE})
    batch_size: int = field(default=128, metadata={"help": "images per step", "rule": POSITIVE})
    lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate (cosine decay after warm-up)",
                                              "rule": RATE})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay", "rule": Real(0)})
    warmup_steps: int = field(default=200, metadata={"help": "linear learning-rate warm-up steps",
                                                     "rule": NON_NEGATIVE})
    shift: int = field(default=2, metadata={"help": "random translation by up to this many pixels",
                                            "rule": NON_NEGATIVE})
    flip: bool = field(default=True, metadata={"help": "random horizontal flips"})
    seed: int = field(default=0, metadata={"help": "initial weights, data order and augmentation", "rule": SEED})
    dtype: str = field(default="fp16", metadata={"help": "of the saved weights", "choices": WEIGHT_DTYPES})
    log_every: int = field(default=50, metadata={"help": "loss to metrics.jsonl every N steps", "rule": POSITIVE})
    progress: bool = field(default=True, metadata={"help": "a progress bar (on a terminal)"})
    model: ClassifierConfig = field(default_factory=ClassifierConfig, metadata={"help": "the network"})

    def __post_init__(self):
        check_fields(self)
