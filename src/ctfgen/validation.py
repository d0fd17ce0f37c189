"""Checks at the boundary: options, configs and output paths are refused here, with one line that names the
flag or file and says what to do, so that the code behind them can trust its inputs.

Every rule is a plain value (`Whole(1)`: a whole number >= 1) checked by `check_values`, against an option
table (`OPTION_RULES`, shared by every command and training config) or a config's own table.
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ctfgen.errors import CtfgenError

# Sizes beyond these are refused before anything is built: they are far beyond any model or dataset this
# code serves (LlamaGen: 16384 codes, 1000 classes, 576 tokens, 48 layers), and a config or file claiming
# more is corrupt or hostile, not a model to allocate.
MAX_SEED = 2**32 - 1  # a seed is one 32-bit word of the SeedSequence its streams derive from (ctfgen.seeding)
MAX_VOCAB = 2**24
MAX_CLASSES = 2**20
MAX_TOKENS = 2**16  # image tokens per grid: 256 x 256
MAX_WIDTH = 2**16  # model dimension, channels
MAX_LAYERS = 1024
MAX_IMAGE_SIZE = 4096


@dataclass(frozen=True)
class Whole:
    """A whole number in [low, high]."""

    low: int
    high: int | None = None

    def problem(self, value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return "must be a whole number"
        if value < self.low or (self.high is not None and value > self.high):
            return f"must be {_range_text(self.low, self.high)}"
        return None


@dataclass(frozen=True)
class Real:
    """A finite number in [low, high], or (low, ...) with low_open, or [..., high) with high_open."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def problem(self, value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return "must be a finite number"
        below = value <= self.low if self.low_open else value < self.low
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            if self.high is None:
                return f"must be {'above' if self.low_open else 'at least'} {self.low:g}"
            opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"must be in {opening}{self.low:g}, {self.high:g}{closing}"
        return None


def _range_text(low, high) -> str:
    return f"at least {low}" if high is None else f"between {low} and {high}"


POSITIVE, NON_NEGATIVE = Whole(1), Whole(0)
PROBABILITY, DECAY = Real(0, 1), Real(0, 1, high_open=True)

# Command-line options (and the training configs' fields of the same names). None always means "not given".
OPTION_RULES = {
    **dict.fromkeys(["steps", "batch_size", "grad_accum", "eval_every", "eval_items", "ckpt_every", "log_every",
                     "n", "n_init", "limit", "k", "epochs", "columns", "pr_points", "is_splits", "floor_n",
                     "threads"], POSITIVE),
    **dict.fromkeys(["warmup_steps", "snapshot_every", "views", "num_workers", "gan_start", "restart_every",
                     "shift"], NON_NEGATIVE),
    "seed": Whole(0, MAX_SEED),
    "codebook_size": Whole(1, MAX_VOCAB),
    "image_size": Whole(1, MAX_IMAGE_SIZE),
    "hidden": Whole(1, MAX_WIDTH),
    "pool_grid": Whole(1, MAX_IMAGE_SIZE),
    "lr": Real(0, low_open=True),
    "grad_clip": Real(0, low_open=True),
    **dict.fromkeys(["weight_decay", "entropy_loss_ratio", "gan_weight"], Real(0)),
    **dict.fromkeys(["beta1", "beta2", "ema", "dropout"], DECAY),
    "class_dropout": PROBABILITY,
}


def check_values(obj, rules: dict, name: Callable[[str], str] = str) -> None:
    """Refuse the first attribute of `obj` that breaks its rule (attributes it lacks, or that are None, pass);
    `name` turns an attribute name into what the message calls it."""
    for attr, rule in rules.items():
        value = getattr(obj, attr, None)
        if value is not None and (problem := rule.problem(value)):
            raise CtfgenError(f"{name(attr)} {problem}, got {value!r}")


def flag_name(attr: str) -> str:
    return "--" + attr.replace("_", "-")


def check_options(options) -> None:
    """The command-line options of an argparse namespace or a training config, against OPTION_RULES."""
    check_values(options, OPTION_RULES, name=flag_name)


# --- configs ----------------------------------------------------------------------------------

def _has_type(value, annotation) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if origin in (list, tuple):
        return isinstance(value, origin) and all(_has_type(v, args[0]) for v in value)
    return isinstance(value, annotation)


def _type_text(annotation) -> str:
    text = str(annotation).replace("typing.", "")
    return {"<class 'int'>": "a whole number", "<class 'float'>": "a finite number", "<class 'bool'>": "true or false",
            "<class 'str'>": "a string"}.get(text, text)


def check_field_types(config) -> None:
    """Refuse a dataclass whose fields do not hold their annotated types (a config.json with "dim": "256")."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if not _has_type(value, hints[field.name]):
            raise CtfgenError(f"{field.name} must be {_type_text(hints[field.name])}, got {value!r}")


def config_from_dict(config_class: type, values, where: str):
    """`config_class(**values)` for a config read from a file, or one line naming the file and the bad entry.
    Unknown keys are refused; keys an older file lacks take the field's default."""
    if not isinstance(values, dict):
        raise CtfgenError(f"{where}: the model config is not a JSON object; the checkpoint is corrupt")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(config_class)})
    if unknown:
        raise CtfgenError(f"{where}: unknown model config keys {', '.join(map(repr, unknown))}; the checkpoint was "
                          f"not written by this version of ctfgen, or is corrupt")
    try:
        return config_class(**values)
    except CtfgenError as e:
        raise CtfgenError(f"{where}: {e}") from None


# --- output paths -----------------------------------------------------------------------------

def _file_kind(path: Path) -> str:
    if path.is_symlink():
        return "a symbolic link"
    mode = path.stat().st_mode
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a file"
    return "a special file (device, pipe or socket)"


def check_destination(path, directory: bool) -> None:
    """Refuse to write a `directory` (or a file) at `path` when what is there is of another sort: a symlink,
    a device, a file where a directory goes. Renaming over those would replace what they are or point to."""
    path = Path(path)
    if path.is_symlink() or path.exists():
        kind = _file_kind(path)
        if kind != ("a directory" if directory else "a file"):
            raise CtfgenError(f"{path} is {kind}; ctfgen writes its {'directories' if directory else 'files'} "
                              f"only over its own earlier output: choose another path")


def check_writable_place(path) -> None:
    """Refuse a path that cannot be created: under a file, or in a read-only directory."""
    ancestor = Path(os.path.abspath(path)).parent
    while not ancestor.exists() and not ancestor.is_symlink():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CtfgenError(f"cannot write {path}: {ancestor} is {_file_kind(ancestor)}, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CtfgenError(f"cannot write {path}: {ancestor} is not writable; choose another path")


def check_output(path, *, flag: str, what: str, is_ours: Callable[[Path], bool], overwrite: bool,
                 directory: bool = True) -> Path:
    """The output `path` of a command, refused before any work is done unless it is new, an empty directory,
    or `what` ctfgen wrote before and `overwrite` is given. Nothing that ctfgen did not write is ever replaced."""
    path = Path(path)
    check_destination(path, directory)
    if path.exists() and not (directory and not any(path.iterdir())):
        if not is_ours(path):
            raise CtfgenError(f"{flag} {path} exists and is not {what}; ctfgen replaces only its own earlier "
                              f"output: choose another {flag}")
        if not overwrite:
            raise CtfgenError(f"{flag} {path} already holds {what}; pass --overwrite to replace it")
    check_writable_place(path)
    return path
