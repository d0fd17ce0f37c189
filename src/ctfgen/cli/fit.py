"""`ctfgen fit`: from a folder of images (or the bundled Fashion-MNIST) to a trained, evaluated pipeline."""

from __future__ import annotations

import argparse
import shlex

from ctfgen.cli.common import add_device_flag, number_flag, show_progress
from ctfgen.validation import IMAGE_SIZE, POSITIVE

PRESET_NAMES = ("tiny", "small", "base")  # ctfgen.fit.presets.PRESETS (named here: --help imports no torch)


def register(commands) -> None:
    parser = commands.add_parser(
        "fit", help="one command from a folder of images to a trained, evaluated pipeline (resumable)",
        description="Train the tokenizer (or reuse one), cluster its codewords, extract the token grids, train "
                    "stage 1, stage 2 and the baseline, assemble DIR/pipeline and evaluate it (DIR/report.md). "
                    "Running the same command again skips what is done and resumes an interrupted training; a "
                    "changed option redoes the steps it reaches. Every choice is written to DIR/fit.json.")
    parser.add_argument("--data", required=True, help="'fmnist' (bundled) or an image folder with one sub-folder per "
                        "class (train/ and val/ when present; else a seeded share of each class is held out)")
    parser.add_argument("--out", required=True, help="the fit's folder: new, empty, or an earlier fit's")
    parser.add_argument("--preset", choices=PRESET_NAMES, default="small",
                        help="tiny: a test (minutes on 2 cores); small: a few thousand images on a CPU (the shipped "
                             "Fashion-MNIST sizes and schedule); base: GPUs (LlamaGen-B sizes) (default %(default)s)")
    parser.add_argument("--tokenizer", help="reuse this tokenizer checkpoint directory (e.g. the shipped one) "
                                            "instead of training one")
    number_flag(parser, "--k", POSITIVE, help="clusters of codewords (default: codewords / 32; tiny: / 8)")
    number_flag(parser, "--image-size", IMAGE_SIZE, help="crop size for image folders (default: the preset's)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the plain AR baseline (trained by default, for comparison)")
    parser.add_argument("--config", help="a TOML file overriding any key of fit.json's config (the flags above "
                                         "win over it)")
    parser.add_argument("--inception-weights", help="local FID Inception-v3 weights (torch-fidelity's "
                        "weights-inception-2015-12-05-6726825d.pth): FID for any images")
    add_device_flag(parser)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="progress bars on a terminal; in a log, a line at every tenth of each training either "
                             "way (default on)")
    parser.set_defaults(func=cmd_fit)


def cmd_fit(args) -> None:
    from ctfgen.fit.presets import read_toml
    from ctfgen.fit.runner import FitRequest, fit

    overrides = read_toml(args.config) if args.config else {}
    overrides |= {key: value for key, value in (("k", args.k), ("image_size", args.image_size)) if value is not None}
    if not args.baseline:
        overrides["baseline"] = False
    fit(FitRequest(data=args.data, out=args.out, preset=args.preset, tokenizer=args.tokenizer, overrides=overrides,
                   inception_weights=args.inception_weights, device=args.device, progress=show_progress(args),
                   command=shlex.join(["ctfgen", *args.argv])))
