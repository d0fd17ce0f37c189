"""Crash consistency of training: SIGKILL a run at random moments, resume it each time, compare with a run that
was never interrupted.

    OMP_NUM_THREADS=1 python benchmarks/kill_resume.py               # 20 kills, GPT-tiny stage 1, fp32
    OMP_NUM_THREADS=1 python benchmarks/kill_resume.py --kills 5 --steps 100 --keep /tmp/kill_resume

Synthetic Fashion-MNIST-shaped images go through a random tiny VQ tokenizer into codes and a K = 8 map (as
tests/test_train.py does); `ctfgen train --stage stage1 --model GPT-tiny --precision fp32` then runs as a
subprocess and is killed with SIGKILL, half of the time at a random step (a random number of logged steps in,
plus a random fraction of a step), half of the time during a checkpoint write (as soon as the checkpoint's
temporary directory appears, plus up to a few milliseconds). After every kill the checkpoint must load (config,
weights, training state, the same step in each): a kill may cost the steps since the last checkpoint, never the
checkpoint. The run is resumed (--resume) until it completes; its final weights must equal the uninterrupted
run's (max abs diff <= 1e-6; dropout and class dropout on, so the saved random state matters too). Prints JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ctfgen.checkpoint import load_config, load_weights
from ctfgen.clustering import cluster_codebook
from ctfgen.data.codes import extract_codes
from ctfgen.data.datasets import FashionMNIST
from ctfgen.errors import CtfgenError
from ctfgen.tokenizer.model import VQ_PRESETS, VQConfig, VQModel
from ctfgen.training.state import load_train_state

TOKENIZER = VQConfig(**(VQ_PRESETS["VQ-tiny"].to_dict() | {"encoder_ch_mult": [1, 1, 1],
                                                          "decoder_ch_mult": [1, 1, 1]}))  # 8 x 8 tokens


def write_fake_fmnist(root: Path, n: int = 256) -> None:
    """Fashion-MNIST-shaped IDX files (train split only): one bar shape per class, with noise."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 10
    images = np.zeros((n, 28, 28), np.uint8)
    for i, c in enumerate(labels):
        images[i, 2 + c:26 - c, 4:24] = 120 + 10 * c
    images = np.clip(images + rng.integers(0, 20, images.shape), 0, 255)
    for name, array in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
        with gzip.open(root / f"{name}.gz", "wb") as f:
            f.write(header + array.astype(np.uint8).tobytes())


def prepare(work: Path) -> tuple[Path, Path]:
    """Codes and a coarse map of the synthetic images under a random tiny tokenizer."""
    (work / "fmnist").mkdir()
    write_fake_fmnist(work / "fmnist")
    torch.manual_seed(0)
    tokenizer = VQModel(TOKENIZER).eval()
    extract_codes(tokenizer, FashionMNIST("train", data_dir=work / "fmnist"), work / "codes", batch_size=64,
                  progress=False)
    cluster_codebook(tokenizer.codebook_weights, 8, n_init=1).save(work / "map.safetensors")
    return work / "codes", work / "map.safetensors"


def command(codes: Path, coarse_map: Path, out: Path, steps: int, ckpt_every: int, resume: bool) -> list[str]:
    return [sys.executable, "-m", "ctfgen.cli", "train", "--stage", "stage1", "--model", "GPT-tiny",
            "--codes", str(codes), "--map", str(coarse_map), "--out", str(out), "--steps", str(steps),
            "--batch-size", "16", "--lr", "1e-3", "--ckpt-every", str(ckpt_every), "--log-every", "1",
            "--precision", "fp32", "--device", "cpu", "--no-progress"] + (["--resume"] if resume else [])


def logged_steps(run: Path) -> int:
    try:
        return len((run / "metrics.jsonl").read_bytes().splitlines())
    except FileNotFoundError:
        return 0


def temporary_dirs(run: Path) -> set[str]:
    """save_checkpoint's temporary siblings of checkpoint/: one exists while a checkpoint is written, and a kill
    in the middle of a write leaves it behind."""
    return {p.name for p in run.iterdir() if p.name.startswith(".checkpoint.")} if run.is_dir() else set()


def writing_checkpoint(run: Path, left_behind: set[str]) -> bool:
    return bool(temporary_dirs(run) - left_behind)


def wait_for(condition, proc: subprocess.Popen, poll: float) -> bool:
    """Poll until `condition()` or the process ends; True when the condition came first."""
    while proc.poll() is None:
        if condition():
            return True
        time.sleep(poll)
    return False


def checkpoint_problem(ckpt: Path, had_checkpoint: bool) -> str | None:
    """Why the checkpoint left behind by a kill could not be resumed from, or None."""
    if not ckpt.exists():
        return "the checkpoint is gone" if had_checkpoint else None
    try:
        config, state = load_config(ckpt, "gpt"), load_train_state(ckpt)
        load_weights(ckpt)
    except CtfgenError as e:
        return str(e)
    return None if config["step"] == state["step"] else f"config step {config['step']} != state step {state['step']}"


def killed_run(codes: Path, coarse_map: Path, run: Path, args, rng: random.Random, env: dict) -> dict:
    """Run to completion through `args.kills` SIGKILLs; returns what happened."""
    kills, during_write, problems, starts = 0, 0, [], 0
    while True:
        resume = (run / "checkpoint" / "train_state.pt").exists()
        writing = partial(writing_checkpoint, run, temporary_dirs(run))
        proc = subprocess.Popen(command(codes, coarse_map, run, args.steps, args.ckpt_every, resume), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        starts += 1
        if kills < args.kills:
            if rng.random() < 0.5:  # during a checkpoint write
                reached = wait_for(writing, proc, poll=0.001)
                time.sleep(rng.uniform(0, 0.003))
            else:  # at a random step, a random fraction into it
                target = logged_steps(run) + rng.randint(0, max(1, args.steps // args.kills))
                reached = wait_for(lambda target=target: logged_steps(run) >= target, proc, poll=0.002)
                time.sleep(rng.uniform(0, 0.02))
            if reached and proc.poll() is None:
                in_write = writing()
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                kills += 1
                during_write += in_write
                problem = checkpoint_problem(run / "checkpoint", had_checkpoint=resume)
                if problem:
                    problems.append(problem)
                continue
        _, stderr = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"a resumed run failed (exit {proc.returncode}): {stderr.decode().strip()}")
        return {"kills": kills, "kills_during_checkpoint_write": during_write, "starts": starts,
                "unreadable_checkpoints": len(problems), "problems": problems,
                "temporary_dirs_left_behind": len(temporary_dirs(run))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--ckpt-every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    parser.add_argument("--keep", help="work in this new directory and keep it (default: a temporary one)")
    args = parser.parse_args()
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=not args.keep)
        codes, coarse_map = prepare(work)
        straight = subprocess.run(command(codes, coarse_map, work / "straight", args.steps, args.ckpt_every, False),
                                  env=env, capture_output=True, text=True)
        if straight.returncode != 0:
            raise SystemExit(f"the uninterrupted run failed: {straight.stderr.strip()}")
        result = killed_run(codes, coarse_map, work / "killed", args, random.Random(args.seed), env)
        a, b = load_weights(work / "straight/checkpoint"), load_weights(work / "killed/checkpoint")
        diff = max(float((a[name] - b[name]).abs().max()) for name in a) if a.keys() == b.keys() else float("inf")
        steps = [load_config(work / run / "checkpoint", "gpt")["step"] for run in ("straight", "killed")]
    result |= {"steps": args.steps, "ckpt_every": args.ckpt_every, "final_steps": steps,
               "max_abs_diff": diff, "equal": diff <= 1e-6 and steps[0] == steps[1] == args.steps,
               "omp_num_threads": env["OMP_NUM_THREADS"], "seconds": round(time.perf_counter() - tic, 1)}
    print(json.dumps(result, indent=2))
    if not result["equal"] or result["unreadable_checkpoints"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
