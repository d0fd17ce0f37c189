"""Where the non-matmul part of a CPU decode step goes: attention over the KV cache, read hot or from memory.

    python benchmarks/decode_attention.py --pipeline pretrained/fmnist --batch 64 \
        --out docs/results/decode_attention.json

A cached decode step of the CPU backend spends about half its time outside the matmuls, and most of that in the
attention of each block over the cache (`cpu_decode.attention_few_queries`, compiled, as the compiled step runs it).
This times that attention alone, for the stage 1 and the baseline of a pipeline, at the middle of the grid with
2 x batch rows (CFG), in the precision --precision resolves to (auto: bf16 on CPUs with native bf16):

- hot: the same layer's cache every call, so it stays in the CPU's caches (what a micro-benchmark shows);
- from memory: calls cycle through enough caches of that shape to exceed --cold-bytes (default 256 MB), so each one
  reads its keys and values from memory, as in a real step, where the other layers' caches and the weights have
  pushed it out (the whole model's cache at batch 64 is larger than this CPU's last-level cache).

For each: microseconds per call, the keys and values it reads, and the bytes/s that makes, beside `read_bandwidth`
(`ctfgen.bench`: a plain sum over a buffer of the same size, as the roofline uses); and the layers' count, so that
per-step milliseconds follow. The two settings alternate call batch by call batch (`interleaved_median_seconds`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import torch

from ctfgen.backends.cpu_decode import attention_few_queries
from ctfgen.backends.precision import PRECISIONS, resolve_dtype
from ctfgen.bench import cpu_description, interleaved_median_seconds, read_bandwidth
from ctfgen.files import write_atomic
from ctfgen.pipeline import CTFPipeline


def attention_figures(model, rows: int, dtype: torch.dtype, cold_bytes: int, repeats: int) -> dict:
    """Hot and from-memory timings of one block's attention of a mid-grid decode step of `model`."""
    config = model.config
    model.setup_caches(max_batch_size=rows, dtype=dtype)  # for the shape of a layer's cache, as decoding has it
    shape = model.layers[0].attention.kv_cache.k_cache.shape
    model.clear_caches()
    kv_len = config.block_size // 2 + 1  # `ctfgen.bench.mid_sequence_step`'s step
    cache_bytes = 2 * torch.Size(shape).numel() * dtype.itemsize
    caches = [(torch.randn(shape).to(dtype), torch.randn(shape).to(dtype))
              for _ in range(max(2, -(-cold_bytes // cache_bytes)))]
    q = torch.randn(rows, config.n_head, 1, config.head_dim).to(dtype)

    @torch.compile(fullgraph=True)
    def call(keys, values):  # as `cpu_decode.block_step` attends: the filled part of the cache, sliced in the graph,
        return attention_few_queries(q, keys[:, :, :kv_len], values[:, :, :kv_len], None)  # no mask for one query

    in_turn = itertools.cycle(caches[1:] + caches[:1])

    def from_memory():  # the next cache in the cycle: read from memory
        call(*next(in_turn))

    calls = 20  # per timed sample, so that a sample is ~ms
    seconds = interleaved_median_seconds({"hot": lambda: [call(*caches[0]) for _ in range(calls)],
                                          "from_memory": lambda: [from_memory() for _ in range(calls)]},
                                         repeats, warmup=2)
    read = 2 * rows * config.n_head * kv_len * config.head_dim * dtype.itemsize  # keys and values attended to
    figures = {"rows": rows, "n_layer": config.n_layer, "n_head": config.n_head, "head_dim": config.head_dim,
               "kv_len": kv_len, "cache_shape": list(shape), "caches_cycled": len(caches), "bytes_read": read,
               "read_bandwidth": read_bandwidth(read)}
    for name, total in seconds.items():
        us = total / calls * 1e6
        figures[name] = {"us_per_layer": us, "ms_per_step": us * config.n_layer / 1e3, "bytes_per_s": read / us * 1e6}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="pretrained/fmnist")
    parser.add_argument("--batch", type=int, default=64, help="images; the step has 2 x batch rows (CFG)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--cold-bytes", type=int, default=256 << 20)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, help="a JSON file to write the figures to")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = CTFPipeline.from_pretrained(args.pipeline)
    precision, dtype = resolve_dtype(args.precision, pipe.device)
    result = {"batch": args.batch, "precision": precision, "threads": torch.get_num_threads(),
              "cpu": cpu_description(), "load_average": os.getloadavg()[0]}
    with torch.no_grad():
        for name in ("stage1", "baseline"):
            result[name] = attention_figures(getattr(pipe, name), 2 * args.batch, dtype, args.cold_bytes,
                                             args.repeats)
    text = json.dumps(result, indent=1) + "\n"
    print(text, end="")
    if args.out:
        write_atomic(args.out, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
