"""The paper's shapes on one GPU: CTF against the baseline at GPT-B, and a few FSDP training steps. One JSON line.

    scripts/gpu_check.sh                       # on a CUDA machine; under 5 minutes on one H100/H200
    scripts/gpu_check.sh --cpu --tiny          # the same path on a CPU with tiny shapes: a smoke test (tested)

With random weights (speed does not depend on them): LlamaGen's VQ-16 tokenizer (V = 16384), a K = 512 k-means
map of its codebook, a GPT-B stage 1 (512-way), a GPT-B refiner and a GPT-B baseline (16384-way) at 256 tokens
in bf16. Times `ctfgen.bench.benchmark` at batch 64 with CFG 2 and the compiled decode step (captured as a CUDA
graph on CUDA), then trains stage 1 for a few steps with FSDP2 under torchrun on one process, on codes
extracted by `ctfgen.data.codes.extract_codes` from random images.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ctfgen.bench import benchmark
from ctfgen.clustering import cluster_codebook
from ctfgen.data.codes import extract_codes
from ctfgen.models.config import gpt_config
from ctfgen.models.gpt import GPT
from ctfgen.models.refiner import Refiner, refiner_config
from ctfgen.pipeline import CTFPipeline
from ctfgen.tokenizer.model import VQ_PRESETS, VQModel

SHAPES = {  # full: the paper's GPT-B setting; tiny: the same code path in seconds on a CPU
    "full": dict(tokenizer="VQ-16", image_size=256, model="GPT-B", k=512, classes=1000, batch=64, train_images=256),
    "tiny": dict(tokenizer="VQ-tiny", image_size=32, model="GPT-tiny", k=8, classes=10, batch=4, train_images=32),
}


class RandomImages(torch.utils.data.Dataset):
    """Fixed random images in [-1, 1] with labels: what extraction reads, for timing only."""

    def __init__(self, n: int, size: int, classes: int):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, size, size, generator=generator) * 2 - 1
        self.labels = torch.arange(n) % classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def build_pipeline(shape: dict, device: torch.device, dtype: torch.dtype, work: Path) -> CTFPipeline:
    torch.manual_seed(0)
    tokenizer = VQModel(VQ_PRESETS[shape["tokenizer"]]).to(device).eval()
    coarse_map = cluster_codebook(tokenizer.codebook_weights, shape["k"], n_init=1)
    coarse_map.save(work / "map.safetensors")
    tokenizer.save_pretrained(work / "tokenizer")
    v, grid = tokenizer.config.codebook_size, shape["image_size"] // tokenizer.config.downsample
    common = dict(block_size=grid * grid, num_classes=shape["classes"])
    stage1 = GPT(gpt_config(shape["model"], vocab_size=shape["k"], **common))
    stage2 = Refiner(refiner_config(shape["model"], coarse_vocab_size=shape["k"], vocab_size=v, **common))
    baseline = GPT(gpt_config(shape["model"], vocab_size=v, **common))
    models = [m.to(device=device, dtype=dtype).eval() for m in (stage1, stage2, baseline)]
    return CTFPipeline(tokenizer, coarse_map, *models)


def train_steps(shape: dict, tokenizer: VQModel, work: Path, device: torch.device, steps: int) -> dict:
    """A few stage-1 steps with FSDP2 on one process under torchrun, through the `ctfgen train` command."""
    images = RandomImages(shape["train_images"], shape["image_size"], shape["classes"])
    extract_codes(tokenizer, images, work / "codes", batch_size=64, progress=False)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "ctfgen.cli",
               "train", "--stage", "stage1", "--fsdp", "--codes", str(work / "codes"),
               "--map", str(work / "map.safetensors"),
               "--model", shape["model"], "--steps", str(steps), "--batch-size", str(min(32, shape["train_images"])),
               "--log-every", "1", "--ckpt-every", str(steps), "--no-progress", "--out", str(work / "run"),
               "--device", device.type]
    tic = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    if run.returncode != 0:
        return {"ok": False, "stderr_tail": run.stderr[-2000:]}
    metrics = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"ok": True, "steps": steps, "seconds": round(time.perf_counter() - tic, 1),
            "loss_first": metrics[0]["loss"], "loss_last": metrics[-1]["loss"],
            "tokens_per_s_last": round(metrics[-1]["tokens_per_s"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is available")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke test of the same path in seconds")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=5)
    args = parser.parse_args()
    shape = SHAPES["tiny" if args.tiny else "full"]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "shape": shape}
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pipe = build_pipeline(shape, device, dtype, work)
        bench = benchmark(pipe, batch=shape["batch"], repeats=args.repeats, precision="bf16" if dtype == torch.bfloat16
                          else "fp32", compile=True)
        result["sampling"] = {key: bench[key] for key in ("ctf", "baseline", "ctf_over_baseline", "precision")}
        result["training_fsdp"] = train_steps(shape, pipe.tokenizer, work, device, args.train_steps)
    result["seconds"] = round(time.perf_counter() - tic, 1)
    print(json.dumps(result))
    if not result["training_fsdp"]["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
