"""Speed paths, beside the pure models and chosen here, by device, dtype and the environment:

- `decoding`: which backend runs a GPT's cached decoding (`decode_backend`), and whether its step is compiled;
  CTFGEN_DECODE_BACKEND=eager switches the CPU backend off.
- `cpu_decode`: the CPU backend (matmuls on oneDNN-packed weights, attention of few queries as two matmuls).
- `eager`: the model's own step, and the compile policy (CUDA graphs on GPUs).
- `precision`: bf16 autocast where the hardware runs it fast.
- `training`: the attention kernel training runs with.
"""
