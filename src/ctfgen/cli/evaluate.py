"""`ctfgen eval` (FID, sFID, IS, precision/recall of a sample file) and `ctfgen eval train-classifier`."""

from __future__ import annotations

import argparse
import shlex

from ctfgen.cli.common import (
    add_dataclass_flags,
    add_device_flag,
    add_json_flag,
    add_overwrite_flag,
    bundled,
    config_from_args,
    number_flag,
    print_json,
    show_progress,
)
from ctfgen.errors import CtfgenError
from ctfgen.evaluation.classifier_config import CHECKPOINT_KIND, ClassifierConfig, ClassifierTrainConfig
from ctfgen.validation import POSITIVE, SEED, check_output

# The classifier's settings that are fixed for Fashion-MNIST: not flags.
FIXED_MODEL_FIELDS = ("num_classes", "image_size", "spatial_channels")


def register(commands) -> None:
    ev = commands.add_parser("eval", help="FID, sFID, IS and precision/recall of a sample .npz; train the feature "
                                          "classifier (eval train-classifier)")
    ev.add_argument("--samples", help="sample file: arr_0 uint8 [N,H,W,3] (+ labels [N]), as `ctfgen sample --npz`")
    ev.add_argument("--ref", default="fmnist-test",
                    help="fmnist-test (default), fmnist-train, or an .npz: ADM reference batch (arr_0, optionally "
                         "mu/sigma/mu_s/sigma_s) or another sample file")
    ev.add_argument("--features", choices=["fmnist", "inception"], default="fmnist",
                    help="feature network: the project's Fashion-MNIST classifier, or FID Inception-v3")
    ev.add_argument("--classifier", default=bundled("classifier"), help="fmnist classifier checkpoint directory "
                    "(default: the bundled one)")
    ev.add_argument("--inception-weights", help="local FID Inception-v3 weights (torch-fidelity's "
                                                "weights-inception-2015-12-05-6726825d.pth); default "
                                                "$CTFGEN_INCEPTION_WEIGHTS")
    ev.add_argument("--floor", action="store_true",
                    help="score --floor-n training images against --ref: the best a generator can reach")
    ev.add_argument("--reconstruction", nargs="?", const=bundled("tokenizer"), metavar="TOKENIZER",
                    help="score the tokenizer's reconstructions of --floor-n training images (default: the shipped "
                         "one): the floor of any generator over its tokens")
    number_flag(ev, "--floor-n", POSITIVE, default=10_000, help="training images of --floor and --reconstruction "
                    "(default %(default)s)")
    ev.add_argument("--data-dir", help="Fashion-MNIST IDX directory")
    number_flag(ev, "--k", POSITIVE, default=3, help="precision/recall neighbourhood size (default %(default)s)")
    number_flag(ev, "--pr-points", POSITIVE, default=10_000,
                    help="precision/recall on a fixed random subset of at most this many points per set")
    number_flag(ev, "--is-splits", POSITIVE, default=10, help="Inception Score: mean and std over this many parts")
    number_flag(ev, "--seed", SEED, default=0, help="subsets (precision/recall, IS parts, --floor images)")
    ev.add_argument("--per-class-fid", action=argparse.BooleanOptionalAction, default=None,
                    help="FID per class (default: when the features have at most 512 dimensions)")
    number_flag(ev, "--batch-size", POSITIVE, default=500, help="images per batch (default %(default)s)")
    ev.add_argument("--cache-dir", help="reference statistics cache (default $CTFGEN_CACHE or ~/.cache/ctfgen)")
    ev.add_argument("--no-cache", action="store_true", help="recompute the reference statistics, store nothing")
    add_device_flag(ev)
    add_json_flag(ev)
    ev.set_defaults(func=cmd_eval)

    subcommands = ev.add_subparsers(dest="eval_command", required=False, metavar="{train-classifier}")
    tc = subcommands.add_parser("train-classifier", help="train the Fashion-MNIST feature classifier (FID/IS "
                                                         "features)")
    add_dataclass_flags(tc, ClassifierTrainConfig, skip=("model",))
    add_dataclass_flags(tc, ClassifierConfig, skip=FIXED_MODEL_FIELDS)
    number_flag(tc, "--threads", POSITIVE, help="torch threads (default: torch's choice)")
    add_json_flag(tc)
    add_overwrite_flag(tc, "a classifier written by ctfgen")
    tc.set_defaults(func=cmd_eval_train_classifier)


def cmd_eval(args) -> None:
    from ctfgen.evaluation import EvalOptions, evaluate_floor, evaluate_npz, load_feature_network
    from ctfgen.training.distributed import pick_device

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
        from ctfgen.tokenizer.model import VQModel

        tokenizer = VQModel.from_pretrained(args.reconstruction, device=pick_device(args.device)).eval()
        result = evaluate_floor(network, n=args.floor_n, ref=args.ref, tokenizer=tokenizer, **common)
    elif args.floor:
        result = evaluate_floor(network, n=args.floor_n, ref=args.ref, **common)
    else:
        result = evaluate_npz(args.samples, args.ref, network, **common)
    if args.json:
        print_json(result)
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

    from ctfgen.checkpoint import is_checkpoint
    from ctfgen.evaluation.classifier import train_classifier

    check_output(args.out, flag="--out", what="a feature classifier", overwrite=args.overwrite,
                 is_ours=lambda path: is_checkpoint(path, CHECKPOINT_KIND))
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(ClassifierTrainConfig, args, model=config_from_args(ClassifierConfig, args),
                           progress=show_progress(args))
    result = train_classifier(cfg, command=" ".join(["ctfgen", *map(shlex.quote, args.argv)]))
    if args.json:
        print_json(result)
    else:
        print(f"wrote {result['out']}: test accuracy {result['test_accuracy']:.4f} "
              f"({result['parameters']} parameters, {result['train_seconds']:.0f}s)")
