"""`ctfgen bench`: sampling throughput of CTF against the baseline, measured in one process.

Every figure is the median over repeated runs after a warm-up; the runs of all stages and of both
methods alternate, so that load from other processes hits them alike. Besides images/s, each stage is reported as
achieved FLOP/s (matmul and convolution FLOPs: what the stage computes, not what it reads) and as a fraction of this
machine's matmul peak in the stage's dtype, measured in the same run (`*_fraction_of_peak`): the stage-1 and
baseline decode steps (one token for the whole batch, mid-sequence), the stage-2 pass and the tokenizer's decode.

The peak is that of a large square matmul (1024^3). A decode step multiplies ~2 x batch rows by small weight
matrices, which no kernel runs at that peak; so the decode steps are also reported against the FLOP/s of their own
matmuls alone, at their exact shapes and with their kernels, back to back with the weights in cache
(`decode_step_fraction_of_shape_peak`): what the step would reach if nothing but its matmuls took time.

A roofline, finally: the bytes each decode step and the stage-2 pass must move (the weights once, as stored; a step's
KV cache read over the positions it attends to and written at its own), and `*_fraction_of_roofline`, the time the
work would take at the larger of its FLOPs at the matmul peak and its bytes at the read bandwidth of a working set
that size (measured in the same run), over the time it took: 1 means nothing but the necessary compute or memory
traffic took time.
"""

from __future__ import annotations

import platform
import statistics
import time
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode

from ctfgen.backends.decoding import decode_backend
from ctfgen.backends.precision import resolve_dtype
from ctfgen.pipeline import CTFPipeline
from ctfgen.sampling.decode import image_uniforms
from ctfgen.sampling.params import STAGE1_DEFAULTS, STAGE2_DEFAULTS, SamplingParams
from ctfgen.validation import POSITIVE


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


def matmul_peak_flops(dtype: torch.dtype, n: int = 1024, repeats: int = 9) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats, warmup=2)


def read_bandwidth(nbytes: int, repeats: int = 9) -> float:
    """Bytes/s at which this machine reads a working set of nbytes now: a sum over a buffer that size, warm (from
    whichever cache level holds it)."""
    buffer = torch.ones(max(nbytes // 4, 1024))
    return buffer.numel() * 4 / median_seconds(buffer.sum, repeats, warmup=2)


def roofline_seconds(flops: float, nbytes: float, peak_flops: float, bandwidth: float) -> float:
    """The time of a piece of work at the roofline: its FLOPs at the matmul peak or its bytes at the read bandwidth,
    whichever takes longer."""
    return max(flops / peak_flops, nbytes / bandwidth)


def is_embedding(name: str) -> bool:
    return "embedding" in name or "tok_embeddings" in name


def matmul_weights(model) -> int:
    """The entries of the weight matrices a token meets (all 2-D weights but the embedding tables, which are read,
    not multiplied): the matmul FLOPs per token are twice this."""
    return sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and not is_embedding(name))


def weight_bytes(model, tokens: int) -> int:
    """Bytes of the weights a pass over `tokens` input tokens reads once, as stored: every parameter but the
    embedding tables, and an embedding row per token."""
    embedding_rows = tokens * model.config.dim * model.tok_embeddings.weight.element_size()
    return embedding_rows + sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                                if not is_embedding(name))


def decode_step_bytes(model, rows: int, kv_len: int, cache_dtype: torch.dtype) -> dict[str, int]:
    """Bytes one cached decode step over `rows` rows must move: the weights once (`weight_bytes`); in every layer the
    keys and values of the kv_len cache positions it attends to, read, and of its own position, written."""
    cfg = model.config
    position = 2 * cfg.n_layer * rows * cfg.dim * cache_dtype.itemsize  # a position's keys and values, all layers
    return {"weights": weight_bytes(model, rows), "kv_cache_read": kv_len * position, "kv_cache_written": position}


def decode_step_flops(model, rows: int, kv_len: int) -> float:
    """Matmul FLOPs of one cached decode step over `rows` rows attending to kv_len cache positions: every weight
    matrix (QKV, output projection, SwiGLU's three, the output head), and q k^T and p v over the cache."""
    cfg = model.config
    return rows * (2 * matmul_weights(model) + 2 * 2 * cfg.n_layer * cfg.dim * kv_len)


def refine_flops(refiner, coarse: torch.Tensor, coarse_of_fine: torch.Tensor, rows: int) -> float:
    """Matmul FLOPs of the stage-2 pass over the coarse grids [B, T] (rows = B, or 2B with guidance): the
    bidirectional transformer over 1 + T tokens a row, then each position's logits over its cluster's members only."""
    cfg, tokens = refiner.config, 1 + coarse.shape[1]
    blocks = matmul_weights(refiner) - refiner.output.weight.numel()
    transformer = rows * tokens * (2 * blocks + 2 * 2 * cfg.n_layer * cfg.dim * tokens)
    members = torch.bincount(coarse_of_fine)[coarse.flatten().cpu()].sum().item()
    return transformer + 2 * cfg.dim * members


def counted_flops(fn) -> float:
    """Matmul and convolution FLOPs of fn(), counted by torch's FlopCounterMode (here also the CPU's fused
    attention kernel, which it does not count by itself)."""
    def flash_cpu(q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
        b, h, s_q, d = q_shape
        return 2 * 2 * b * h * s_q * k_shape[2] * d
    counter = FlopCounterMode(display=False,
                              custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: flash_cpu})
    with counter:
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def benchmark(pipe: CTFPipeline, batch: int = 64, cfg_scale: float = STAGE1_DEFAULTS.cfg_scale, repeats: int = 3,
              precision: str = "auto", compile: bool = False) -> dict:
    """images/s for each stage and the whole pipeline, CTF and baseline, at one batch size. The stages are the
    pipeline's own steps, timed on a copy of it (cast to bf16 where `precision` says so; with its decode step
    compiled when `compile` is given or the caller's already is): the caller's models are left as they are."""
    batch, repeats = POSITIVE.check(batch, "batch"), POSITIVE.check(repeats, "repeats")
    precision, dtype = resolve_dtype(precision, pipe.device)
    compiled = compile or pipe.decoding_compiled
    pipe = pipe.copy(dtype)  # the tokenizer is shared and stays fp32: bf16 convolutions are slow on CPUs without AMX
    if compiled:
        pipe.compile_decoding()
    labels = torch.arange(batch, device=pipe.device) % pipe.num_classes
    sampling = SamplingParams(cfg_scale=cfg_scale)
    uniforms = image_uniforms(0, 0, batch, pipe.grid ** 2).to(pipe.device)
    result = {"batch": batch, "cfg_scale": cfg_scale, "precision": precision, "threads": torch.get_num_threads(),
              "repeats": repeats, "compiled_decode_step": compiled, "cpu": cpu_description()}

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
        stage2_rows = 2 * batch if STAGE2_DEFAULTS.guided else batch
        stage2_flops = refine_flops(pipe.stage2, coarse.flatten(1), pipe.coarse_map.coarse_of_fine, stage2_rows)
        stage2_bytes = weight_bytes(pipe.stage2, stage2_rows * (1 + pipe.grid ** 2))
        result["ctf"] = {
            "stage1_images_per_s": images_per_s["ctf_stage1"], "stage2_images_per_s": images_per_s["ctf_stage2"],
            "decode_images_per_s": images_per_s["ctf_decode"], "images_per_s": images_per_s["ctf"],
            "stage1_params": pipe.stage1.num_params(), "stage2_params": pipe.stage2.num_params(),
            "stage2_flops": stage2_flops * images_per_s["ctf_stage2"] / batch,
            "stage2_flop_count": stage2_flops, "stage2_bytes": {"weights": stage2_bytes},
            "tokenizer_decode_flops": counted_flops(lambda: pipe.decode(fine)) * images_per_s["ctf_decode"] / batch,
        }
        result["ctf"] |= decode_step_report(pipe.stage1, batch, cfg_scale, dtype)
    if pipe.baseline is not None:
        result["baseline"] = {"images_per_s": images_per_s["baseline"],
                              "gpt_images_per_s": images_per_s["baseline_gpt"], "params": pipe.baseline.num_params()}
        result["baseline"] |= decode_step_report(pipe.baseline, batch, cfg_scale, dtype)
    if "ctf" in result and "baseline" in result:
        result["ctf_over_baseline"] = result["ctf"]["images_per_s"] / result["baseline"]["images_per_s"]
    # Both peaks, and each stage's fraction against the one it runs in (bf16 is slow on CPUs without it); the
    # tokenizer always runs in fp32.
    result["bf16_matmul_peak_flops"] = matmul_peak_flops(torch.bfloat16)
    result["fp32_matmul_peak_flops"] = matmul_peak_flops(torch.float32)
    peak = result["bf16_matmul_peak_flops" if dtype == torch.bfloat16 else "fp32_matmul_peak_flops"]
    for key in ("ctf", "baseline"):
        if key in result:
            report = result[key]
            report["decode_step_fraction_of_peak"] = report["decode_step_flops"] / peak
            report["decode_step_fraction_of_shape_peak"] = (report["decode_step_flops"]
                                                            / report["decode_step_shape_peak_flops"])
            report |= roofline_report("decode_step", report, report["decode_step_ms"] / 1e3, peak)
    if "ctf" in result:
        result["ctf"]["stage2_fraction_of_peak"] = result["ctf"]["stage2_flops"] / peak
        result["ctf"] |= roofline_report("stage2", result["ctf"], batch / result["ctf"]["stage2_images_per_s"], peak)
        result["ctf"]["tokenizer_decode_fraction_of_peak"] = (result["ctf"]["tokenizer_decode_flops"]
                                                              / result["fp32_matmul_peak_flops"])
    return result


def roofline_report(name: str, report: dict, seconds: float, peak: float) -> dict:
    """The roofline of the work `name` (its `{name}_flop_count` and `{name}_bytes` in report), which took `seconds`:
    the read bandwidth at a working set of its bytes, measured now; its time at the roofline; that over `seconds`."""
    nbytes = sum(report[f"{name}_bytes"].values())
    bandwidth = read_bandwidth(nbytes)
    at_roofline = roofline_seconds(report[f"{name}_flop_count"], nbytes, peak, bandwidth)
    return {f"{name}_read_bandwidth": bandwidth, f"{name}_roofline_ms": at_roofline * 1e3,
            f"{name}_fraction_of_roofline": at_roofline / seconds}


MATMUL_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")  # the CPU features that set its matmul peaks, best first


def cpu_description() -> str:
    """The CPU's model name and its best matmul feature (Linux's /proc/cpuinfo), else what the platform says."""
    try:
        with open("/proc/cpuinfo") as file:
            first_cpu = file.read().split("\n\n")[0]
    except OSError:
        return platform.processor() or platform.machine()
    info = {key.strip(): value.strip() for key, value in (line.split(":", 1) for line in first_cpu.splitlines()
                                                          if ":" in line)}
    best = next((flag for flag in MATMUL_FLAGS if flag in info.get("flags", "").split()), "no AVX2")
    return f"{info.get('model name', platform.machine())} ({best})"


def decode_step_report(model, batch: int, cfg_scale: float, dtype: torch.dtype) -> dict:
    """Time one mid-sequence cached decode step and turn it into achieved FLOP/s; and the FLOP/s of the step's own
    matmuls alone (`step_matmuls_seconds`), the step's ceiling. The step runs in the sampler's decode backend. Also its
    work: FLOPs and the bytes it must move (`decode_step_bytes`), for the roofline."""
    rows = 2 * batch if cfg_scale > 1 else batch
    with mid_sequence_step(model, rows, dtype) as (step, decoder, kv_len):
        seconds = median_seconds(step, repeats=20, warmup=3)
        matmul_seconds = step_matmuls_seconds(decoder, rows, dtype)
    flops = decode_step_flops(model, rows, kv_len)
    matmul_flops = rows * 2 * matmul_weights(model)
    return {"decode_step_ms": seconds * 1e3, "decode_step_flops": flops / seconds, "decode_step_flop_count": flops,
            "decode_step_bytes": decode_step_bytes(model, rows, kv_len, dtype),
            "decode_step_matmuls_ms": matmul_seconds * 1e3,
            "decode_step_shape_peak_flops": matmul_flops / matmul_seconds}


@contextmanager
def mid_sequence_step(model, rows: int, dtype: torch.dtype):
    """(a cached decode step of `rows` rows at the middle of the grid, in the sampler's decode backend, as a function
    of no arguments; the backend's decoder; the cache positions the step attends to), on caches made for it in dtype
    and freed after."""
    device = next(model.parameters()).device
    model.setup_caches(max_batch_size=rows, dtype=dtype)
    try:
        decoder = decode_backend(model)
        decoder.prefill(torch.zeros(rows, dtype=torch.long, device=device))
        position = model.config.block_size // 2
        token = torch.zeros(rows, dtype=torch.long, device=device)
        input_pos = torch.tensor([position], device=device)
        yield (lambda: decoder.decode_step(token, input_pos, kv_len=position + 1)), decoder, position + 1
    finally:
        model.clear_caches()


def top_operators(profiler, n: int, steps: int) -> list[dict]:
    """The n operators of a torch.profiler run over `steps` steps with the most CPU time of their own: ms per step
    and share of all operators' time."""
    events = [e for e in profiler.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3),
             "share": round(e.self_cpu_time_total / total, 3)} for e in events[:n]]


def step_matmuls_seconds(decoder, rows: int, dtype: torch.dtype) -> float:
    """Seconds of the matmuls of one decode step of `rows` rows alone, as the decoder's step runs them (on pre-packed
    weights, or F.linear), one after the other in the step's order, on inputs that stay in cache."""
    matmul, weights = decoder.step_matmuls(rows)
    device = decoder.model.output.weight.device
    inputs = {w.shape[1]: torch.randn(rows, 1, w.shape[1], dtype=dtype, device=device) for w in weights}

    def step():
        for w in weights:
            matmul(inputs[w.shape[1]], w)
    return median_seconds(step, repeats=20, warmup=3)
