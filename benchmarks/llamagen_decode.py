"""Decoding throughput of ctfgen's sampler against LlamaGen's own generate(), same weights, in one run.

    python benchmarks/llamagen_decode.py --llamagen /path/to/LlamaGen --batch 64 --repeats 3

Prints JSON: images/s of `ctfgen.sampling.decode.generate` (with `ctfgen.models.gpt.GPT`) and of LlamaGen's
`autoregressive.models.generate.generate` (with its `autoregressive.models.gpt.Transformer`), each the
median over --repeats timed runs after one warm-up; the runs of all variants alternate, so that load from
other processes hits them alike. The ratio ours/llamagen > 1 means ours is faster.

LlamaGen's code is not vendored: --llamagen PATH (or env LLAMAGEN_DIR) must point to a checkout of
FoundationVision/LlamaGen; it is put first on sys.path and `autoregressive.models.gpt`,
`autoregressive.models.generate` (and through them `utils.drop_path`) are imported from there.
LlamaGen has no `__init__.py` files, so `autoregressive` and `utils` are namespace packages; a
regular package named `utils` installed elsewhere would shadow theirs (the script checks and stops).

Weights: LlamaGen's Transformer is built with a fixed seed (--seed) and its state dict is loaded into
our GPT with strict=True. LlamaGen zero-initialises the output layer, which makes every logit equal
(and greedy decoding a tie everywhere), so its output weight is re-drawn from N(0, initializer_range)
with the same seed before the copy; this changes weights, not code. With --weights DIR a trained
ctfgen GPT checkpoint (`GPT.from_pretrained`) is used instead and its state dict is loaded into
LlamaGen's Transformer with strict=True.

Sanity check before timing, in fp32 whatever --precision: with top_k=1 (greedy-equivalent; same
temperature, CFG scale and labels) both must produce the same tokens; the script stops otherwise and
reports "tokens_match": true. It is not made in bf16, where the two legitimately disagree: the
attention kernels differ (below) and bf16 rounding turns that into different argmaxes; with
--precision bf16 the share of equal greedy tokens is reported as "bf16_greedy_token_agreement".

Settings are the same for both: batch, labels (arange(batch) % num_classes), cfg_scale (cfg_interval
-1), temperature, top_k, top_p, sample_logits=True for LlamaGen; both run under torch.inference_mode().

Precision: fp32, or bf16 by casting both models' weights to bfloat16 (what LlamaGen's
sample_c2i.py does with --precision bf16, and what `ctfgen bench` does). bf16 autocast over fp32
weights is not offered: LlamaGen's generate() sizes its KV cache in the weights' dtype
(`dtype=model.tok_embeddings.weight.dtype`), and under autocast its `KVCache.update` fails ("Index
put requires the source and destination dtypes match"). Both models keep their RoPE table in fp32.

Patches to LlamaGen: none; its code runs unchanged on CPU with torch 2.x. generate.py imports
`torch._dynamo.config` and `torch._inductor.config` (only imported; the settings are commented out
upstream), which work on CPU builds. `decode_n_tokens` enters
`torch.backends.cuda.sdp_kernel(enable_flash=False, enable_mem_efficient=False, enable_math=True)`
every step; despite the name its flags are global and CPU dispatch honours them, so LlamaGen's
decode steps run the MATH attention backend (its prefill runs the default: the CPU flash kernel). That is
LlamaGen's code as written and is kept and timed. Ours, on the CPU, decodes in its CPU backend
(`ctfgen.backends.cpu_decode`, unless CTFGEN_DECODE_BACKEND=eager): attention as two batched matmuls over
the filled part of its cache, and matmuls on oneDNN-packed copies of the weights; the greedy check compares
tokens across these different kernels. Recent torch versions emit a FutureWarning (deprecated API) from it;
that warning alone is filtered.

Compilation: none by default. --compile compiles our one-token decode step
(`ctfgen.backends.decoding.compile_decoding`); --compile-llamagen compiles LlamaGen's whole model the way its
`autoregressive/sample/sample_c2i.py --compile` does (`torch.compile(model, mode="reduce-overhead",
fullgraph=True)`). Compilation happens after the greedy check (which runs eager) and its cost falls in
the untimed warm-up run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import json
import os
import statistics
import sys
import warnings
from pathlib import Path

import torch

from ctfgen.backends.decoding import compile_decoding
from ctfgen.backends.precision import cpu_has_fast_bf16
from ctfgen.bench import interleaved_seconds
from ctfgen.models.config import GPTConfig, gpt_config
from ctfgen.models.gpt import GPT
from ctfgen.sampling.decode import generate
from ctfgen.sampling.params import SamplingParams

LLAMAGEN_FILES = ("autoregressive/models/gpt.py", "autoregressive/models/generate.py", "utils/drop_path.py")


def import_llamagen(path: str | None):
    """(gpt module, generate module) from a LlamaGen checkout, or exit 2 with one line on stderr."""
    if not path:
        sys.exit(_fail("no LlamaGen checkout given: pass --llamagen PATH or set LLAMAGEN_DIR "
                       "(a checkout of github.com/FoundationVision/LlamaGen)"))
    root = Path(path).resolve()
    missing = [f for f in LLAMAGEN_FILES if not (root / f).is_file()]
    if missing:
        sys.exit(_fail(f"{root} is not a LlamaGen checkout (missing {', '.join(missing)})"))
    sys.path.insert(0, str(root))
    warnings.filterwarnings("ignore", message=r".*torch\.backends\.cuda\.sdp_kernel\(\)` is deprecated",
                            category=FutureWarning)
    gpt_module = importlib.import_module("autoregressive.models.gpt")
    generate_module = importlib.import_module("autoregressive.models.generate")
    for module in (gpt_module, generate_module, sys.modules["utils.drop_path"]):
        if not Path(module.__file__).resolve().is_relative_to(root):
            sys.exit(_fail(f"{module.__name__} was imported from {module.__file__}, not from {root}; "
                           f"another package shadows LlamaGen's"))
    return gpt_module, generate_module


def _fail(message: str) -> int:
    print(f"llamagen_decode: error: {message}", file=sys.stderr)
    return 2


def llamagen_args(gpt_module, config: GPTConfig):
    """LlamaGen's ModelArgs for our config (c2i, one class token). LlamaGen only adds the null-class
    row when class_dropout_prob > 0; ours always has it."""
    return gpt_module.ModelArgs(
        dim=config.dim, n_layer=config.n_layer, n_head=config.n_head, multiple_of=config.multiple_of,
        ffn_dim_multiplier=config.ffn_dim_multiplier, rope_base=config.rope_base, norm_eps=config.norm_eps,
        initializer_range=config.initializer_range, token_dropout_p=config.token_dropout_p,
        attn_dropout_p=config.attn_dropout_p, resid_dropout_p=config.resid_dropout_p,
        ffn_dropout_p=config.ffn_dropout_p, drop_path_rate=config.drop_path_rate,
        num_classes=config.num_classes, class_dropout_prob=config.class_dropout_prob or 0.1, model_type="c2i",
        vocab_size=config.vocab_size, cls_token_num=1, block_size=config.block_size)


def build_models(gpt_module, args) -> tuple[GPT, torch.nn.Module]:
    """(ours, LlamaGen's) with identical fp32 weights, in eval mode."""
    if args.weights:
        ours = GPT.from_pretrained(args.weights).eval()
        theirs = gpt_module.Transformer(llamagen_args(gpt_module, ours.config))
        theirs.load_state_dict(ours.state_dict(), strict=True)
    else:
        config = gpt_config(args.model, vocab_size=args.vocab, block_size=args.block_size,
                            num_classes=args.num_classes)
        torch.manual_seed(args.seed)
        theirs = gpt_module.Transformer(llamagen_args(gpt_module, config))
        with torch.no_grad():  # their output layer starts at zero: all logits tie (see the docstring)
            generator = torch.Generator().manual_seed(args.seed)
            theirs.output.weight.normal_(0.0, config.initializer_range, generator=generator)
        ours = GPT(config)
        ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.eval(), theirs.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llamagen", default=os.environ.get("LLAMAGEN_DIR"),
                        help="a FoundationVision/LlamaGen checkout (default: env LLAMAGEN_DIR)")
    parser.add_argument("--weights", help="a trained ctfgen GPT checkpoint directory instead of seeded random weights")
    parser.add_argument("--model", default="GPT-S")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16 casts both models' weights (see the docstring)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our decode step")
    parser.add_argument("--compile-llamagen", action="store_true",
                        help="torch.compile LlamaGen's model as its sample_c2i.py --compile does")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    args = parser.parse_args()
    gpt_module, generate_module = import_llamagen(args.llamagen)
    if args.threads:
        torch.set_num_threads(args.threads)

    ours, theirs = build_models(gpt_module, args)
    config = ours.config
    labels = torch.arange(args.batch) % config.num_classes
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    params = SamplingParams(cfg_scale=args.cfg_scale, **sampling)

    def run_ours(model=ours, **kwargs):
        with torch.inference_mode():
            return generate(model, labels, dataclasses.replace(params, **kwargs))

    def run_theirs(model=theirs, **kwargs):
        with torch.inference_mode():
            return generate_module.generate(model, labels, config.block_size, cfg_scale=args.cfg_scale,
                                            cfg_interval=-1, sample_logits=True, **(sampling | kwargs))

    ours_greedy, theirs_greedy = run_ours(top_k=1), run_theirs(top_k=1)  # fp32 (see the docstring)
    if ours_greedy.shape != theirs_greedy.shape or not torch.equal(ours_greedy, theirs_greedy.long()):
        differ = (ours_greedy != theirs_greedy.long()).any(1).sum().item()
        sys.exit(_fail(f"greedy (top_k=1) tokens differ between ctfgen and LlamaGen in {differ} of "
                       f"{args.batch} images; the comparison would not be like for like"))
    extra = {}
    if args.precision == "bf16":
        ours.to(torch.bfloat16)
        theirs.to(torch.bfloat16)
        agreement = (run_ours(top_k=1) == run_theirs(top_k=1).long()).float().mean().item()
        extra["bf16_greedy_token_agreement"] = round(agreement, 4)

    # Eager runs always; the compiled variants beside them, on the same weights.
    runs = {"ours": run_ours, "llamagen": run_theirs}
    if args.compile:
        ours_compiled = copy.deepcopy(ours)
        compile_decoding(ours_compiled)
        runs["ours_compiled"] = lambda: run_ours(ours_compiled)
    if args.compile_llamagen:
        theirs_compiled = torch.compile(theirs, mode="reduce-overhead", fullgraph=True)
        runs["llamagen_compiled"] = lambda: run_theirs(theirs_compiled)

    torch.manual_seed(args.seed)
    times = interleaved_seconds(runs, args.repeats)  # the warm-up run also compiles

    result = {"model": "from --weights" if args.weights else args.model,
              "weights": args.weights or f"random, seed {args.seed}",
              "config": {k: getattr(config, k) for k in ("dim", "n_layer", "n_head", "vocab_size", "block_size",
                                                         "num_classes")},
              "batch": args.batch, "cfg_scale": args.cfg_scale, **sampling, "precision": args.precision,
              "compiled": {"ours": args.compile, "llamagen": args.compile_llamagen},
              "repeats": args.repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_has_fast_bf16": cpu_has_fast_bf16(),
              "llamagen": str(Path(args.llamagen).resolve()), "tokens_match": True, **extra}
    for name, seconds in times.items():
        result[f"{name}_seconds"] = [round(s, 4) for s in seconds]
        result[f"{name}_images_per_s"] = round(args.batch / statistics.median(seconds), 2)
    for ours_name in (name for name in runs if name.startswith("ours")):
        for their_name in (name for name in runs if name.startswith("llamagen")):
            ratio = result[f"{ours_name}_images_per_s"] / result[f"{their_name}_images_per_s"]
            result[f"{ours_name}_over_{their_name}"] = round(ratio, 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
