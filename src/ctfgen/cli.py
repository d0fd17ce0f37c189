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
from .schedule import LR_SCHEDULES


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


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
                                  if hasattr(args, f.name)})
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
    from .images import make_grid, save_png
    from .tokenizer.evaluate import reconstruction_pairs

    model, dataset = _load_tokenizer_and_data(args, args.split)
    pairs = reconstruction_pairs(model, dataset, args.n)
    print(f"wrote {save_png(make_grid(pairs, ncol=2 * args.columns), args.out)} "
          f"(original | reconstruction pairs)")


def cmd_export(args) -> None:
    from .checkpoint import CONFIG_NAME, load_weights, save_checkpoint

    config = json.loads((Path(args.checkpoint) / CONFIG_NAME).read_text()) \
        if (Path(args.checkpoint) / CONFIG_NAME).is_file() else None
    if config is None:
        raise CtfgenError(f"{args.checkpoint} is not a ctfgen checkpoint (no {CONFIG_NAME})")
    config.pop("train", None)
    config["exported_from"] = {"step": config.pop("step", None), "dtype": args.dtype}
    save_checkpoint(args.out, config, load_weights(args.checkpoint), dtype=args.dtype)
    print(f"exported {args.checkpoint} -> {args.out} ({args.dtype})")


# --- transformers ---------------------------------------------------------------------------

def cmd_train(args) -> None:
    from .train import TrainConfig, train

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        extra = "".join(f", {k} {result[k]:.4f}" for k in ("loss", "eval_loss", "eval_acc") if k in result)
        print(f"checkpoint: {result['checkpoint']} (step {result['step']}{extra})")


# --- sampling -----------------------------------------------------------------------------

def _sampling_kwargs(args) -> dict:
    return dict(cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval, tau1=args.tau1, tau2=args.tau2,
                top_k=args.top_k, top_p=args.top_p, top_k2=args.top_k2, cfg_scale2=args.cfg_scale2,
                restrict=not args.unrestricted)


def _class_list(args, num_classes: int) -> list[int]:
    if args.classes:
        try:
            return [int(c) for c in args.classes.split(",")]
        except ValueError:
            raise CtfgenError(f"--classes takes comma-separated class ids, e.g. 0,3,7; got {args.classes!r}") from None
    if args.per_class < 1:
        raise CtfgenError(f"--per-class must be at least 1, got {args.per_class}")
    return [c for c in range(num_classes) for _ in range(args.per_class)]


def cmd_sample(args) -> None:
    import numpy as np
    import torch

    from .checkpoint import write_atomic
    from .images import make_grid, save_png
    from .pipeline import CTFPipeline

    pipe = CTFPipeline.from_pretrained(args.pipeline)
    classes = _class_list(args, pipe.num_classes)
    if args.compile:
        pipe.compile_decoding()
    mode = "baseline" if args.baseline else "ctf"
    if args.preview_grid and args.baseline:
        raise CtfgenError("--preview-grid shows CTF's stage-1 preview; drop --baseline")
    result = pipe.sample_batches(classes, mode=mode, batch_size=args.batch, seed=args.seed, progress=True,
                                 preview=bool(args.preview_grid), **_sampling_kwargs(args))
    pixels = result.pixels
    labels = np.asarray(classes, dtype=np.int64)
    if args.npz:
        arr = pixels.permute(0, 2, 3, 1).numpy()

        def write_npz(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, arr_0=arr, labels=labels)

        write_atomic(Path(args.npz), write_npz)
        print(f"wrote {args.npz}: arr_0 {arr.shape} uint8, labels")
    ncol = args.per_class if not args.classes else min(len(classes), 16)
    if args.grid:
        print(f"wrote {save_png(make_grid(pixels, ncol=ncol), args.grid)}")
    if args.preview_grid:
        pairs = torch.stack([result.preview_pixels, pixels], dim=1).flatten(0, 1)
        print(f"wrote {save_png(make_grid(pairs, ncol=2 * ncol), args.preview_grid)}: (stage-1 preview | final) pairs")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(pixels, classes)):
            save_png(make_grid(image[None], ncol=1, pad=0), out / f"{i:06d}_class{label}.png")
        print(f"wrote {len(classes)} PNGs to {out}")


def cmd_bench(args) -> None:
    import torch

    from .bench import benchmark
    from .pipeline import CTFPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = CTFPipeline.from_pretrained(args.pipeline)
    if args.compile:
        pipe.compile_decoding()
    result = benchmark(pipe, batch=args.batch, cfg_scale=args.cfg_scale, repeats=args.repeats,
                       precision=args.precision)
    if args.json:
        _print_json(result)
    else:
        for key in ("ctf", "baseline"):
            if key in result:
                print(f"{key}: {result[key]['images_per_s']:.1f} images/s")


# --- coarse labels --------------------------------------------------------------------------

def cmd_cluster(args) -> None:
    from .clustering import cluster_codebook
    from .tokenizer.model import VQModel

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
    from .codes import extract_codes
    from .data import load_dataset
    from .distributed import launched
    from .tokenizer.model import VQModel

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
    from .clustering import CoarseMap
    from .images import make_grid, save_png
    from .redundancy import redundancy_study

    model, dataset = _load_tokenizer_and_data(args, args.split)
    coarse_map = CoarseMap.load(args.map)
    figures, grid = redundancy_study(model, coarse_map, dataset, args.n, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_png(make_grid(grid, ncol=4), out / "redundancy.png")
    (out / "redundancy.json").write_text(json.dumps(figures, indent=2) + "\n")
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

    if args.per_class < 1:
        raise CtfgenError(f"--per-class must be at least 1, got {args.per_class}")
    tic = time.perf_counter()
    pipe = CTFPipeline.from_pretrained(args.pipeline)
    mode = "baseline" if args.baseline else "ctf"
    labels = [c for c in range(pipe.num_classes) for _ in range(args.per_class)]
    pixels = pipe(labels, mode=mode, cfg_scale=args.cfg_scale, seed=args.seed).pixels
    grid = add_row_labels(make_grid(pixels, ncol=args.per_class), pipe.class_names, row_height=pixels.shape[-2])
    path = save_png(grid, args.out)
    print(f"wrote {path}: {args.per_class} {'CTF' if mode == 'ctf' else 'baseline'} samples for each of the "
          f"{pipe.num_classes} classes (a row per class, CFG {args.cfg_scale}) in {time.perf_counter() - tic:.1f}s")


def cmd_assemble(args) -> None:
    from .clustering import CoarseMap
    from .data import FMNIST_CLASSES
    from .models.gpt import GPT
    from .models.refiner import Refiner
    from .pipeline import CTFPipeline
    from .tokenizer.model import VQModel

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
    pipe.save_pretrained(args.out, dtype=None if args.dtype == "fp32" else args.dtype, provenance=provenance)
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
    for name in ("k", "pr_points", "is_splits", "batch_size", "floor_n"):
        if getattr(args, name) < 1:
            raise CtfgenError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
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

    from .evaluation.classifier import ClassifierConfig, ClassifierTrainConfig, train_classifier

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError:
        raise CtfgenError(f"--channels takes comma-separated widths, e.g. 32,64,128; got {args.channels!r}") from None
    model = ClassifierConfig(channels=channels, hidden=args.hidden, pool_grid=args.pool_grid, dropout=args.dropout)
    cfg = ClassifierTrainConfig(model=model, **{f.name: getattr(args, f.name) for f in fields(ClassifierTrainConfig)
                                                if hasattr(args, f.name) and f.name != "model"})
    result = train_classifier(cfg, command=" ".join(["ctfgen", *map(shlex.quote, args.argv)]))
    if args.json:
        _print_json(result)
    else:
        print(f"wrote {result['out']}: test accuracy {result['test_accuracy']:.4f} "
              f"({result['parameters']} parameters, {result['train_seconds']:.0f}s)")


# --- parser -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctfgen", description="Coarse-to-fine autoregressive image generation")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate a grid of every class with the bundled pipeline (writes a PNG)")
    demo.add_argument("--out", default="demo.png")
    demo.add_argument("--pipeline", default=str(pretrained_dir() / "fmnist"))
    demo.add_argument("--per-class", type=int, default=10)
    demo.add_argument("--cfg-scale", type=float, default=2.0)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--baseline", action="store_true", help="the plain autoregressive baseline instead of CTF")
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

    sample = sub.add_parser("sample", help="generate images from a pipeline (PNGs, a grid, an ADM-style .npz)")
    sample.add_argument("--pipeline", default=str(pretrained_dir() / "fmnist"))
    which = sample.add_mutually_exclusive_group(required=True)
    which.add_argument("--classes", help="comma-separated class ids, e.g. 0,3,7")
    which.add_argument("--per-class", type=int, help="N images of every class")
    sample.add_argument("--out", help="directory for one PNG per image")
    sample.add_argument("--grid", help="one PNG grid of all images")
    sample.add_argument("--preview-grid", help="a PNG grid of (stage-1 preview | final image) pairs (CTF only)")
    sample.add_argument("--npz", help="ADM evaluator layout: arr_0 uint8 [N,H,W,3] and labels")
    sample.add_argument("--baseline", action="store_true", help="sample the plain GPT instead of CTF")
    sample.add_argument("--batch", type=int, default=64)
    sample.add_argument("--seed", type=int, default=0)
    for name, kind, default, text in [
            ("cfg-scale", float, 2.0, "classifier-free guidance (1 = off)"),
            ("cfg-interval", int, -1, "guide only the first N tokens (-1 = all)"),
            ("tau1", float, 1.0, "stage-1 (or baseline) temperature"), ("tau2", float, 1.0, "stage-2 temperature"),
            ("top-k", int, 0, "stage-1 top-k (0 = off)"), ("top-p", float, 1.0, "stage-1 top-p"),
            ("top-k2", int, 0, "stage-2 top-k (0 = off)"), ("cfg-scale2", float, 1.0, "stage-2 guidance")]:
        sample.add_argument(f"--{name}", type=kind, default=default, help=text)
    sample.add_argument("--unrestricted", action="store_true", help="ablation: stage 2 may leave the cluster")
    sample.add_argument("--compile", action="store_true",
                        help="torch.compile the stage-1/baseline decode step (~20 s once; pays off over many batches)")
    sample.set_defaults(func=cmd_sample)

    bench = sub.add_parser("bench", help="images/s of CTF and the baseline, stage by stage")
    bench.add_argument("--pipeline", default=str(pretrained_dir() / "fmnist"))
    bench.add_argument("--batch", type=int, default=64)
    bench.add_argument("--cfg-scale", type=float, default=2.0)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    bench.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    bench.add_argument("--compile", action="store_true", help="time the torch.compile'd decode step (the warm-up "
                       "run pays the compile time)")
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=cmd_bench)

    cluster = sub.add_parser("cluster", help="k-means (or random) clustering of a codebook -> coarse map")
    cluster.add_argument("--tokenizer", default=str(pretrained_dir() / "fmnist" / "tokenizer"))
    cluster.add_argument("--k", type=int, required=True, help="number of clusters (coarse vocabulary)")
    cluster.add_argument("--method", choices=["kmeans", "random"], default="kmeans")
    cluster.add_argument("--seed", type=int, default=0)
    cluster.add_argument("--n-init", type=int, default=4, help="k-means restarts; the best is kept")
    cluster.add_argument("--out", required=True, help="output .safetensors file")
    cluster.add_argument("--json", action="store_true")
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
    redundancy.set_defaults(func=cmd_redundancy)

    export = sub.add_parser("export", help="copy a checkpoint's weights without training state, cast to fp16/bf16")
    export.add_argument("checkpoint")
    export.add_argument("out")
    export.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
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
    tc.set_defaults(func=cmd_eval_train_classifier)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args.func(args)
    except CtfgenError as e:
        print(f"ctfgen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ctfgen: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
