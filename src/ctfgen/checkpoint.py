"""Checkpoint directories: `config.json` + `model.safetensors` (+ `train_state.pt` to resume).

Writes go to a temporary sibling and are renamed into place, so an interrupted save never
leaves a half-written checkpoint behind. Nothing is ever unpickled: the training state is read
with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CtfgenError

CONFIG_NAME, WEIGHTS_NAME, TRAIN_STATE_NAME = "config.json", "model.safetensors", "train_state.pt"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path, directory: bool) -> None:
    """tempfile (and safetensors' own temporary file) create private files (0600/0700); give finished outputs,
    and the files of a finished directory, the usual permissions."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())
    if directory:
        for file in Path(path).iterdir():
            _publish_mode(file, directory=file.is_dir())


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory `tmp` to `final`, replacing what was there."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def write_atomic(path: Path, write) -> None:
    """Call write(tmp_path) and rename the result to `path` only once it is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _publish_mode(tmp, directory=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(directory, config: dict, state_dict: dict, train_state: dict | None = None,
                    dtype: str | None = None) -> Path:
    """Write a checkpoint directory atomically; `dtype` casts floating weights (e.g. "bf16" to ship)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        if dtype is not None:
            tensors = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(tensors, tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE_NAME)
        _publish_mode(tmp, directory=True)
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_config(directory, kind: str) -> dict:
    """The JSON config of a checkpoint of the given kind, or one clear error."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CtfgenError(f"{directory} is not a ctfgen {kind} checkpoint (no {CONFIG_NAME}); pass a directory "
                          f"written by ctfgen")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CtfgenError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from None
    if config.get("kind") != kind:
        raise CtfgenError(f"{directory} holds a {config.get('kind')!r} checkpoint, not a {kind!r} one")
    return config


def load_weights(directory) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise CtfgenError(f"{directory} has no {WEIGHTS_NAME}; the checkpoint is incomplete")
    try:
        return {k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()}
    except (SafetensorError, OSError) as e:
        raise CtfgenError(f"cannot read {path} ({e}); the checkpoint is corrupt") from None


def load_train_state(directory) -> dict:
    path = Path(directory) / TRAIN_STATE_NAME
    if not path.is_file():
        raise CtfgenError(f"{directory} has no {TRAIN_STATE_NAME}: it cannot be resumed (exported weights only)")
    return torch.load(path, map_location="cpu", weights_only=True)


def capture_rng() -> dict:
    """This process's random state (CPU, and CUDA when present) for an exact resume."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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
        config = load_config(directory, cls.checkpoint_kind)
        model = cls(cls.config_class(**config["model"]))
        try:
            model.load_state_dict(load_weights(directory))
        except RuntimeError as e:
            raise CtfgenError(f"{directory}: weights do not match its config.json ({str(e).splitlines()[0]})") from None
        return model.to(device).eval()
