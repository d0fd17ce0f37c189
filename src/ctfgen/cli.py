"""The `ctfgen` command. Each subcommand parses its flags and calls one library function."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import fields
from pathlib import Path

from .assets import pretrained_dir
from .errors import CtfgenError
from .sampling_params import DEFAULT_BATCH_SIZE, STAGE1_DEFAULTS, STAGE2_DEFAULTS, SamplingParams
from .schedule import LR_SCHEDULES
from .validation import check_destination, check_options, check_output


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


def _show_progress(args) -> bool:
    """Progress bars only on a terminal: in a log file or a pipe they would bury an error's one line."""
    return args.progress and sys.stderr.isatty()


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="fmnist", help="'fmnist' (bundled) or an image folder in ImageNet layout")
    p.add_argument("--data-dir", help="Fashion-MNIST IDX directory (default $CTFGEN_DATA or "
                                      "/usr/share/datasets/fashion-mnist)")
    p.add_argument("--image-size", type=int, default=256, help="resize/crop size for image folders")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images with a warning")


# --- tokenizer -------------------------------------------------------------------------------

def cmd_tokenizer_train(args) -> None:
    from .tokenizer.train import TokenizerTrainConfig, train_tokenizer

    cfg = TokenizerTrainConfig(**{f.name: getattr(args, f.name) for f in fields(TokenizerTrainConfig)
                                  if hasattr(args, f.name)} | {"progress": _show_progress(args)})
    result = train_tokenizer(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint: {result['checkpoint']} (step {result['step']})")


def _load_tokenizer_and_data(args, split: str):
    from .data import load_dataset
    from .distributed import pick_device
    from .tokenizer.model import VQModel

    model = VQModel.from_pretrained(args.tokenizer, device=pick_device(args.device))
    dataset = load_dataset(args.data, split, data_dir=args.data_dir, image_size=args.image_size,
                           skip_bad=args.skip_bad_images)
    return model, dataset


def cmd_tokenizer_eval(args) -> None:
    from .tokenizer.evaluate import evaluate_tokenizer

    model, dataset = _load_tokenizer_and_data(args, args.split)
    result = evaluate_tokenizer(model, dataset, batch_size=args.batch_size, limit=args.limit,
                                num_workers=args.num_workers)
    result |= {"split": args.split, "tokenizer": str(args.tokenizer)}
    if args.json:
        _print_json(result)
    else:
        print(f"PSNR {result['psnr']:.2f} dB over {result['n_images']} images; codebook usage "
              f"{result['codebook_usage']:.1%} ({result['codes_used']}/{result['codebook_size']})")


def cmd_tokenizer_reconstruct(args) -> None:
    from .images import is_ctfgen_png, make_grid, save_png
    from .tokenizer.evaluate import reconstruction_pairs

    check_output(args.out, flag="--out", what="a PNG written by ctfgen", is_ours=is_ctfgen_png,
                 overwrite=args.overwrite, directory=False)
    model, dataset = _load_tokenizer_and_data(args, args.split)
    pairs = reconstruction_pairs(model, dataset, args.n)
    print(f"wrote {save_png(make_grid(pairs, ncol=2 * min(args.columns, args.n)), args.out)} "
          f"(original | reconstruction pairs)")


def cmd_export(args) -> None:
    from .checkpoint import is_checkpoint, load_config, load_weights, save_checkpoint

    check_output(args.out, flag="output directory", what="a ctfgen checkpoint", is_ours=is_checkpoint,
                 overwrite=args.overwrite)
    config = load_config(args.checkpoint, kind=None)
    config.pop("train", None)
    config["exported_from"] = {"step": config.pop("step", None), "dtype": args.dtype}
    save_checkpoint(args.out, config, load_weights(args.checkpoint), dtype=args.dtype)
    print(f"exported {args.checkpoint} -> {args.out} ({args.dtype})")


# --- transformers ---------------------------------------------------------------------------

def cmd_train(args) -> None:
    from .train import TrainConfig, train

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
                      | {"progress": _show_progress(args)})
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        extra = "".join(f", {k} {result[k]:.4f}" for k in ("loss", "eval_loss", "eval_acc") if k in result)
        print(f"checkpoint: {result['checkpoint']} (step {result['step']}{extra})")


# --- sampling -----------------------------------------------------------------------------

def _sampling_params(args, prefix: str, what: str):
    """One stage's SamplingParams from its flags (--temperature ... or --stage2-temperature ...)."""
    values = {f.name: getattr(args, prefix + f.name) for f in fields(SamplingParams) if hasattr(args, prefix + f.name)}
    try:
        return SamplingParams(**values)
    except CtfgenError as e:
        raise CtfgenError(f"{what}: {e}") from None


def _request(args) -> dict:
    """The pipeline call's settings of `ctfgen sample` and `ctfgen demo` (one function: same flags, same images)."""
    return dict(mode="baseline" if args.baseline else "ctf", sampling=_sampling_params(args, "", "stage-1 settings"),
                stage2_sampling=_sampling_params(args, "stage2_", "stage-2 settings (--stage2-*)"),
                restrict=not args.unrestricted, seed=args.seed, batch_size=args.batch)


def cmd_sample(args) -> None:
    from .checkpoint import DTYPES
    from .distributed import launched
    from .pipeline import CTFPipeline
    from .sample_ddp import sample_sharded

    if args.preview_grid and args.baseline:
        raise CtfgenError("--preview-grid shows CTF's stage-1 preview; drop --baseline")
    with launched(args.device) as runtime:  # under torchrun each process samples whole batches; rank 0 writes
        pipe = CTFPipeline.from_pretrained(args.pipeline, device=runtime.device)
        if args.dtype != "fp32":
            pipe = pipe.copy(DTYPES[args.dtype])
        if args.compile:
            pipe.compile_decoding()
        classes, per_class = (args.classes.split(","), 1) if args.classes is not None else \
            (range(pipe.num_classes), args.per_class)
        out = sample_sharded(pipe, classes, runtime, per_class=per_class, preview=bool(args.preview_grid),
                             progress=True, **_request(args))
    if runtime.is_main:
        _write_samples(args, out, ncol=per_class if args.classes is None else min(len(out.labels), 16))


def _write_samples(args, out, ncol: int) -> None:
    """The outputs `ctfgen sample` was asked for, from the whole request's output ("pt")."""
    import numpy as np
    import torch

    from .checkpoint import write_atomic
    from .images import make_grid, save_png

    pixels, labels = out.images, out.labels.tolist()
    if args.npz:
        arr = pixels.permute(0, 2, 3, 1).numpy()

        def write_npz(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, arr_0=arr, labels=np.asarray(labels, dtype=np.int64))

        write_atomic(Path(args.npz), write_npz)
        print(f"wrote {args.npz}: arr_0 {arr.shape} uint8, labels")
    if args.grid:
        print(f"wrote {save_png(make_grid(pixels, ncol=ncol), args.grid)}")
    if args.preview_grid:
        pairs = torch.stack([out.previews, pixels], dim=1).flatten(0, 1)
        print(f"wrote {save_png(make_grid(pairs, ncol=2 * ncol), args.preview_grid)}: (stage-1 preview | final) pairs")
    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(pixels, labels)):
            save_png(make_grid(image[None], ncol=1, pad=0), out_dir / f"{i:06d}_class{label}.png")
        print(f"wrote {len(labels)} PNGs to {out_dir}")


def cmd_bench(args) -> None:
    import torch

    from .bench import benchmark
    from .pipeline import CTFPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = CTFPipeline.from_pretrained(args.pipeline)
    result = benchmark(pipe, batch=args.batch, cfg_scale=args.cfg_scale, repeats=args.repeats,
                       precision=args.precision, compile=args.compile)
    if args.json:
        _print_json(result)
    else:
        for key in ("ctf", "baseline"):
            if key in result:
                print(f"{key}: {result[key]['images_per_s']:.1f} images/s")


# --- coarse labels --------------------------------------------------------------------------

def cmd_cluster(args) -> None:
    from .clustering import CoarseMap, cluster_codebook
    from .tokenizer.model import VQModel

    check_output(args.out, flag="--out", what="a ctfgen coarse map", is_ours=CoarseMap.is_coarse_map,
                 overwrite=args.overwrite, directory=False)
    tic = time.perf_counter()
    codebook = VQModel.from_pretrained(args.tokenizer).codebook_weights
    coarse_map = cluster_codebook(codebook, args.k, method=args.method, seed=args.seed, n_init=args.n_init)
    coarse_map.save(args.out)
    result = {"out": str(args.out), "k": coarse_map.k, "method": coarse_map.method, "seed": coarse_map.seed,
              "inertia": coarse_map.inertia, "cluster_sizes": coarse_map.size_stats(),
              "fingerprint": coarse_map.fingerprint, "seconds": round(time.perf_counter() - tic, 2)}
    if args.json:
        _print_json(result)
    else:
        sizes = result["cluster_sizes"]
        print(f"wrote {args.out}: {coarse_map.vocab_size} codes -> {coarse_map.k} clusters ({args.method}), "
              f"inertia {coarse_map.inertia:.2f}, sizes {sizes['min']}..{sizes['max']} in {result['seconds']}s")


def cmd_extract(args) -> None:
    from .codes import extract_codes, is_codes_dir
    from .data import load_dataset
    from .distributed import launched
    from .tokenizer.model import VQModel

    check_output(args.out, flag="--out", what="extracted codes", is_ours=is_codes_dir, overwrite=args.overwrite)
    with launched(args.device) as runtime:
        tokenizer = VQModel.from_pretrained(args.tokenizer, device=runtime.device)
        dataset = load_dataset(args.data, args.split, data_dir=args.data_dir, image_size=args.image_size)
        tic = time.perf_counter()
        manifest = extract_codes(tokenizer, dataset, args.out, flip=args.flip, ten_crop=args.ten_crop,
                                 batch_size=args.batch_size, num_workers=args.num_workers, runtime=runtime,
                                 extra_manifest={"data": args.data, "split": args.split,
                                                 "tokenizer": str(args.tokenizer)})
        if runtime.is_main:
            print(f"wrote {args.out}: {manifest['count']} images x {manifest['views']} views of "
                  f"{manifest['grid'][0]}x{manifest['grid'][1]} tokens in {time.perf_counter() - tic:.0f}s")


def cmd_redundancy(args) -> None:
    from .checkpoint import write_atomic
    from .clustering import CoarseMap
    from .images import make_grid, save_png
    from .redundancy import redundancy_study

    out = check_output(args.out, flag="--out", what="a redundancy study", overwrite=args.overwrite,
                       is_ours=lambda path: (path / "redundancy.json").is_file())
    model, dataset = _load_tokenizer_and_data(args, args.split)
    coarse_map = CoarseMap.load(args.map)
    figures, grid = redundancy_study(model, coarse_map, dataset, args.n, seed=args.seed)
    save_png(make_grid(grid, ncol=4), out / "redundancy.png")
    write_atomic(out / "redundancy.json", lambda tmp: Path(tmp).write_text(json.dumps(figures, indent=2) + "\n"))
    figures["grid"] = str(out / "redundancy.png")
    if args.json:
        _print_json(figures)
    else:
        print(f"cluster swap PSNR {figures['kmeans_psnr']:.2f} dB vs random-map swap {figures['random_psnr']:.2f} dB "
              f"over {figures['n_images']} images; grid (original | reconstruction | k-means swap | random swap) "
              f"at {figures['grid']}")


# --- demo -------------------------------------------------------------------------------------

def cmd_demo(args) -> None:
    from .images import add_row_labels, make_grid, save_png
    from .pipeline import CTFPipeline

    tic = time.perf_counter()
    pipe = CTFPipeline.from_pretrained(args.pipeline)
    request = _request(args)
    pixels = pipe(range(pipe.num_classes), per_class=args.per_class, output_type="pt", **request).images
    grid = add_row_labels(make_grid(pixels, ncol=args.per_class), pipe.class_names, row_height=pixels.shape[-2])
    path = save_png(grid, args.out)
    print(f"wrote {path}: {args.per_class} {'CTF' if request['mode'] == 'ctf' else 'baseline'} samples for each of "
          f"the {pipe.num_classes} classes (a row per class, CFG {request['sampling'].cfg_scale}) in "
          f"{time.perf_counter() - tic:.1f}s")


# --- re-roll, web demo -----------------------------------------------------------------------

def cmd_reroll(args) -> None:
    import numpy as np
    import torch

    from .checkpoint import write_atomic
    from .images import make_grid, save_png
    from .pipeline import CTFPipeline
    from .reroll import coarse_of_images, image_size, read_image, reroll_grid

    pipe = CTFPipeline.from_pretrained(args.pipeline)
    classes = args.classes.split(",")
    if len(classes) not in (1, len(args.images)):
        raise CtfgenError(f"{len(classes)} classes for {len(args.images)} images; give one class for all, or one "
                          f"per image")
    pixels = torch.stack([read_image(path, image_size(pipe)) for path in args.images])
    coarse = coarse_of_images(pipe, pixels)
    out = pipe.variations(coarse, classes * (len(args.images) // len(classes)), n=args.n,
                          stage2_sampling=_sampling_params(args, "stage2_", "stage-2 settings (--stage2-*)"),
                          seed=args.seed, batch_size=args.batch, output_type="pt")
    if args.grid:
        grid = reroll_grid(pixels, pipe.decode_preview(coarse), out.images)
        print(f"wrote {save_png(grid, args.grid)}: a row per image (the image | its coarse labels | variations)")
    if args.npz:
        arrays = dict(arr_0=out.images.permute(0, 2, 3, 1).numpy(), labels=out.labels.numpy(),
                      tokens=out.tokens.numpy(), coarse=out.coarse.numpy())

        def write_npz(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        write_atomic(Path(args.npz), write_npz)
        print(f"wrote {args.npz}: arr_0 {arrays['arr_0'].shape} uint8, labels, tokens, coarse")
    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        for j, image in enumerate(out.images):
            save_png(make_grid(image[None], ncol=1, pad=0), out_dir / f"{j // args.n:04d}_variation{j % args.n}.png")
        print(f"wrote {len(out.images)} PNGs to {out_dir}")


def cmd_serve(args) -> None:
    import torch

    from .serve.actions import Limits
    from .serve.app import serve

    if args.threads:
        torch.set_num_threads(args.threads)
    serve(args.pipeline, host=args.host, port=args.port,
          limits=Limits(max_images=args.max_images, max_queue=args.max_queue, max_batch=args.max_batch))


def _check_part_paths(pipe, out: Path) -> None:
    """Refuse to assemble into a directory where a part's path holds something ctfgen did not write."""
    from .checkpoint import is_checkpoint
    from .clustering import CoarseMap

    for name, relative in pipe.part_paths().items():
        path, is_map = out / relative, name == "coarse_map"
        check_destination(path, directory=not is_map)
        if path.exists() and not (CoarseMap.is_coarse_map(path) if is_map else is_checkpoint(path)):
            raise CtfgenError(f"{path} is in the way of the pipeline's {name} and was not written by ctfgen; it is "
                              f"left as it is: choose another --out")


def cmd_assemble(args) -> None:
    from .clustering import CoarseMap
    from .data import FMNIST_CLASSES
    from .models.gpt import GPT
    from .models.refiner import Refiner
    from .pipeline import INDEX_NAME, CTFPipeline
    from .tokenizer.model import VQModel

    out = check_output(args.out, flag="--out", what="a ctfgen pipeline", overwrite=args.overwrite,
                       is_ours=lambda path: (path / INDEX_NAME).is_file())
    ctf = [args.map, args.stage1, args.stage2]
    if any(ctf) and not all(ctf):
        raise CtfgenError("CTF needs all of --map, --stage1 and --stage2")
    if not any(ctf) and not args.baseline:
        raise CtfgenError("give the CTF parts (--map, --stage1, --stage2), a --baseline, or both")
    if args.class_names == "fmnist":
        class_names = list(FMNIST_CLASSES)
    else:
        class_names = args.class_names.split(",") if args.class_names else None
    pipe = CTFPipeline(VQModel.from_pretrained(args.tokenizer),
                       CoarseMap.load(args.map) if args.map else None,
                       GPT.from_pretrained(args.stage1) if args.stage1 else None,
                       Refiner.from_pretrained(args.stage2) if args.stage2 else None,
                       GPT.from_pretrained(args.baseline) if args.baseline else None, class_names=class_names)
    provenance = {}
    for name in ("tokenizer", "map", "stage1", "stage2", "baseline"):
        source = getattr(args, name)
        if source and Path(source).is_dir():
            config = json.loads((Path(source) / "config.json").read_text())
            step = config.get("step", config.get("exported_from", {}).get("step"))
            provenance[name] = {"from": str(source), "step": step}
        elif source:
            provenance[name] = {"from": str(source)}
    _check_part_paths(pipe, out)
    pipe.save_pretrained(out, dtype=None if args.dtype == "fp32" else args.dtype, provenance=provenance)
    print(f"wrote pipeline {args.out}: {', '.join(pipe.part_paths())} ({args.dtype})")


# --- evaluation -------------------------------------------------------------------------------

def cmd_eval(args) -> None:
    from .distributed import pick_device
    from .evaluation import EvalOptions, evaluate_floor, evaluate_npz, load_feature_network

    chosen = [flag for flag, given in (("--samples", args.samples is not None), ("--floor", args.floor),
                                       ("--reconstruction", args.reconstruction is not None)) if given]
    if len(chosen) != 1:
        raise CtfgenError("give one of --samples FILE.npz (a sample file), --floor (training vs test images) or "
                          "--reconstruction [TOKENIZER] (the tokenizer's reconstructions of training images)"
                          + (f"; got {' and '.join(chosen)}" if chosen else ""))
    network = load_feature_network(args.features, classifier=args.classifier, inception_weights=args.inception_weights,
                                   device=pick_device(args.device))
    options = EvalOptions(k=args.k, pr_points=args.pr_points, seed=args.seed, is_splits=args.is_splits,
                          batch_size=args.batch_size, per_class_fid=args.per_class_fid)
    common = dict(data_dir=args.data_dir, cache=args.cache_dir, use_cache=not args.no_cache, options=options)
    if args.reconstruction:
        from .tokenizer.model import VQModel

        tokenizer = VQModel.from_pretrained(args.reconstruction, device=pick_device(args.device)).eval()
        result = evaluate_floor(network, n=args.floor_n, ref=args.ref, tokenizer=tokenizer, **common)
    elif args.floor:
        result = evaluate_floor(network, n=args.floor_n, ref=args.ref, **common)
    else:
        result = evaluate_npz(args.samples, args.ref, network, **common)
    if args.json:
        _print_json(result)
        return
    what = ("floor (training images)" if args.floor else
            "reconstructions of training images" if args.reconstruction else args.samples)

    def fmt(key, digits=3):
        value = result.get(key)
        return "n/a" if value is None else f"{value:.{digits}f}"

    print(f"{what} vs {result['ref']} ({result['features']} features, {result['n_samples']} vs {result['n_ref']} "
          f"images): FID {fmt('fid')}, sFID {fmt('sfid')}, IS {fmt('inception_score')}, precision "
          f"{fmt('precision')}, recall {fmt('recall')}"
          + (f", accuracy {fmt('accuracy')}" if "accuracy" in result else ""))
    for row in result.get("per_class", []):
        name = f" {row['name']}" if "name" in row else ""
        extra = "".join(f", {key} {row[key]:.3f}" for key in ("fid", "accuracy") if row.get(key) is not None)
        print(f"  class {row['class']}{name}: {row['n']} samples{extra}")


def cmd_eval_train_classifier(args) -> None:
    import torch

    from .checkpoint import is_checkpoint
    from .evaluation.classifier import CHECKPOINT_KIND, ClassifierConfig, ClassifierTrainConfig, train_classifier

    check_output(args.out, flag="--out", what="a feature classifier", overwrite=args.overwrite,
                 is_ours=lambda path: is_checkpoint(path, CHECKPOINT_KIND))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError:
        raise CtfgenError(f"--channels takes comma-separated widths, e.g. 32,64,128; got {args.channels!r}") from None
    model = ClassifierConfig(channels=channels, hidden=args.hidden, pool_grid=args.pool_grid, dropout=args.dropout)
    cfg = ClassifierTrainConfig(model=model, **{f.name: getattr(args, f.name) for f in fields(ClassifierTrainConfig)
                                                if hasattr(args, f.name) and f.name not in ("model", "progress")},
                                progress=_show_progress(args))
    result = train_classifier(cfg, command=" ".join(["ctfgen", *map(shlex.quote, args.argv)]))
    if args.json:
        _print_json(result)
    else:
        print(f"wrote {result['out']}: test accuracy {result['test_accuracy']:.4f} "
              f"({result['parameters']} parameters, {result['train_seconds']:.0f}s)")


# --- parser -----------------------------------------------------------------------------------

def _add_request_args(p: argparse.ArgumentParser) -> None:
    """The flags of `_request`: which model, seed, batch, and each stage's SamplingParams fields."""
    p.add_argument("--baseline", action="store_true", help="sample the plain autoregressive baseline instead of CTF")
    p.add_argument("--seed", type=int, default=0, help="image i of the request draws from a generator seeded "
                   "from (seed, i): the batch size does not change the images")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH_SIZE, help="images per batch (default %(default)s)")
    _add_sampling_args(p, "", STAGE1_DEFAULTS, "stage 1 (or the baseline)")
    _add_sampling_args(p, "stage2-", STAGE2_DEFAULTS, "stage 2")
    p.add_argument("--unrestricted", action="store_true", help="ablation: stage 2 may leave the cluster")


def _add_sampling_args(p: argparse.ArgumentParser, prefix: str, defaults: SamplingParams, stage: str) -> None:
    """One stage's SamplingParams fields as flags (--temperature ..., or --stage2-temperature ...)."""
    for f in fields(SamplingParams):
        if prefix and f.name == "cfg_interval":
            continue  # stage 2 predicts every token at once
        default = getattr(defaults, f.name)
        p.add_argument(f"--{prefix}{f.name.replace('_', '-')}", type=type(default), default=default,
                       help=f"{stage}: {f.metadata['help']} (default %(default)s)")


def _add_overwrite_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true", help=f"replace the output when it holds {what}; anything "
                   "else is never replaced")


class _Parser(argparse.ArgumentParser):
    """Usage mistakes as one line, like every other error (`--help` still shows the usage)."""

    def error(self, message):
        self.exit(2, f"ctfgen: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ctfgen", description="Coarse-to-fine autoregressive image generation")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate a grid of every class with the bundled pipeline (writes a PNG); "
                                       "the same images as `ctfgen sample --per-class N` with the same settings")
    demo.add_argument("--out", default="demo.png")
    demo.add_argument("--pipeline", default=str(pretrained_dir() / "fmnist"))
    demo.add_argument("--per-class", type=int, default=10)
    _add_request_args(demo)
    demo.set_defaults(func=cmd_demo)

    asm = sub.add_parser("assemble", help="gather trained parts into a pipeline directory (CTFPipeline format)")
    asm.add_argument("--out", required=True)
    asm.add_argument("--tokenizer", required=True)
    asm.add_argument("--map", help="coarse map (CTF)")
    asm.add_argument("--stage1", help="stage-1 checkpoint directory (CTF)")
    asm.add_argument("--stage2", help="stage-2 checkpoint directory (CTF)")
    asm.add_argument("--baseline", help="baseline checkpoint directory")
    asm.add_argument("--class-names", help="'fmnist' or comma-separated names, in class-id order")
    asm.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="fp16")
    _add_overwrite_arg(asm, "a pipeline written by ctfgen (its parts and pipeline.json; other files stay)")
    asm.set_defaults(func=cmd_assemble)

    tok = sub.add_parser("tokenizer", help="train and evaluate the VQ tokenizer").add_subparsers(
        dest="tokenizer_command", required=True)
    train = tok.add_parser("train", help="train a VQ tokenizer (single process or under torchrun)")
    train.add_argument("--out", required=True, help="run directory (checkpoint/, metrics.jsonl)")
    train.add_argument("--model", default="VQ-fmnist", help="preset: VQ-fmnist, VQ-16, VQ-8, VQ-tiny")
    _add_data_args(train)
    train.add_argument("--codebook-size", type=int)
    for name, kind, default in [("steps", int, 2000), ("batch-size", int, 128), ("lr", float, 1e-3),
                                ("warmup-steps", int, 100), ("weight-decay", float, 0.0),
                                ("grad-clip", float, 1.0), ("entropy-loss-ratio", float, 0.0),
                                ("gan-weight", float, 0.0), ("gan-start", int, 1000),
                                ("restart-every", int, 100), ("ckpt-every", int, 250), ("log-every", int, 10),
                                ("seed", int, 0), ("num-workers", int, 0)]:
        train.add_argument(f"--{name}", type=kind, default=default)
    train.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                       help="auto: bf16 autocast on CUDA or bf16-capable CPUs, fp32 elsewhere")
    train.add_argument("--device", default="auto")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    train.add_argument("--no-progress", dest="progress", action="store_false")
    train.set_defaults(func=cmd_tokenizer_train)

    for name, func, helptext in [("eval", cmd_tokenizer_eval, "PSNR and codebook usage on a split"),
                                 ("reconstruct", cmd_tokenizer_reconstruct, "originals vs reconstructions PNG")]:
        p = tok.add_parser(name, help=helptext)
        p.add_argument("--tokenizer", default=str(pretrained_dir() / "fmnist" / "tokenizer"))
        p.add_argument("--split", default="test")
        _add_data_args(p)
        p.add_argument("--device", default="auto")
        p.set_defaults(func=func)
    evaluate = tok.choices["eval"]
    evaluate.add_argument("--batch-size", type=int, default=500)
    evaluate.add_argument("--limit", type=int, help="only the first N images")
    evaluate.add_argument("--num-workers", type=int, default=0)
    evaluate.add_argument("--json", action="store_true")
    recon = tok.choices["reconstruct"]
    recon.add_argument("--out", default="reconstructions.png")
    recon.add_argument("--n", type=int, default=32)
    recon.add_argument("--columns", type=int, default=8, help="pairs per row")
    _add_overwrite_arg(recon, "a PNG written by ctfgen")

    tr = sub.add_parser("train", help="train the baseline GPT, the stage-1 GPT or the stage-2 refiner")
    tr.add_argument("--stage", required=True, choices=["baseline", "stage1", "stage2"])
    tr.add_argument("--codes", required=True, help="training codes from `ctfgen extract`")
    tr.add_argument("--eval-codes", help="held-out codes for loss/accuracy every --eval-every steps")
    tr.add_argument("--map", help="coarse map (stage1, stage2)")
    tr.add_argument("--model", default="GPT-S",
                    help="preset: GPT-tiny, GPT-XS, GPT-S, GPT-M, GPT-B, GPT-L, GPT-XL, GPT-XXL")
    tr.add_argument("--out", required=True, help="run directory (checkpoint/, metrics.jsonl)")
    for name, kind, default in [("steps", int, 1000), ("batch-size", int, 64), ("grad-accum", int, 1),
                                ("lr", float, 1e-4), ("weight-decay", float, 0.05), ("grad-clip", float, 1.0),
                                ("warmup-steps", int, 0), ("class-dropout", float, 0.1), ("dropout", float, None),
                                ("ema", float, 0.0), ("eval-every", int, 500), ("eval-items", int, 2000),
                                ("ckpt-every", int, 500), ("snapshot-every", int, 0), ("views", int, 0),
                                ("log-every", int, 10), ("seed", int, 0)]:
        tr.add_argument(f"--{name}", type=kind, default=default)
    tr.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="auto: bf16 autocast on CUDA or bf16-capable CPUs, fp32 elsewhere")
    tr.add_argument("--device", default="auto")
    tr.add_argument("--resume", action="store_true")
    tr.add_argument("--fsdp", action="store_true",
                    help="under torchrun, shard weights, gradients, optimizer state and EMA over the processes "
                         "(FSDP2, per transformer block) instead of replicating them (DDP); for the large presets. "
                         "A single process trains unsharded. Checkpoints are the same either way")
    tr.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                    help="after warm-up: constant (LlamaGen) or cosine decay to lr / 10 at the last step")
    tr.add_argument("--compile", action="store_true",
                    help="torch.compile the training step (~30 s once, then ~1.2x faster on a CPU)")
    tr.add_argument("--no-progress", dest="progress", action="store_false")
    tr.set_defaults(func=cmd_train)

    sample = sub.add_parser("sample", help="generate images from a pipeline (PNGs, a grid, an ADM-style .npz); "
                                            "torchrun shares the batches out, with the same output")
    sample.add_argument("--pipeline", default=str(pretrained_dir() / "fmnist"))
    which = sample.add_mutually_exclusive_group(required=True)
    which.add_argument("--classes", help="comma-separated class ids or names, e.g. 0,3,7 or Sneaker,Bag")
    which.add_argument("--per-class", type=int, help="N images of every class")
    sample.add_argument("--out", help="directory for one PNG per image")
    sample.add_argument("--grid", help="one PNG grid of all images")
    sample.add_argument("--preview-grid", help="a PNG grid of (stage-1 preview | final image) pairs (CTF only)")
    sample.add_argument("--npz", help="ADM evaluator layout: arr_0 uint8 [N,H,W,3] and labels")
    _add_request_args(sample)
    sample.add_argument("--compile", action="store_true",
                        help="torch.compile the stage-1/baseline decode step (~20 s once; pays off over many batches)")
    sample.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="the transformers' dtype: bf16 is ~1.5x faster on GPUs and CPUs with fast bf16, and "
                        "draws other images than fp32 for a seed (same distribution)")
    sample.add_argument("--device", default="cpu", help="cpu (default: the device of `ctfgen demo`, whose images "
                        "a seed gives), cuda, cuda:N or auto; under torchrun with cuda each process takes its own GPU")
    sample.set_defaults(func=cmd_sample)

    bench = sub.add_parser("bench", help="images/s of CTF and the baseline, stage by stage")
    bench.add_argument("--pipeline", default=str(pretrained_dir() / "fmnist"))
    bench.add_argument("--batch", type=int, default=64)
    bench.add_argument("--cfg-scale", type=float, default=STAGE1_DEFAULTS.cfg_scale, help="stage-1 guidance")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    bench.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    bench.add_argument("--compile", action="store_true", help="time the torch.compile'd decode step (the warm-up "
                       "run pays the compile time)")
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=cmd_bench)

    reroll = sub.add_parser("reroll", help="re-roll the details of images: keep their coarse labels (tokenized by "
                                           "the pipeline's tokenizer), sample stage 2 again")
    reroll.add_argument("images", nargs="+", help="PNG/JPEG images of the tokenizer's size (32x32; 28x28 is padded)")
    reroll.add_argument("--class", dest="classes", required=True,
                        help="the class of the images (id or name), or one per image, comma-separated")
    reroll.add_argument("--pipeline", default=str(pretrained_dir() / "fmnist"))
    reroll.add_argument("--n", type=int, default=4, help="variations of each image (default %(default)s)")
    reroll.add_argument("--seed", type=int, default=0, help="variation j draws from a generator seeded from (seed, j)")
    reroll.add_argument("--batch", type=int, default=DEFAULT_BATCH_SIZE, help="images per batch (default %(default)s)")
    _add_sampling_args(reroll, "stage2-", STAGE2_DEFAULTS, "stage 2")
    reroll.add_argument("--grid", help="a PNG grid: a row per image (the image | its coarse labels | variations)")
    reroll.add_argument("--npz", help="the variations: arr_0 uint8 [N,H,W,3], labels, tokens and coarse [N,h,w]")
    reroll.add_argument("--out", help="directory for one PNG per variation")
    reroll.set_defaults(func=cmd_reroll)

    serve = sub.add_parser("serve", help="the web demo: a Gradio page (offline, loopback by default) that streams "
                                         "the stage-1 preview and re-rolls details; needs ctfgen[web]")
    serve.add_argument("--pipeline", default=str(pretrained_dir() / "fmnist"))
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this "
                       "machine only)")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--max-images", type=int, default=16, help="images one request may ask for")
    serve.add_argument("--max-queue", type=int, default=32, help="requests that may wait at once; more are told "
                       "the server is busy")
    serve.add_argument("--max-batch", type=int, default=64, help="images in one sampler call, over all the "
                       "requests that share it")
    serve.add_argument("--threads", type=int, help="torch threads of the sampler (default: torch's choice; on 2 "
                       "cores 1 serves better, leaving a core to the previews and the web server)")
    serve.set_defaults(func=cmd_serve)

    cluster = sub.add_parser("cluster", help="k-means (or random) clustering of a codebook -> coarse map")
    cluster.add_argument("--tokenizer", default=str(pretrained_dir() / "fmnist" / "tokenizer"))
    cluster.add_argument("--k", type=int, required=True, help="number of clusters (coarse vocabulary)")
    cluster.add_argument("--method", choices=["kmeans", "random"], default="kmeans")
    cluster.add_argument("--seed", type=int, default=0)
    cluster.add_argument("--n-init", type=int, default=4, help="k-means restarts; the best is kept")
    cluster.add_argument("--out", required=True, help="output .safetensors file")
    cluster.add_argument("--json", action="store_true")
    _add_overwrite_arg(cluster, "a coarse map written by ctfgen")
    cluster.set_defaults(func=cmd_cluster)

    extract = sub.add_parser("extract", help="encode a dataset to token grids on disk (torchrun shards it)")
    extract.add_argument("--tokenizer", default=str(pretrained_dir() / "fmnist" / "tokenizer"))
    _add_data_args(extract)
    extract.add_argument("--split", default="train")
    extract.add_argument("--out", required=True)
    extract.add_argument("--flip", action="store_true", help="also store the codes of mirrored images")
    extract.add_argument("--ten-crop", action="store_true", help="image folders: ten crops of a 1.1x resize")
    extract.add_argument("--batch-size", type=int, default=500)
    extract.add_argument("--num-workers", type=int, default=0)
    extract.add_argument("--device", default="auto")
    _add_overwrite_arg(extract, "codes extracted before")
    extract.set_defaults(func=cmd_extract)

    redundancy = sub.add_parser("redundancy", help="swap tokens within clusters and measure the damage")
    redundancy.add_argument("--tokenizer", default=str(pretrained_dir() / "fmnist" / "tokenizer"))
    redundancy.add_argument("--map", required=True)
    _add_data_args(redundancy)
    redundancy.add_argument("--split", default="test")
    redundancy.add_argument("--n", type=int, default=1000)
    redundancy.add_argument("--seed", type=int, default=0)
    redundancy.add_argument("--out", required=True, help="directory for redundancy.png and redundancy.json")
    redundancy.add_argument("--device", default="auto")
    redundancy.add_argument("--json", action="store_true")
    _add_overwrite_arg(redundancy, "an earlier study's redundancy.png and redundancy.json")
    redundancy.set_defaults(func=cmd_redundancy)

    export = sub.add_parser("export", help="copy a checkpoint's weights without training state, cast to fp16/bf16")
    export.add_argument("checkpoint")
    export.add_argument("out")
    export.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    _add_overwrite_arg(export, "a checkpoint written by ctfgen")
    export.set_defaults(func=cmd_export)

    ev = sub.add_parser("eval", help="FID, sFID, IS and precision/recall of a sample .npz; train the feature "
                                     "classifier (eval train-classifier)")
    ev.add_argument("--samples", help="sample file: arr_0 uint8 [N,H,W,3] (+ labels [N]), as `ctfgen sample --npz`")
    ev.add_argument("--ref", default="fmnist-test",
                    help="fmnist-test (default), fmnist-train, or an .npz: ADM reference batch (arr_0, optionally "
                         "mu/sigma/mu_s/sigma_s) or another sample file")
    ev.add_argument("--features", choices=["fmnist", "inception"], default="fmnist",
                    help="feature network: the project's Fashion-MNIST classifier, or FID Inception-v3")
    ev.add_argument("--classifier", default=str(pretrained_dir() / "fmnist" / "classifier"),
                    help="fmnist classifier checkpoint directory")
    ev.add_argument("--inception-weights", help="local FID Inception-v3 weights (torch-fidelity's "
                                                "weights-inception-2015-12-05-6726825d.pth); default "
                                                "$CTFGEN_INCEPTION_WEIGHTS")
    ev.add_argument("--floor", action="store_true",
                    help="score --floor-n training images against --ref: the best a generator can reach")
    ev.add_argument("--reconstruction", nargs="?", const=str(pretrained_dir() / "fmnist" / "tokenizer"),
                    metavar="TOKENIZER", help="score the tokenizer's reconstructions of --floor-n training images "
                    "(default: the shipped one): the floor of any generator over its tokens")
    ev.add_argument("--floor-n", type=int, default=10_000)
    ev.add_argument("--data-dir", help="Fashion-MNIST IDX directory")
    ev.add_argument("--k", type=int, default=3, help="precision/recall neighbourhood size")
    ev.add_argument("--pr-points", type=int, default=10_000,
                    help="precision/recall on a fixed random subset of at most this many points per set")
    ev.add_argument("--is-splits", type=int, default=10, help="Inception Score: mean and std over this many parts")
    ev.add_argument("--seed", type=int, default=0, help="subsets (precision/recall, IS parts, --floor images)")
    ev.add_argument("--per-class-fid", action=argparse.BooleanOptionalAction, default=None,
                    help="FID per class (default: when the features have at most 512 dimensions)")
    ev.add_argument("--batch-size", type=int, default=500)
    ev.add_argument("--cache-dir", help="reference statistics cache (default $CTFGEN_CACHE or ~/.cache/ctfgen)")
    ev.add_argument("--no-cache", action="store_true", help="recompute the reference statistics, store nothing")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=cmd_eval)
    ev_sub = ev.add_subparsers(dest="eval_command", required=False, metavar="{train-classifier}")
    tc = ev_sub.add_parser("train-classifier", help="train the Fashion-MNIST feature classifier (FID/IS features)")
    tc.add_argument("--out", required=True, help="checkpoint directory to write (the shipped one: "
                                                  "pretrained/fmnist/classifier)")
    tc.add_argument("--data-dir", help="Fashion-MNIST IDX directory")
    for name, kind, default in [("epochs", int, 8), ("batch-size", int, 128), ("lr", float, 2e-3),
                                ("weight-decay", float, 0.05), ("warmup-steps", int, 200), ("shift", int, 2),
                                ("seed", int, 0), ("log-every", int, 50)]:
        tc.add_argument(f"--{name}", type=kind, default=default)
    tc.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flips")
    tc.add_argument("--channels", default="32,64,96", help="conv widths, one 3x3 conv per stage")
    tc.add_argument("--hidden", type=int, default=128, help="penultimate width: the FID features")
    tc.add_argument("--pool-grid", type=int, default=4, help="average-pool the last map to this grid")
    tc.add_argument("--dropout", type=float, default=0.1)
    tc.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="of the saved weights")
    tc.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    tc.add_argument("--no-progress", dest="progress", action="store_false")
    tc.add_argument("--json", action="store_true")
    _add_overwrite_arg(tc, "a classifier written by ctfgen")
    tc.set_defaults(func=cmd_eval_train_classifier)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, one line already printed)
        return e.code
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if args.command not in ("sample", "demo", "bench"):  # those validate their request in the sampling API
            check_options(args)
        args.func(args)
    except CtfgenError as e:
        print(f"ctfgen: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a permission denied mid-way: the system's reason, with the file
        where = f"{e.filename}: " if e.filename else ""
        print(f"ctfgen: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ctfgen: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
