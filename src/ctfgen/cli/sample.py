"""Drawing images from a pipeline: `ctfgen sample`, `ctfgen demo` and `ctfgen reroll`.

Their outputs are checked before any sampling: a path that exists is refused unless it holds ctfgen's own earlier
output of that kind (a tagged PNG or .npz, a directory of tagged PNGs) and --overwrite is given."""

from __future__ import annotations

import time
from dataclasses import fields, replace
from itertools import combinations
from pathlib import Path

from ctfgen.cli.common import add_overwrite_flag, add_pipeline_flag, number_flag
from ctfgen.data.images import is_ctfgen_npz, is_ctfgen_png, is_ctfgen_png_dir
from ctfgen.errors import CtfgenError
from ctfgen.sampling.params import DEFAULT_BATCH_SIZE, STAGE1_DEFAULTS, STAGE2_DEFAULTS, SamplingParams
from ctfgen.validation import FINITE, WHOLE, check_output

# What each kind of output may replace: (what it is called, how ctfgen's own is recognised, whether a directory).
PNG = ("a PNG written by ctfgen", is_ctfgen_png, False)
NPZ = ("a sample file written by ctfgen", is_ctfgen_npz, False)
PNG_DIR = ("a folder of PNGs written by ctfgen (and nothing else)", is_ctfgen_png_dir, True)
OVERWRITE_HELP = "ctfgen's own PNGs or .npz (an earlier run's)"


def register(commands) -> None:
    sample = commands.add_parser("sample", help="generate images from a pipeline (PNGs, a grid, an ADM-style .npz); "
                                                "torchrun shares the batches out, with the same output")
    add_pipeline_flag(sample)
    sample.add_argument("--classes", help="comma-separated class ids or names, e.g. 0,3,7 or Sneaker,Bag "
                        "(default: every class)")
    number_flag(sample, "--per-class", WHOLE, help="N images of each class (default 1)")
    sample.add_argument("--out", help="directory for one PNG per image")
    sample.add_argument("--grid", help="one PNG grid of all images")
    sample.add_argument("--preview-grid", help="a PNG grid of (stage-1 preview | final image) pairs (CTF only)")
    sample.add_argument("--npz", help="ADM evaluator layout: arr_0 uint8 [N,H,W,3] and labels")
    _add_request_flags(sample)
    sample.add_argument("--compile", action="store_true",
                        help="torch.compile the stage-1/baseline decode step (~20 s once; pays off over many batches)")
    sample.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="the transformers' dtype: bf16 is ~1.5x faster on GPUs and CPUs with fast bf16, and "
                        "draws other images than fp32 for a seed (same distribution) (default %(default)s)")
    sample.add_argument("--device", default="cpu", help="cpu (default: the device of `ctfgen demo`, whose images "
                        "a seed gives), cuda, cuda:N or auto; under torchrun with cuda each process takes its own GPU")
    add_overwrite_flag(sample, OVERWRITE_HELP)
    sample.set_defaults(func=cmd_sample)

    demo = commands.add_parser("demo", help="generate a grid of every class with the bundled pipeline (writes a "
                                            "PNG); the same images as `ctfgen sample --per-class N` with the same "
                                            "settings")
    demo.add_argument("--out", default="demo.png", help="the PNG to write (default %(default)s)")
    add_pipeline_flag(demo)
    number_flag(demo, "--per-class", WHOLE, default=10, help="images of each class: a row per class "
                      "(default %(default)s)")
    _add_request_flags(demo)
    add_overwrite_flag(demo, "a PNG written by ctfgen (an earlier demo)")
    demo.set_defaults(func=cmd_demo)

    reroll = commands.add_parser("reroll", help="re-roll the details of images: keep their coarse labels "
                                                "(tokenized by the pipeline's tokenizer), sample stage 2 again")
    reroll.add_argument("images", nargs="+", help="PNG/JPEG images of the tokenizer's size (32x32; 28x28 is padded)")
    reroll.add_argument("--class", dest="classes", required=True,
                        help="the class of the images (id or name), or one per image, comma-separated")
    add_pipeline_flag(reroll)
    number_flag(reroll, "--n", WHOLE, default=4, help="variations of each image (default %(default)s)")
    number_flag(reroll, "--seed", WHOLE, default=0, help="variation j draws from a generator seeded from (seed, j)")
    number_flag(reroll, "--batch", WHOLE, default=DEFAULT_BATCH_SIZE, help="images per batch (default %(default)s)")
    _add_sampling_flags(reroll, "stage2-", STAGE2_DEFAULTS, "stage 2")
    reroll.add_argument("--grid", help="a PNG grid: a row per image (the image | its coarse labels | variations)")
    reroll.add_argument("--npz", help="the variations: arr_0 uint8 [N,H,W,3], labels, tokens and coarse [N,h,w]")
    reroll.add_argument("--out", help="directory for one PNG per variation")
    add_overwrite_flag(reroll, OVERWRITE_HELP)
    reroll.set_defaults(func=cmd_reroll)


def _add_request_flags(parser) -> None:
    """The flags of `_request`: which model, seed, batch, and each stage's SamplingParams fields."""
    parser.add_argument("--baseline", action="store_true", help="sample the plain autoregressive baseline instead "
                        "of CTF")
    number_flag(parser, "--seed", WHOLE, default=0, help="0 .. 4294967295 (2^32 - 1); image i of the request draws "
                "from a generator seeded from (seed, i): the batch size does not change the images")
    number_flag(parser, "--batch", WHOLE, default=DEFAULT_BATCH_SIZE, help="images per batch (default "
                        "%(default)s)")
    _add_sampling_flags(parser, "", STAGE1_DEFAULTS, "stage 1 (or the baseline)")
    _add_sampling_flags(parser, "stage2-", STAGE2_DEFAULTS, "stage 2")
    parser.add_argument("--unrestricted", action="store_true", help="ablation: stage 2 may leave the cluster")


def _add_sampling_flags(parser, prefix: str, defaults: SamplingParams, stage: str) -> None:
    """One stage's SamplingParams fields as flags (--temperature ..., or --stage2-temperature ...), read as numbers:
    their fields' rules check them when the stage's SamplingParams is made, in a line that names the stage."""
    kind = "stage2" if prefix else "autoregressive"
    for field in fields(SamplingParams):
        if field.metadata.get("only", kind) != kind:
            continue  # a setting of the other kind of stage (cfg_interval: autoregressive; steps: stage 2)
        default = getattr(defaults, field.name)
        number_flag(parser, f"--{prefix}{field.name.replace('_', '-')}", WHOLE if isinstance(default, int) else FINITE,
                    default=default, help=f"{stage}: {field.metadata['help']} (default %(default)s)")


def _sampling_params(args, prefix: str, what: str) -> SamplingParams:
    """One stage's SamplingParams from its flags (--temperature ... or --stage2-temperature ...)."""
    values = {f.name: getattr(args, prefix + f.name) for f in fields(SamplingParams) if hasattr(args, prefix + f.name)}
    try:
        return SamplingParams(**values)
    except CtfgenError as e:
        raise CtfgenError(f"{what}: {e}") from None


def _request(args, classes, per_class: int):
    """The request of `ctfgen sample` and `ctfgen demo` (one function: same flags, same images)."""
    from ctfgen.sampling.request import SamplingRequest

    return SamplingRequest(classes, per_class, mode="baseline" if args.baseline else "ctf",
                           sampling=_sampling_params(args, "", "stage-1 settings"),
                           stage2_sampling=_sampling_params(args, "stage2_", "stage-2 settings (--stage2-*)"),
                           restrict=not args.unrestricted, seed=args.seed)


def _check_outputs(args, outputs: dict[str, tuple]) -> None:
    """Refuse the given outputs ({flag: PNG, NPZ or PNG_DIR}) that would replace what is not ctfgen's own, or its
    own without --overwrite, and two outputs on one path; read-only, so every process of torchrun checks."""
    paths = {}
    for flag, (what, is_ours, directory) in outputs.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            check_output(value, flag=flag, what=what, is_ours=is_ours, overwrite=args.overwrite, directory=directory)
            paths[flag] = Path(value).resolve()
    for (flag, path), (other, other_path) in combinations(paths.items(), 2):
        if path == other_path:
            raise CtfgenError(f"{flag} and {other} name the same path {path}; give each output its own path")
        for inner, outer, outer_path in ((flag, other, other_path), (other, flag, path)):
            if outer_path in paths[inner].parents:  # the directory is written whole: it would drop the file
                raise CtfgenError(f"{inner} {paths[inner]} is inside the {outer} directory; give each output its own "
                                  f"path")


def cmd_sample(args) -> None:
    from ctfgen.checkpoint import DTYPES
    from ctfgen.pipeline import CTFPipeline
    from ctfgen.sampling.sample_ddp import sample_sharded
    from ctfgen.training.distributed import launched

    if args.classes is None and args.per_class is None:
        raise CtfgenError("say what to sample: --classes (e.g. Sneaker,Bag), --per-class N (N of every class), "
                          "or both")
    if args.preview_grid and args.baseline:
        raise CtfgenError("--preview-grid shows CTF's stage-1 preview; drop --baseline")
    per_class = 1 if args.per_class is None else args.per_class
    request = _request(args, () if args.classes is None else args.classes.split(","), per_class)  # before loading
    _check_outputs(args, {"--npz": NPZ, "--grid": PNG, "--preview-grid": PNG, "--out": PNG_DIR})
    with launched(args.device) as runtime:  # under torchrun each process samples whole batches; rank 0 writes
        pipe = CTFPipeline.from_pretrained(args.pipeline, device=runtime.device)
        if args.dtype != "fp32":
            pipe = pipe.copy(DTYPES[args.dtype])
        if args.compile:
            pipe.compile_decoding()
        if args.classes is None:  # every class
            request = replace(request, classes=range(pipe.num_classes))
        out = sample_sharded(pipe, request, runtime, batch_size=args.batch, preview=bool(args.preview_grid),
                             progress=True)
    if runtime.is_main:
        _write_samples(args, out, pipe.class_names, ncol=per_class if per_class > 1 else min(len(out.labels), 16))


def _write_samples(args, out, class_names: list[str], ncol: int) -> None:
    """The outputs `ctfgen sample` was asked for, from the whole request's output ("pt")."""
    import numpy as np
    import torch

    from ctfgen.data.images import make_grid, save_npz, save_png, save_png_dir

    pixels, labels = out.images, out.labels.tolist()
    if args.npz:
        arr = pixels.permute(0, 2, 3, 1).numpy()
        save_npz(args.npz, arr_0=arr, labels=np.asarray(labels, dtype=np.int64), class_names=np.asarray(class_names))
        print(f"wrote {args.npz}: arr_0 {arr.shape} uint8, labels, class_names")
    if args.grid:
        print(f"wrote {save_png(make_grid(pixels, ncol=ncol), args.grid)}")
    if args.preview_grid:
        pairs = torch.stack([out.previews, pixels], dim=1).flatten(0, 1)
        print(f"wrote {save_png(make_grid(pairs, ncol=2 * ncol), args.preview_grid)}: (stage-1 preview | final) pairs")
    if args.out:
        save_png_dir(((f"{i:06d}_class{label}.png", make_grid(image[None], ncol=1, pad=0))
                      for i, (image, label) in enumerate(zip(pixels, labels))), args.out)
        print(f"wrote {len(labels)} PNGs to {args.out}")


def cmd_demo(args) -> None:
    from ctfgen.data.images import add_row_labels, make_grid, save_png
    from ctfgen.pipeline import CTFPipeline

    _check_outputs(args, {"--out": PNG})
    tic = time.perf_counter()
    pipe = CTFPipeline.from_pretrained(args.pipeline)
    request = _request(args, range(pipe.num_classes), args.per_class)
    pixels = pipe.sample(request, batch_size=args.batch, output_type="pt").images
    grid = add_row_labels(make_grid(pixels, ncol=args.per_class), pipe.class_names, row_height=pixels.shape[-2])
    path = save_png(grid, args.out)
    print(f"wrote {path}: {args.per_class} {'CTF' if request.mode == 'ctf' else 'baseline'} samples for each of "
          f"the {pipe.num_classes} classes (a row per class, CFG {request.sampling.cfg_scale}) in "
          f"{time.perf_counter() - tic:.1f}s")


def cmd_reroll(args) -> None:
    import numpy as np
    import torch

    from ctfgen.data.images import make_grid, save_npz, save_png, save_png_dir
    from ctfgen.pipeline import CTFPipeline
    from ctfgen.sampling.reroll import coarse_of_images, read_image, reroll_grid

    _check_outputs(args, {"--npz": NPZ, "--grid": PNG, "--out": PNG_DIR})
    stage2_sampling = _sampling_params(args, "stage2_", "stage-2 settings (--stage2-*)")  # before any work
    pipe = CTFPipeline.from_pretrained(args.pipeline)
    classes = args.classes.split(",")
    if len(classes) not in (1, len(args.images)):
        raise CtfgenError(f"{len(classes)} classes for {len(args.images)} images; give one class for all, or one "
                          f"per image")
    pixels = torch.stack([read_image(path, pipe.image_size) for path in args.images])
    coarse = coarse_of_images(pipe, pixels)
    out = pipe.variations(coarse, classes * (len(args.images) // len(classes)), n=args.n,
                          stage2_sampling=stage2_sampling, seed=args.seed, batch_size=args.batch, output_type="pt")
    if args.grid:
        grid = reroll_grid(pixels, pipe.decode_preview(coarse), out.images)
        print(f"wrote {save_png(grid, args.grid)}: a row per image (the image | its coarse labels | variations)")
    if args.npz:
        arrays = dict(arr_0=out.images.permute(0, 2, 3, 1).numpy(), labels=out.labels.numpy(),
                      class_names=np.asarray(pipe.class_names), tokens=out.tokens.numpy(), coarse=out.coarse.numpy())
        save_npz(args.npz, **arrays)
        print(f"wrote {args.npz}: arr_0 {arrays['arr_0'].shape} uint8, labels, class_names, tokens, coarse")
    if args.out:
        save_png_dir(((f"{j // args.n:04d}_variation{j % args.n}.png", make_grid(image[None], ncol=1, pad=0))
                      for j, image in enumerate(out.images)), args.out)
        print(f"wrote {len(out.images)} PNGs to {args.out}")
