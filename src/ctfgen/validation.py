"""Checks at the boundary: options, configs and output paths are refused here, with one line that names the
flag, field or file and says what to do, so that the code behind them can trust its inputs.

One vocabulary of rules serves every door alike. A rule is a plain value:

    Whole(1)              a whole number >= 1          Real(0, 1)                   a finite number in [0, 1]
    Whole(0, MAX_SEED)    a whole number in [0, 2^32)  Real(0, low_open=True)       a finite number > 0

A config states the rule of each field in the field's metadata ("rule"; an int field without one takes any whole
number, a float field any finite one) and checks itself when made (`check_fields`); the command line makes its
flags' argparse types from the same rules (`rule.flag_type("--steps")`: the flags made from a config take them from
its fields); the API checks an argument with `rule.check(value, "steps")`. No flag is checked anywhere else.

A number is judged by its value, not its spelling: 3, 3.0 and numpy's int64(3) are the whole number 3 (and are
stored as the int 3), whether they come from Python, from a JSON or TOML config or from the command line ("3",
"3.0", "3e0"); 3.5, true, NaN, infinity and text that is no number are not whole numbers. None means "not given"
and is never checked.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
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


class _Rule:
    """What Whole and Real share: `problem` says what is wrong with a value (None: nothing), `normal` gives the
    value in its one form (int or float)."""

    def problem(self, value) -> str | None:
        raise NotImplementedError

    def normal(self, value):
        raise NotImplementedError

    def check(self, value, what: str):
        """`value` in its normal form, or one CtfgenError that names `what` (an argument, a field, a flag)."""
        if (problem := self.problem(value)) is not None:
            raise CtfgenError(f"{what} {problem}, got {value!r}")
        return self.normal(value)

    def flag_type(self, flag: str) -> Callable[[str], int | float]:
        """An argparse `type` for `flag`: its text read as a number, then checked by this rule. A value it refuses
        ends the parse with the rule's CtfgenError, which names the flag."""
        def parse(text: str):
            return self.check(_number(text), flag)

        return parse


def _number(text: str):
    """The number a flag's text spells ("3", "3.0", "1e-4", "nan"), or the text itself when it spells none."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Whole(_Rule):
    """A whole number in [low, high] (either end may be open: None)."""

    low: int | None = None
    high: int | None = None

    def problem(self, value) -> str | None:
        if not _is_number(value) or value != int(value):
            return "must be a whole number"
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            if self.low is None:
                return f"must be at most {self.high}"
            return f"must be at least {self.low}" if self.high is None else \
                f"must be between {self.low} and {self.high}"
        return None

    def normal(self, value) -> int:
        return int(value)


@dataclass(frozen=True)
class Real(_Rule):
    """A finite number in [low, high]; low_open / high_open leave out that end; None: no bound there."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def problem(self, value) -> str | None:
        if not _is_number(value):
            return "must be a finite number"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            if self.high is None:
                return f"must be {'>' if self.low_open else '>='} {self.low:g}"
            if self.low is None:
                return f"must be {'<' if self.high_open else '<='} {self.high:g}"
            opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"must be in {opening}{self.low:g}, {self.high:g}{closing}"
        return None

    def normal(self, value) -> float:
        return float(value)


WHOLE, FINITE = Whole(), Real()  # what an int or a float field takes when it states no rule of its own
POSITIVE, NON_NEGATIVE = Whole(1), Whole(0)
SEED = Whole(0, MAX_SEED)
PROBABILITY, DECAY = Real(0, 1), Real(0, 1, high_open=True)
RATE = Real(0, low_open=True)  # a learning rate, a clipping norm: above 0
IMAGE_SIZE, PORT = Whole(1, MAX_IMAGE_SIZE), Whole(1, 65535)


def rule_of(field: dataclasses.Field, annotation) -> _Rule | None:
    """The rule of a config field: its metadata's "rule", else any whole number for an int field (int | None too)
    and any finite number for a float one; None for other fields."""
    if "rule" in field.metadata:
        return field.metadata["rule"]
    kinds = set(typing.get_args(annotation)) - {type(None)} if typing.get_origin(annotation) in (
        typing.Union, types.UnionType) else {annotation}
    return {frozenset({int}): WHOLE, frozenset({float}): FINITE}.get(frozenset(kinds))


# --- configs ----------------------------------------------------------------------------------

def ruled(default, rule: _Rule, **metadata) -> dataclasses.Field:
    """A config field with its default and its rule (and other metadata: help, choices)."""
    return dataclasses.field(default=default, metadata={"rule": rule, **metadata})


_MISMATCH = object()


def _conform(value, annotation):
    """`value` as a value of `annotation`, numbers in their normal form (3.0 in an int field: 3; in a float
    field, 3: 3.0), or _MISMATCH."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return next((v for v in (_conform(value, a) for a in args) if v is not _MISMATCH), _MISMATCH)
    if annotation is type(None):
        return None if value is None else _MISMATCH
    if annotation is bool:
        return value if isinstance(value, bool) else _MISMATCH
    if annotation is str:  # a path may come as a Path
        return os.fspath(value) if isinstance(value, (str, os.PathLike)) else _MISMATCH
    if annotation in (int, float):
        rule = WHOLE if annotation is int else FINITE
        return _MISMATCH if rule.problem(value) else rule.normal(value)
    if origin in (list, tuple):
        items = [_conform(v, args[0]) for v in value] if isinstance(value, origin) else [_MISMATCH]
        return _MISMATCH if any(v is _MISMATCH for v in items) else origin(items)
    return value if isinstance(value, annotation) else _MISMATCH


def _type_text(annotation) -> str:
    text = str(annotation).replace("typing.", "")
    return {"<class 'int'>": "a whole number", "<class 'float'>": "a finite number", "<class 'bool'>": "true or false",
            "<class 'str'>": "a string"}.get(text, text)


def check_fields(config) -> None:
    """Refuse a dataclass whose fields do not hold their annotated types (a config.json with "dim": "256") or
    break their rules (see `rule_of`), naming the field; store every value in its normal form (3.0 -> 3).
    Frozen dataclasses too: call it from __post_init__."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        normal = _conform(value, hints[field.name])
        if normal is _MISMATCH:
            raise CtfgenError(f"{field.name} must be {_type_text(hints[field.name])}, got {value!r}")
        if normal is not None and (rule := rule_of(field, hints[field.name])) is not None:
            normal = rule.check(value, field.name)  # the value as given, in the message
        object.__setattr__(config, field.name, normal)


def check_values(obj, rules: dict, name: Callable[[str], str] = str) -> None:
    """Refuse the first attribute of `obj` that breaks its rule in `rules` (a config's own table of its field
    names; attributes it lacks, or that are None, pass); `name` turns an attribute name into what the message
    calls it."""
    for attr, rule in rules.items():
        value = getattr(obj, attr, None)
        if value is not None:
            rule.check(value, name(attr))


def flag_name(attr: str) -> str:
    return "--" + attr.replace("_", "-")


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
