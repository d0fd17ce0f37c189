"""Every choice `ctfgen fit` makes, from a preset and the number of images.

    tiny   a test: well under a minute on two CPU cores (VQ-tiny, GPT-tiny, 16 px, fp32)
    small  a few thousand images on a CPU: the shipped Fashion-MNIST sizes and schedule (VQ-fmnist, K = 128, GPT-S
           stage 1 and baseline, GPT-XS stage 2, 5 epochs of batch 64 at lr 5e-4 with cosine decay; 32 px)
    base   GPUs: LlamaGen-B sizes (VQ-16 with 16384 codes, K = 512, GPT-B stage 1 and baseline, the paper's
           GPT-L-sized refiner; LlamaGen's batch 256 at a constant lr 1e-4; 256 px, mirrored codes too)

A preset holds rules; `resolve` turns them into the concrete choices for n training images (a FitConfig, which
fit.json records) under the overrides: a TOML file (--config) and the command's flags (--k, --image-size,
--no-baseline), which win over the file. The rules: steps = max(floor, epochs x ceil(images / batch)); a batch is
at most the number of images; the codebook halves until each codeword has at least 16 training tokens; K = codewords
/ the preset's codewords per cluster (the paper's 16384 / 512 = 32); the held-out loss is measured `evals` times.
With Fashion-MNIST's 60,000 images, small gives exactly the shipped schedule (3,600 tokenizer steps, 4,690 steps).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ctfgen.errors import CtfgenError
from ctfgen.validation import (
    DECAY,
    IMAGE_SIZE,
    MAX_VOCAB,
    NON_NEGATIVE,
    POSITIVE,
    RATE,
    SEED,
    Real,
    Whole,
    check_fields,
)

MIN_TOKENS_PER_CODE = 16


def _rule(rule) -> dataclasses.Field:
    return field(metadata={"rule": rule})


@dataclass
class FitConfig:
    """The concrete choices of a fit: what fit.json records and a --config TOML file may override, key by key.
    Checked when made: each value's type and rule (ctfgen.validation), and the names a model field may take."""

    image_size: int = _rule(IMAGE_SIZE)  # image folders: the ADM centre crop's size
    held_out: float = _rule(Real(0, 1, low_open=True, high_open=True))  # share of each class held out without val/
    seed: int = _rule(SEED)  # the held-out share, initial weights, data order, k-means, sampling
    tokenizer_model: str = field()  # a VQ preset (ctfgen.tokenizer.model.VQ_PRESETS)
    codebook_size: int = _rule(Whole(2, MAX_VOCAB))
    tokenizer_steps: int = _rule(POSITIVE)
    tokenizer_batch_size: int = _rule(POSITIVE)
    tokenizer_lr: float = _rule(RATE)
    tokenizer_warmup_steps: int = _rule(NON_NEGATIVE)
    tokenizer_restart_every: int = _rule(NON_NEGATIVE)  # dead codewords restarted every N steps (0: never)
    tokenizer_ckpt_every: int = _rule(POSITIVE)
    tokenizer_precision: str = field()  # as `precision`, for the tokenizer's training (the shipped one: fp32)
    k: int = _rule(Whole(2, MAX_VOCAB))  # clusters: the coarse vocabulary
    stage1_model: str = field()  # GPT presets (ctfgen.models.config.GPT_PRESETS)
    stage2_model: str = field()
    baseline_model: str = field()
    baseline: bool = field()  # train the plain AR baseline too (--no-baseline: not)
    flip: bool = field()  # also store the codes of mirrored images (a second view to train on)
    steps: int = _rule(POSITIVE)  # optimizer steps of each transformer
    batch_size: int = _rule(POSITIVE)
    lr: float = _rule(RATE)
    warmup_steps: int = _rule(NON_NEGATIVE)
    lr_schedule: str = field()
    dropout: float | None = _rule(DECAY)  # None: the model preset's (LlamaGen: 0.1)
    eval_every: int = _rule(POSITIVE)
    eval_items: int = _rule(POSITIVE)
    ckpt_every: int = _rule(POSITIVE)
    compile: bool = field()
    precision: str = field()  # auto: bf16 autocast where it is fast (ctfgen.backends.precision), else fp32
    pipeline_dtype: str = field()  # of the assembled pipeline's transformer weights
    eval_per_class: int = _rule(POSITIVE)  # samples of each class scored against the held-out images
    grid_per_class: int = _rule(POSITIVE)  # samples of each class in the report's grids

    def __post_init__(self):
        check_fields(self)
        for key, names in _choices().items():
            if getattr(self, key) not in names:
                raise CtfgenError(f"{key} {getattr(self, key)!r} is not one of {', '.join(names)}")


@dataclass(frozen=True)
class Preset:
    fixed: dict  # FitConfig fields as they are
    tokenizer_epochs: int
    tokenizer_min_steps: int
    epochs: int
    min_steps: int
    codes_per_cluster: int
    evals: int  # held-out measurements per training run


_COMMON = dict(held_out=0.1, seed=0, baseline=True, lr_schedule="cosine")
PRESETS = {
    "tiny": Preset(dict(_COMMON, image_size=16, held_out=0.25, tokenizer_model="VQ-tiny", codebook_size=64,
                        tokenizer_batch_size=8, tokenizer_lr=3e-3, tokenizer_warmup_steps=5, tokenizer_restart_every=10,
                        tokenizer_ckpt_every=10, stage1_model="GPT-tiny", stage2_model="GPT-tiny",
                        baseline_model="GPT-tiny", flip=False, batch_size=8, lr=1e-3, warmup_steps=5, dropout=0.0,
                        eval_items=64, ckpt_every=10, compile=False, precision="fp32", tokenizer_precision="fp32",
                        pipeline_dtype="fp32",
                        eval_per_class=8, grid_per_class=4),
                   tokenizer_epochs=4, tokenizer_min_steps=40, epochs=4, min_steps=40, codes_per_cluster=8, evals=4),
    "small": Preset(dict(_COMMON, image_size=32, tokenizer_model="VQ-fmnist", codebook_size=4096,
                         tokenizer_batch_size=64, tokenizer_lr=1e-3, tokenizer_warmup_steps=100,
                         tokenizer_restart_every=100, tokenizer_ckpt_every=200, stage1_model="GPT-S",
                         stage2_model="GPT-XS", baseline_model="GPT-S", flip=False, batch_size=64, lr=5e-4,
                         warmup_steps=100, dropout=0.0, eval_items=2000, ckpt_every=200, compile=True,
                         precision="auto", tokenizer_precision="fp32", pipeline_dtype="fp16", eval_per_class=1000,
                         grid_per_class=10),
                    tokenizer_epochs=3, tokenizer_min_steps=3600, epochs=5, min_steps=1000, codes_per_cluster=32,
                    evals=10),
    "base": Preset(dict(_COMMON, image_size=256, tokenizer_model="VQ-16", codebook_size=16384,
                        tokenizer_batch_size=128, tokenizer_lr=1e-4, tokenizer_warmup_steps=1000,
                        tokenizer_restart_every=100, tokenizer_ckpt_every=1000, stage1_model="GPT-B",
                        stage2_model="GPT-L", baseline_model="GPT-B", flip=True, batch_size=256, lr=1e-4,
                        warmup_steps=0, lr_schedule="constant", dropout=None, eval_items=10000, ckpt_every=1000,
                        compile=True, precision="auto", tokenizer_precision="auto", pipeline_dtype="bf16",
                        eval_per_class=50, grid_per_class=8),
                   tokenizer_epochs=40, tokenizer_min_steps=20000, epochs=100, min_steps=10000, codes_per_cluster=32,
                   evals=20),
}

FIELDS = tuple(f.name for f in dataclasses.fields(FitConfig))
DERIVED_PLACEHOLDERS = dict(tokenizer_steps=1, steps=1, k=2, eval_every=1)  # fields only the rules give a value
def _choices() -> dict[str, tuple]:
    """The names a field may take (imported here: the models' modules import torch, which --help must not)."""
    from ctfgen.backends.precision import PRECISIONS
    from ctfgen.checkpoint import DTYPES
    from ctfgen.models.config import GPT_PRESETS
    from ctfgen.tokenizer.model import VQ_PRESETS
    from ctfgen.training.schedule import LR_SCHEDULES

    gpts = tuple(GPT_PRESETS)
    return {"tokenizer_model": tuple(VQ_PRESETS), "stage1_model": gpts, "stage2_model": gpts, "baseline_model": gpts,
            "lr_schedule": LR_SCHEDULES, "precision": PRECISIONS, "tokenizer_precision": PRECISIONS,
            "pipeline_dtype": tuple(DTYPES)}


def read_toml(path) -> dict:
    """The overrides in a --config TOML file: FitConfig keys at its top level; an unknown key refused by name."""
    import tomllib

    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except FileNotFoundError:
        raise CtfgenError(f"--config {path} does not exist; pass a TOML file of fit.json's config keys") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CtfgenError(f"--config {path} is not valid TOML ({e})") from None
    unknown = [key for key in values if key not in FIELDS]
    if unknown:
        raise CtfgenError(f"--config {path}: unknown key {unknown[0]!r}; the keys are those of fit.json's config: "
                          f"{', '.join(FIELDS)}")
    return values


def _power_of_two_at_most(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def resolve(preset_name: str, n_train: int, n_val: int, given: dict, *, data_defaults: dict | None = None,
            codebook_of_tokenizer: int | None = None) -> FitConfig:
    """The FitConfig of preset `preset_name` for `n_train` training and `n_val` held-out images: the preset's fixed
    values, then `data_defaults` (what the data calls for, e.g. 32 px for Fashion-MNIST-like images), then the rules
    for what `given` (the overrides) leaves out. `codebook_of_tokenizer`: a reused tokenizer's codebook size."""
    preset = PRESETS[preset_name]
    values = {**preset.fixed, **(data_defaults or {}), **given}
    if codebook_of_tokenizer is not None:
        if given.get("codebook_size", codebook_of_tokenizer) != codebook_of_tokenizer:
            raise CtfgenError(f"codebook_size {given['codebook_size']}: the reused tokenizer has "
                              f"{codebook_of_tokenizer} codewords")
        values["codebook_size"] = codebook_of_tokenizer
    _check(values)  # before the rules compute with them

    def derive(key, value):
        if key not in given:
            values[key] = value

    derive("tokenizer_batch_size", min(values["tokenizer_batch_size"], _power_of_two_at_most(n_train)))
    derive("batch_size", min(values["batch_size"], _power_of_two_at_most(n_train)))
    derive("tokenizer_steps", max(preset.tokenizer_min_steps,
                                  preset.tokenizer_epochs * math.ceil(n_train / values["tokenizer_batch_size"])))
    derive("steps", max(preset.min_steps, preset.epochs * math.ceil(n_train / values["batch_size"])))
    derive("tokenizer_warmup_steps", min(values["tokenizer_warmup_steps"], values["tokenizer_steps"] // 10))
    derive("warmup_steps", min(values["warmup_steps"], values["steps"] // 10))
    if codebook_of_tokenizer is None:
        from ctfgen.tokenizer.model import VQ_PRESETS

        tokens = (values["image_size"] // VQ_PRESETS[values["tokenizer_model"]].downsample) ** 2
        derive("codebook_size", max(2, min(values["codebook_size"],
                                           _power_of_two_at_most(n_train * tokens // MIN_TOKENS_PER_CODE))))
    derive("k", max(2, values["codebook_size"] // preset.codes_per_cluster))
    derive("eval_every", max(1, values["steps"] // preset.evals))
    derive("eval_items", min(values["eval_items"], n_val))
    config = FitConfig(**values)
    if config.k > config.codebook_size:
        raise CtfgenError(f"k {config.k}: more clusters than the {config.codebook_size} codewords")
    return config


def _check(values: dict) -> None:
    """Refuse a value of the wrong type, out of range or not among its field's choices, by its key, before the rules
    compute with the values (the fields only the rules give a value hold placeholders)."""
    FitConfig(**{**DERIVED_PLACEHOLDERS, **values})
