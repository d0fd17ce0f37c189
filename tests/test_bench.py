"""The work `ctfgen bench` counts for its roofline, against hand counts for GPT-tiny, and the roofline's definition.
Nothing here is timed."""

import pytest
import torch

from ctfgen import bench
from ctfgen.models.config import gpt_config
from ctfgen.models.gpt import GPT
from ctfgen.models.refiner import Refiner, refiner_config

# GPT-tiny: dim 64, 2 layers, SwiGLU hidden 256 (int(2 * 4 * 64 / 3) = 170, rounded up to a multiple of 256).
# Per layer: wqkv 192 x 64 + wo 64 x 64 + w1, w3 256 x 64 + w2 64 x 256 = 65,536 matrix entries, 2 x 64 norm weights.
BLOCK_MATRICES = 2 * (192 * 64 + 64 * 64 + 3 * 256 * 64)  # 131,072
NORMS = 2 * 2 * 64 + 64  # the blocks' two norms each, and the final norm
HEAD = 37 * 64  # the output layer, V = 37


def test_decode_step_flops_and_bytes_by_hand():
    model = GPT(gpt_config("GPT-tiny", 37, 16, 5))
    rows, kv_len = 4, 9
    matrices = BLOCK_MATRICES + HEAD
    # 2 FLOPs per matrix entry per row; q k^T and p v: 2 x 2 x dim per cached position, per layer and row.
    assert bench.decode_step_flops(model, rows, kv_len) == rows * (2 * matrices + 2 * 2 * 2 * 64 * kv_len)
    fp32 = bench.decode_step_bytes(model, rows, kv_len, torch.bfloat16)
    position = 2 * 2 * rows * 64 * 2  # keys and values, 2 layers, 4 rows, dim 64, bf16 cache
    assert fp32 == {"weights": (matrices + NORMS + rows * 64) * 4,  # one embedding row per row's token
                    "kv_cache_read": kv_len * position, "kv_cache_written": position}
    bf16 = bench.decode_step_bytes(model.to(torch.bfloat16), rows, kv_len, torch.float32)
    assert bf16["weights"] == (matrices + NORMS + rows * 64) * 2  # the weights as stored
    assert bf16["kv_cache_read"] == 2 * kv_len * position  # an fp32 cache: twice the bytes


def test_stage2_bytes_by_hand():
    refiner = Refiner(refiner_config("GPT-tiny", coarse_vocab_size=7, vocab_size=37, block_size=16, num_classes=5))
    rows = 6
    tokens = rows * (1 + 16)  # the class token and the grid, every row
    assert bench.weight_bytes(refiner, tokens) == (BLOCK_MATRICES + HEAD + NORMS + tokens * 64) * 4


@pytest.mark.parametrize("flops, nbytes, bound_seconds", [(2e9, 1e8, 0.2), (1e8, 2e9, 0.2)])
def test_the_roofline_is_the_slower_of_compute_and_memory(flops, nbytes, bound_seconds, monkeypatch):
    """At a peak of 1e10 FLOP/s and 1e10 B/s, 2e9 FLOPs (or 2e9 bytes) take 0.2 s whatever the other; a step that took
    0.8 s ran at a quarter of its roofline. The bandwidth is that of a working set of the work's own bytes."""
    asked = []

    def bandwidth(n):
        asked.append(n)
        return 1e10

    monkeypatch.setattr(bench, "read_bandwidth", bandwidth)
    assert bench.roofline_seconds(flops, nbytes, 1e10, 1e10) == pytest.approx(bound_seconds)
    report = {"step_flop_count": flops, "step_bytes": {"weights": nbytes / 4, "kv_cache_read": 3 * nbytes / 4}}
    roofline = bench.roofline_report("step", report, 0.8, 1e10)
    assert asked == [nbytes]
    assert roofline == {"step_read_bandwidth": 1e10, "step_roofline_ms": pytest.approx(bound_seconds * 1e3),
                        "step_fraction_of_roofline": pytest.approx(bound_seconds / 0.8)}
