"""Checkpoint directories: `config.json` + `model.safetensors` (+ `train_state.pt` to resume).

Writes go to a temporary sibling and are renamed into place, so an interrupted save never
leaves a half-written checkpoint behind. Nothing is ever unpickled: the training state is read
with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import warnings
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ctfgen.choices import WEIGHT_DTYPES
from ctfgen.errors import CtfgenError
from ctfgen.files import save_tensors, write_dir_atomic
from ctfgen.validation import config_from_dict

CONFIG_NAME, WEIGHTS_NAME, TRAIN_STATE_NAME = "config.json", "model.safetensors", "train_state.pt"
DTYPES = dict(zip(WEIGHT_DTYPES, (torch.float32, torch.float16, torch.bfloat16)))
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()} | {torch.float64: "fp64"}
FILE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}  # safetensors'
SAFETENSORS_TMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")  # save_file writes here first (Rust tempfile's name)
RESUME_FIX = "resume with the options the run was started with"
MAX_BUFFER_BYTES = 2**30  # tables a model computes beyond its weights (RoPE): far more means a corrupt config


def is_checkpoint(directory, kind: str | None = None) -> bool:
    """Whether `directory` is a ctfgen checkpoint (of `kind`, when given): a config.json naming its kind."""
    try:
        config = json.loads((Path(directory) / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("kind"), str) and kind in (None, config["kind"])


def tensors_to_save(state_dict: dict, dtype: str | None = None, stored: dict | None = None) -> tuple[dict, Counter]:
    """The tensors of `state_dict` as they are to be written, and how many tensors of each dtype the cast to
    `dtype` rounded ({"fp32": n}). dtype None keeps every value: a floating tensor goes back to the dtype it was
    loaded from (`stored`, name -> dtype) where that holds it exactly (a loaded fp16 model saves fp16 again), else
    stays in its own. dtype "fp32"/"fp16"/"bf16" casts every floating tensor to it, rounding where it must."""
    if dtype is not None and dtype not in DTYPES:
        raise CtfgenError(f"dtype must be one of {', '.join(DTYPES)} (or None: as they are), got {dtype!r}")
    tensors, rounded = {}, Counter()
    for name, value in state_dict.items():
        value = value.detach().cpu().contiguous()
        if value.is_floating_point():
            target = DTYPES[dtype] if dtype else (stored or {}).get(name, value.dtype)
            cast = value.to(target)
            if not torch.equal(cast.to(value.dtype), value):
                if dtype is None:
                    cast = value  # changed since it was loaded: the stored dtype no longer holds it
                else:
                    rounded[DTYPE_NAMES.get(value.dtype, str(value.dtype))] += 1
            value = cast
        tensors[name] = value
    return tensors, rounded


def save_checkpoint(directory, config: dict, state_dict: dict, train_state: dict | None = None,
                    dtype: str | None = None, stored: dict | None = None) -> Path:
    """Write a checkpoint directory atomically, the weights as `tensors_to_save` gives them: as they are unless
    `dtype` is asked for (e.g. "fp16" to ship), and then a cast that rounds says so (a warning)."""
    tensors, rounded = tensors_to_save(state_dict, dtype, stored)
    if rounded:
        tensors_of = " and ".join(f"{count} {old}" for old, count in sorted(rounded.items()))
        warnings.warn(f"{directory}: the cast to {dtype} asked for rounded {tensors_of} weight tensors; leave the "
                      f"dtype out to save the weights as they are", stacklevel=3)

    def write(tmp: Path) -> None:
        save_tensors(tensors, tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if train_state is not None:
            with open(tmp / TRAIN_STATE_NAME, "wb") as f:  # to a path, torch raises a RuntimeError on a full disk
                torch.save(train_state, f)

    return write_dir_atomic(directory, write, is_checkpoint)


def remove_stale_writes(parent, name: str) -> list[Path]:
    """Delete what killed `save_checkpoint`s of `parent / name` (a glob, e.g. "step_*") left in `parent`: a
    temporary directory being written, or the previous checkpoint set aside; hidden directories `.<name>.*`
    holding nothing but checkpoint files (and the temporary file safetensors writes the weights to before renaming
    it, `.tmpXXXXXX`). Call it only where no other process writes there (the start of a run, on rank 0)."""
    ours = {WEIGHTS_NAME, CONFIG_NAME, TRAIN_STATE_NAME}

    def is_ours(entry: Path) -> bool:
        return entry.name in ours or SAFETENSORS_TMP.fullmatch(entry.name) is not None

    stale = [p for p in Path(parent).glob(f".{name}.*")
             if p.is_dir() and not p.is_symlink() and all(is_ours(c) for c in p.iterdir())]
    for path in stale:
        shutil.rmtree(path)
    return stale


def load_config(directory, kind: str | None) -> dict:
    """The JSON config of a checkpoint of the given kind (any kind: None), or one clear error."""
    path = Path(directory) / CONFIG_NAME
    what = f"ctfgen {kind} checkpoint" if kind else "ctfgen checkpoint"
    if not path.is_file():
        raise CtfgenError(f"{directory} is not a {what} (no {CONFIG_NAME}); pass a directory written by ctfgen")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CtfgenError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from None
    if not isinstance(config, dict) or not isinstance(config.get("kind"), str):
        raise CtfgenError(f"{path} is not a {what} config (a JSON object with a \"kind\"); the checkpoint is corrupt")
    if kind is not None and config["kind"] != kind:
        raise CtfgenError(f"{directory} holds a {config['kind']!r} checkpoint, not a {kind!r} one")
    if not isinstance(config.get("model"), dict):
        raise CtfgenError(f"{path} has no \"model\" object (the model's config); the checkpoint is corrupt")
    return config


def checkpoint_step(directory) -> int | None:
    """The training step a checkpoint was saved at (an exported one: the step it was exported from); None when
    its config does not say."""
    config = load_config(directory, kind=None)
    return config.get("step", config.get("exported_from", {}).get("step"))


def _weights_path(directory) -> Path:
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise CtfgenError(f"{directory} has no {WEIGHTS_NAME}; the checkpoint is incomplete")
    return path


def stored_dtypes(directory) -> dict[str, torch.dtype]:
    """The dtype each floating tensor has in a checkpoint's weights file (its header only is read)."""
    path = _weights_path(directory)
    try:
        with safe_open(str(path), framework="pt") as f:
            kinds = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CtfgenError(f"cannot read {path} ({e}); the checkpoint is corrupt") from None
    return {name: FILE_DTYPES[kind] for name, kind in kinds.items() if kind in FILE_DTYPES}


def load_weights(directory) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint in fp32 (integer tensors as they are); non-finite weights are refused."""
    path = _weights_path(directory)
    try:
        weights = {k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()}
    except (SafetensorError, OSError) as e:
        raise CtfgenError(f"cannot read {path} ({e}); the checkpoint is corrupt") from None
    bad = [name for name, value in weights.items() if value.is_floating_point() and not value.isfinite().all()]
    if bad:
        names = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise CtfgenError(f"{path} holds NaN or infinite weights ({names}); the run that wrote it diverged: use an "
                          f"earlier checkpoint")
    return weights


def check_weight_shapes(model: torch.nn.Module, directory, resuming: bool = False) -> None:
    """Refuse a checkpoint whose weights file does not hold exactly `model`'s tensors with their shapes, reading
    the file's header only. With `model` built on the meta device this costs no memory, so a config.json that
    claims a vocabulary of 10^12 is refused here rather than allocated. `resuming`: `model` is the one a
    training run built from its options, and the message says so."""
    path = _weights_path(directory)
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CtfgenError(f"cannot read {path} ({e}); the checkpoint is corrupt") from None
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    problems = [f"{name} missing" for name in sorted(expected.keys() - stored.keys())]
    problems += [f"unexpected {name}" for name in sorted(stored.keys() - expected.keys())]
    problems += [f"{name} is {list(stored[name])} in the file, {list(shape)} in the model"
                 for name, shape in sorted(expected.items()) if name in stored and stored[name] != shape]
    if problems:
        against, fix = ("this run's model", RESUME_FIX) if resuming else (f"its {CONFIG_NAME}", "it is corrupt")
        raise CtfgenError(f"{path} does not match {against} ({'; '.join(problems[:2])}"
                          f"{'; ...' if len(problems) > 2 else ''}); {fix}")
    extra = sum(b.numel() * b.element_size() for name, b in model.named_buffers() if name not in expected)
    if extra > MAX_BUFFER_BYTES:
        raise CtfgenError(f"{Path(directory) / CONFIG_NAME} describes a model whose tables would take "
                          f"{extra / 2**30:.0f} GiB beyond its weights (block_size too large?); it is corrupt")


class PretrainedMixin:
    """save_pretrained / from_pretrained for an nn.Module built from a dataclass `self.config`: a directory
    with config.json ({"kind", "model": the config}) and model.safetensors, written atomically."""

    checkpoint_kind: str
    config_class: type

    def save_pretrained(self, directory, dtype: str | None = None, train_state: dict | None = None,
                        extra: dict | None = None) -> Path:
        """Write `directory`. The weights are saved as they are: a model loaded by `from_pretrained` saves each
        tensor in the dtype it was loaded from (unless it changed since), so that loading gives the same model.
        dtype "fp32"/"fp16"/"bf16" casts the floating weights (to ship); a cast that rounds warns."""
        config = {"kind": self.checkpoint_kind, "model": dataclasses.asdict(self.config), **(extra or {})}
        return save_checkpoint(directory, config, self.state_dict(), train_state=train_state, dtype=dtype,
                               stored=getattr(self, "stored_dtypes", None))

    @classmethod
    def from_pretrained(cls, directory, device="cpu"):
        """The model saved in `directory`, in fp32, on `device`, in eval mode; `stored_dtypes` records the dtype
        of each of its tensors in the file, for `save_pretrained`."""
        config = config_from_dict(cls.config_class, load_config(directory, cls.checkpoint_kind)["model"],
                                  str(Path(directory) / CONFIG_NAME))
        with torch.device("meta"):  # shapes only: nothing is allocated before they match the weights file
            check_weight_shapes(cls(config), directory)
        model = cls(config)
        try:
            model.load_state_dict(load_weights(directory))
        except RuntimeError as e:
            raise CtfgenError(f"{directory}: weights do not match its config.json ({str(e).splitlines()[0]})") from None
        model.stored_dtypes = stored_dtypes(directory)
        return model.to(device).eval()
