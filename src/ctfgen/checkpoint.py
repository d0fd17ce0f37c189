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
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ctfgen.errors import CtfgenError
from ctfgen.files import write_dir_atomic
from ctfgen.validation import config_from_dict

CONFIG_NAME, WEIGHTS_NAME, TRAIN_STATE_NAME = "config.json", "model.safetensors", "train_state.pt"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
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


def save_checkpoint(directory, config: dict, state_dict: dict, train_state: dict | None = None,
                    dtype: str | None = None) -> Path:
    """Write a checkpoint directory atomically; `dtype` casts floating weights (e.g. "bf16" to ship)."""
    def write(tmp: Path) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        if dtype is not None:
            tensors = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(tensors, tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE_NAME)

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
        """Write `directory`; dtype "fp16"/"bf16" casts the floating weights (to ship)."""
        config = {"kind": self.checkpoint_kind, "model": dataclasses.asdict(self.config), **(extra or {})}
        return save_checkpoint(directory, config, self.state_dict(), train_state=train_state, dtype=dtype)

    @classmethod
    def from_pretrained(cls, directory, device="cpu"):
        """The model saved in `directory`, in fp32, on `device`, in eval mode."""
        config = config_from_dict(cls.config_class, load_config(directory, cls.checkpoint_kind)["model"],
                                  str(Path(directory) / CONFIG_NAME))
        with torch.device("meta"):  # shapes only: nothing is allocated before they match the weights file
            check_weight_shapes(cls(config), directory)
        model = cls(config)
        try:
            model.load_state_dict(load_weights(directory))
        except RuntimeError as e:
            raise CtfgenError(f"{directory}: weights do not match its config.json ({str(e).splitlines()[0]})") from None
        return model.to(device).eval()
