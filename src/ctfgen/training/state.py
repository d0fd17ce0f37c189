"""A training run's resumable state: the step, the optimizer, every process's random state (read weights-only)."""

from __future__ import annotations

from pathlib import Path

import torch

from ctfgen.checkpoint import RESUME_FIX, TRAIN_STATE_NAME
from ctfgen.errors import CtfgenError

RUN_CONFIG_NAME = "train_config.json"  # beside a training run's checkpoint/: the options it was started with


def is_run_dir(directory) -> bool:
    """Whether `directory` is the output of a training run (what `--resume` continues): its train_config.json."""
    return (Path(directory) / RUN_CONFIG_NAME).is_file()


def _is_rng_state(state) -> bool:
    cpu = state.get("cpu") if isinstance(state, dict) else None
    return (isinstance(cpu, torch.Tensor) and cpu.dtype == torch.uint8
            and cpu.shape == torch.get_rng_state().shape)


def _train_state_problem(state) -> str | None:
    if not isinstance(state, dict):
        return "not a dictionary"
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"step {step!r} is not a step number"
    rng = state.get("rng")
    if not isinstance(rng, list) or not rng or not all(_is_rng_state(r) for r in rng):
        return "no valid random-number state"
    optimizer = state.get("optimizer")
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in optimizer["param_groups"])):
        return "no valid optimizer state"
    return None


def load_train_state(directory) -> dict:
    """The training state saved beside a checkpoint's weights (read weights-only: nothing is unpickled), checked
    for the entries every training loop reads: step, rng (one per process), optimizer."""
    path = Path(directory) / TRAIN_STATE_NAME
    if not path.is_file():
        raise CtfgenError(f"{directory} has no {TRAIN_STATE_NAME}: it cannot be resumed (exported weights only)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, random bytes, or a pickle that would need code to load
        raise CtfgenError(f"cannot read {path} as a weights-only PyTorch file ({type(e).__name__}); it is damaged or "
                          f"not ctfgen's: remove the checkpoint to start afresh") from None
    problem = _train_state_problem(state)
    if problem:
        raise CtfgenError(f"{path} is not a ctfgen training state ({problem}); remove the checkpoint to start afresh")
    return state


def load_ema_weights(directory, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The exponential moving average of the weights that a run trained with --ema keeps in its training state,
    checked against the checkpoint's `weights`: the same tensors, shapes and finite values."""
    if not (Path(directory) / TRAIN_STATE_NAME).is_file():
        raise CtfgenError(f"{directory} keeps no EMA weights (no {TRAIN_STATE_NAME}: exported weights or a snapshot); "
                          f"export the checkpoint/ of a run trained with --ema")
    ema = load_train_state(directory).get("ema")
    if ema is None:
        raise CtfgenError(f"{directory} keeps no EMA weights: its run was trained without --ema; export without --ema")
    if not (isinstance(ema, dict) and ema.keys() == weights.keys()
            and all(isinstance(v, torch.Tensor) and v.is_floating_point() and v.shape == weights[k].shape
                    and v.isfinite().all() for k, v in ema.items())):
        raise CtfgenError(f"{Path(directory) / TRAIN_STATE_NAME}: its EMA weights do not match the checkpoint's "
                          f"weights (other tensors, shapes, or non-finite values); export without --ema")
    return ema


def check_optimizer_state(optimizer_state: dict, optimizer: torch.optim.Optimizer, directory) -> None:
    """Refuse saved optimizer state that does not fit `optimizer`'s parameters, before it is loaded: a mismatch
    would otherwise surface as a crash at the first step."""
    where = Path(directory) / TRAIN_STATE_NAME
    shapes = [p.shape for group in optimizer.param_groups for p in group["params"]]
    numbers = sorted(p for group in optimizer_state["param_groups"] for p in group["params"])
    if numbers != list(range(len(shapes))):
        raise CtfgenError(f"{where} holds optimizer state for {len(numbers)} parameters, this run trains "
                          f"{len(shapes)}; {RESUME_FIX}")
    for number, entry in optimizer_state["state"].items():
        tensors = entry.values() if isinstance(entry, dict) and number in range(len(shapes)) else None
        if tensors is None or any(isinstance(t, torch.Tensor) and t.dim() and tuple(t.shape) != tuple(shapes[number])
                                  for t in tensors):
            raise CtfgenError(f"{where}: the optimizer state of parameter {number} does not fit its shape; "
                              f"{RESUME_FIX}")


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
