"""`ctfgen bench`: sampling throughput of CTF against the baseline, measured in one process.

Every figure is the median over repeated runs after a warm-up; the runs of all stages and of both
methods alternate, so that load from other processes hits them alike. Besides images/s, the decode step
(one stage-1 token for the whole batch) is reported as achieved FLOP/s, and as a fraction of this
machine's bf16 matmul peak measured in the same run.
"""

from __future__ import annotations

import statistics
import time

import torch

from .pipeline import CTFPipeline
from .precision import resolve_precision
from .sampling import image_uniforms
from .sampling_params import STAGE1_DEFAULTS, SamplingParams


def interleaved_seconds(fns: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each of `repeats` calls of each function, after `warmup` untimed calls each, timed in
    alternating order (a b c, c b a, a b c, ...) so that slow spells of a shared machine hit all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for r in range(repeats):
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            tic = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - tic)
    return times


def interleaved_median_seconds(fns: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    return {name: statistics.median(seconds) for name, seconds in interleaved_seconds(fns, repeats, warmup).items()}


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    return interleaved_median_seconds({"fn": fn}, repeats, warmup)["fn"]


def matmul_peak_flops(dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats)


def decode_step_flops(model, rows: int, position: int) -> float:
    """Matmul FLOPs of one cached decode step: weights (without the embedding tables) + attention."""
    cfg = model.config
    weights = sum(p.numel() for name, p in model.named_parameters()
                  if p.dim() == 2 and "embedding" not in name and "tok_embeddings" not in name)
    attention = 2 * 2 * cfg.n_layer * cfg.dim * position
    return rows * (2 * weights + attention)


@torch.no_grad()
def benchmark(pipe: CTFPipeline, batch: int = 64, cfg_scale: float = STAGE1_DEFAULTS.cfg_scale, repeats: int = 3,
              precision: str = "auto", compile: bool = False) -> dict:
    """images/s for each stage and the whole pipeline, CTF and baseline, at one batch size. The stages are the
    pipeline's own steps, timed on a copy of it (cast to bf16 where `precision` says so; with its decode step
    compiled when `compile` is given or the caller's already is): the caller's models are left as they are."""
    precision = resolve_precision(precision, pipe.device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    compiled = compile or pipe.decoding_compiled
    pipe = pipe.copy(dtype)  # the tokenizer is shared and stays fp32: bf16 convolutions are slow on CPUs without AMX
    if compiled:
        pipe.compile_decoding()
    labels = torch.arange(batch, device=pipe.device) % pipe.num_classes
    sampling = SamplingParams(cfg_scale=cfg_scale)
    uniforms = image_uniforms(0, 0, batch, pipe.grid ** 2).to(pipe.device)
    result = {"batch": batch, "cfg_scale": cfg_scale, "precision": precision, "threads": torch.get_num_threads(),
              "repeats": repeats, "compiled_decode_step": compiled}

    def request(mode: str):
        return lambda: pipe(labels, mode=mode, sampling=sampling, batch_size=batch, seed=0, output_type="pt")

    timed = {}  # name -> one batch of work; all timed together, interleaved
    if pipe.stage1 is not None:
        coarse = pipe.stage1_tokens(labels, sampling, uniforms[:, 0])
        fine = pipe.stage2_tokens(coarse, labels, uniforms=uniforms[:, 1])
        timed |= {
            "ctf": request("ctf"),
            "ctf_stage1": lambda: pipe.stage1_tokens(labels, sampling, uniforms[:, 0]),
            "ctf_stage2": lambda: pipe.stage2_tokens(coarse, labels, uniforms=uniforms[:, 1]),
            "ctf_decode": lambda: pipe.decode(fine),
        }
    if pipe.baseline is not None:
        timed |= {"baseline": request("baseline"),
                  "baseline_gpt": lambda: pipe.baseline_tokens(labels, sampling, uniforms[:, 0])}
    images_per_s = {name: batch / seconds for name, seconds in interleaved_median_seconds(timed, repeats).items()}
    if pipe.stage1 is not None:
        result["ctf"] = {
            "stage1_images_per_s": images_per_s["ctf_stage1"], "stage2_images_per_s": images_per_s["ctf_stage2"],
            "decode_images_per_s": images_per_s["ctf_decode"], "images_per_s": images_per_s["ctf"],
            "stage1_params": pipe.stage1.num_params(), "stage2_params": pipe.stage2.num_params(),
        }
        result["ctf"] |= decode_step_report(pipe.stage1, batch, cfg_scale, dtype)
    if pipe.baseline is not None:
        result["baseline"] = {"images_per_s": images_per_s["baseline"],
                              "gpt_images_per_s": images_per_s["baseline_gpt"], "params": pipe.baseline.num_params()}
        result["baseline"] |= decode_step_report(pipe.baseline, batch, cfg_scale, dtype)
    if "ctf" in result and "baseline" in result:
        result["ctf_over_baseline"] = result["ctf"]["images_per_s"] / result["baseline"]["images_per_s"]
    # Both peaks, and the fraction against the one the models run in (bf16 is slow on CPUs without it).
    result["bf16_matmul_peak_flops"] = matmul_peak_flops(torch.bfloat16)
    result["fp32_matmul_peak_flops"] = matmul_peak_flops(torch.float32)
    peak = result["bf16_matmul_peak_flops" if dtype == torch.bfloat16 else "fp32_matmul_peak_flops"]
    for key in ("ctf", "baseline"):
        if key in result:
            result[key]["decode_step_fraction_of_peak"] = result[key]["decode_step_flops"] / peak
    return result


def decode_step_report(model, batch: int, cfg_scale: float, dtype: torch.dtype) -> dict:
    """Time one mid-sequence cached decode step and turn it into achieved FLOP/s."""
    rows = 2 * batch if cfg_scale > 1 else batch
    device = next(model.parameters()).device
    model.setup_caches(max_batch_size=rows, dtype=dtype)
    model.prefill(torch.zeros(rows, dtype=torch.long, device=device))
    position = model.config.block_size // 2
    token = torch.zeros(rows, dtype=torch.long, device=device)
    input_pos = torch.tensor([position], device=device)
    seconds = median_seconds(lambda: model.decode_step(token, input_pos, kv_len=position + 1), repeats=20, warmup=3)
    model.clear_caches()
    return {"decode_step_ms": seconds * 1e3, "decode_step_flops": decode_step_flops(model, rows, position) / seconds}
