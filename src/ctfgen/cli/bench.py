"""`ctfgen bench`: images/s of CTF and the baseline."""

from __future__ import annotations

from ctfgen.choices import PRECISIONS
from ctfgen.cli.common import add_json_flag, add_pipeline_flag, number_flag, print_json
from ctfgen.sampling.params import STAGE1_DEFAULTS
from ctfgen.validation import FINITE, POSITIVE


def register(commands) -> None:
    bench = commands.add_parser("bench", help="images/s of CTF and the baseline, stage by stage")
    add_pipeline_flag(bench)
    number_flag(bench, "--batch", POSITIVE, default=64, help="images per batch (default %(default)s)")
    number_flag(bench, "--cfg-scale", FINITE, default=STAGE1_DEFAULTS.cfg_scale,
                       help="stage-1 guidance (default %(default)s)")
    number_flag(bench, "--repeats", POSITIVE, default=3, help="timed runs after a warm-up run; the median counts "
                       "(default %(default)s)")
    bench.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 autocast on CUDA or "
                       "bf16-capable CPUs, fp32 elsewhere (default %(default)s)")
    number_flag(bench, "--threads", POSITIVE, help="torch threads (default: torch's choice)")
    bench.add_argument("--compile", action="store_true", help="time the torch.compile'd decode step (the warm-up "
                       "run pays the compile time)")
    add_json_flag(bench)
    bench.set_defaults(func=cmd_bench)


def cmd_bench(args) -> None:
    import torch

    from ctfgen.bench import benchmark
    from ctfgen.pipeline import CTFPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = CTFPipeline.from_pretrained(args.pipeline)
    result = benchmark(pipe, batch=args.batch, cfg_scale=args.cfg_scale, repeats=args.repeats,
                       precision=args.precision, compile=args.compile)
    if args.json:
        print_json(result)
    else:
        for key in ("ctf", "baseline"):
            if key in result:
                print(f"{key}: {result[key]['images_per_s']:.1f} images/s")
