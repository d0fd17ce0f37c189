"""The frame of a training run, shared by the tokenizer's loop and the transformers' loop.

A loop keeps only its own steps; what every run does around them is here, once:

    run = TrainingRun(cfg, runtime, "stage1")   # options checked; an --out that is not a run of ours refused
    saved = run.start(model, optimizer)         # --resume: the checkpoint into model, optimizer and this rank's
                                                # RNG; else an --out that already holds a run is refused
    with run:                                   # train_config.json written, SIGTERM/SIGINT caught, progress bar
        for step in range(run.start_step, cfg.steps):
            ...                                 # the loop's own step
            run.log(metrics)                    # a line of metrics.jsonl
            if run.end_step(step + 1):          # checkpoint every ckpt_every steps, at the last one and on a stop
                break                           # SIGTERM/SIGINT on any rank: every rank stops after this step

What a run leaves in --out: train_config.json (its options), metrics.jsonl, checkpoint/ (config.json: the model's
kind and config, the run's options, the step; model.safetensors: the full weights; train_state.pt: the step, the
RNG state of every rank, the optimizer state numbered as `optimizer.state_dict()` numbers it, and the loop's own
entries) and, with `snapshot_every`, snapshots/step_N (weights only, for scoring the run's progress afterwards).
The tensors are full whether the run is sharded (FSDP) or not, so either kind of run resumes the other's.

Where stderr is not a terminal (a log file, a batch job), there is no progress bar; a line at every tenth of the run
says how far it is instead (at most one a minute, so short runs stay quiet).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm import tqdm

from ctfgen.checkpoint import TRAIN_STATE_NAME, check_weight_shapes, load_weights, remove_stale_writes, save_checkpoint
from ctfgen.errors import CtfgenError
from ctfgen.files import append_line, held_alone, write_atomic
from ctfgen.training.distributed import Runtime, all_gather_object, any_rank, barrier
from ctfgen.training.state import (
    RUN_CONFIG_NAME,
    capture_rng,
    check_optimizer_state,
    is_run_dir,
    load_train_state,
    restore_rng,
)
from ctfgen.validation import check_output

METRICS_NAME = "metrics.jsonl"


class StopFlag:
    """Set by SIGTERM/SIGINT so the loop can checkpoint and exit cleanly."""

    def __init__(self):
        self.raised = False
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.raised = True

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class TrainingRun:
    """One training run of `cfg` (a config with out, steps, ckpt_every, resume, progress), named `name` on its
    progress bar; `snapshot_every` > 0 also keeps the weights of every N-th step under snapshots/."""

    def __init__(self, cfg, runtime: Runtime, name: str, snapshot_every: int = 0):
        self.out = check_output(cfg.out, flag="--out", what="a training run", is_ours=is_run_dir, overwrite=True)
        self.cfg, self.runtime, self.name, self.snapshot_every = cfg, runtime, name, snapshot_every
        self.checkpoint_dir = self.out / "checkpoint"
        self.start_step = 0
        self._held = ExitStack()  # the folder's lock, from start() to the end of the run

    def start(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              extra_state: Callable[[], dict] = dict) -> dict | None:
        """Attach the model (plain, or sharded in place by FSDP) and its optimizer: every checkpoint saves them,
        with the entries `extra_state()` returns (called on every rank at each save; rank 0's are saved). With
        --resume, load the checkpoint's weights and optimizer state into them, restore this rank's RNG and
        return the saved training state (for the loop's own entries); else refuse an --out that holds a run
        and return None. While the run lasts, another process's run of the same --out is refused."""
        # Two runs in one folder would write their checkpoints over each other. (A --resume of a folder that is not
        # there is refused below; locking it would create it.)
        if self.runtime.is_main and (self.out.is_dir() or not self.cfg.resume):
            self._held.enter_context(held_alone(self.out, f"--out {self.cfg.out}"))
        try:
            return self._attach(model, optimizer, extra_state)
        except BaseException:
            self._held.close()
            raise

    def _attach(self, model, optimizer, extra_state) -> dict | None:
        self.model, self.optimizer, self.extra_state = model, optimizer, extra_state
        if self.runtime.is_main:  # a run killed while saving left its temporary directories
            remove_stale_writes(self.out, self.checkpoint_dir.name)
            remove_stale_writes(self.out / "snapshots", "step_*")
        saved = None
        if self.cfg.resume:
            saved = load_train_state(self.checkpoint_dir)
            check_weight_shapes(model, self.checkpoint_dir, resuming=True)
            check_optimizer_state(saved["optimizer"], optimizer, self.checkpoint_dir)
            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, load_weights(self.checkpoint_dir), options=options)
            names = dict(enumerate(_param_names(model, optimizer)))
            set_optimizer_state_dict(model, optimizer, _rekeyed(saved["optimizer"], names), options=options)
            self.start_step = int(saved["step"])
            restore_rng(saved["rng"][min(self.runtime.rank, len(saved["rng"]) - 1)])
            if self.runtime.is_main:
                self._forget_metrics_after(self.start_step)
        elif self.runtime.is_main and (self.checkpoint_dir / TRAIN_STATE_NAME).exists():
            raise CtfgenError(f"{self.checkpoint_dir} already holds a run; pass --resume to continue it or choose "
                              f"another --out")
        if self.start_step >= self.cfg.steps:
            raise CtfgenError(f"the run in {self.cfg.out} already reached step {self.start_step} of {self.cfg.steps}; "
                              f"raise --steps")
        return saved

    def _forget_metrics_after(self, step: int) -> None:
        """A run killed after its last checkpoint had logged steps the resumed run takes again: drop those lines,
        so that metrics.jsonl tells each step once, as the weights went."""
        path = self.out / METRICS_NAME
        if not path.is_file():
            return
        lines = path.read_text().splitlines()
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        if len(kept) < len(lines):
            write_atomic(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))

    def __enter__(self) -> TrainingRun:
        if self.runtime.is_main:
            config = json.dumps(asdict(self.cfg), indent=2) + "\n"
            write_atomic(self.out / RUN_CONFIG_NAME, lambda tmp: Path(tmp).write_text(config))
        self._stop = StopFlag()
        self._bar = tqdm(total=self.cfg.steps, initial=self.start_step, desc=self.name, unit="step",
                         dynamic_ncols=True, disable=not (self.cfg.progress and self.runtime.is_main))
        self._lines = self._bar.disable and self.runtime.is_main and not sys.stderr.isatty()
        self._figures, self._started = {}, time.monotonic()
        self._last_line = self._started
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()
        self._stop.restore()
        self._held.close()

    def log(self, metrics: dict) -> None:
        """Append one line to metrics.jsonl (rank 0 writes it)."""
        if self.runtime.is_main:
            append_line(self.out / METRICS_NAME, json.dumps(metrics))

    def show(self, **figures) -> None:
        """Figures beside the progress bar (or in the progress lines)."""
        self._bar.set_postfix(**figures)
        self._figures = figures

    def _progress_line(self, step: int) -> None:
        """A line for a log: the step, the figures last shown, the time left at the pace so far."""
        if step % max(1, self.cfg.steps // 10):
            return
        now = time.monotonic()
        if now - self._last_line < PROGRESS_LINE_SECONDS:
            return
        self._last_line = now
        left = (now - self._started) / (step - self.start_step) * (self.cfg.steps - step)
        figures = "".join(f", {name} {value}" for name, value in self._figures.items())
        print(f"{self.name}: step {step} of {self.cfg.steps}{figures}, about {format_duration(left)} left",
              file=sys.stderr, flush=True)

    def end_step(self, step: int) -> bool:
        """After step `step` (counted from 1) on every rank: advance the progress bar, agree whether to stop
        (SIGTERM/SIGINT on any rank), checkpoint every ckpt_every steps, at the last step, on a stop and at
        snapshots. True: stop now."""
        self._bar.update(1)
        if self._lines:
            self._progress_line(step)
        stop = any_rank(self._stop.raised, self.runtime)  # all ranks stop together, or the next collective hangs
        snapshot = self.snapshot_every > 0 and step % self.snapshot_every == 0
        if step % self.cfg.ckpt_every == 0 or step == self.cfg.steps or stop or snapshot:
            self.save(step, snapshot)
        return stop

    def save(self, step: int, snapshot: bool = False) -> None:
        """Write checkpoint/ (and with `snapshot` snapshots/step_N) atomically. Every rank must call it: the RNG
        states are gathered, and under FSDP the shards."""
        rng = all_gather_object(capture_rng(), self.runtime)
        full = full_state(self.model, self.optimizer, self.runtime)
        extra = self.extra_state()
        if self.runtime.is_main:
            weights, optimizer_state = full
            config = {"kind": self.model.checkpoint_kind, "model": asdict(self.model.config),
                      "train": asdict(self.cfg), "step": step}
            train_state = {"optimizer": optimizer_state, **extra, "step": step, "rng": rng}
            save_checkpoint(self.checkpoint_dir, config, weights, train_state=train_state)
            if snapshot:
                save_checkpoint(self.out / "snapshots" / f"step_{step:07d}", config, weights)
        barrier(self.runtime)


PROGRESS_LINE_SECONDS = 60  # at most one progress line a minute


def format_duration(seconds: float) -> str:
    """12.3s, 4m05s, 2h10m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


# Full tensors on the CPU of rank 0, whether the module is sharded (FSDP) or not.
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _param_names(model, optimizer) -> list[str]:
    """Parameter names in the optimizer's order, i.e. `optimizer.state_dict()`'s numbering."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _rekeyed(optimizer_state: dict, key: dict) -> dict:
    """An optimizer state dict with its parameter keys mapped through `key` (numbers <-> names)."""
    return {"state": {key[k]: v for k, v in optimizer_state["state"].items()},
            "param_groups": [{**g, "params": [key[p] for p in g["params"]]} for g in optimizer_state["param_groups"]]}


def full_state(model, optimizer, runtime: Runtime) -> tuple[dict, dict] | None:
    """(weights, optimizer state numbered as `optimizer.state_dict()`) as full CPU tensors on rank 0, None on the
    other ranks. Every rank must call it: under FSDP it gathers the shards."""
    weights = get_model_state_dict(model, options=FULL_STATE)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=FULL_STATE)  # keyed by parameter name
    if not runtime.is_main:
        return None
    numbers = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    return weights, _rekeyed(optimizer_state, numbers)

