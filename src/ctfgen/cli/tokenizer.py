"""`ctfgen tokenizer train | eval | reconstruct`."""

from __future__ import annotations

from ctfgen.cli.common import (
    add_data_flags,
    add_device_flag,
    add_json_flag,
    add_overwrite_flag,
    add_tokenizer_flag,
    load_tokenizer_and_data,
    number_flag,
    print_json,
)
from ctfgen.cli.train import register_tokenizer_train
from ctfgen.validation import NON_NEGATIVE, POSITIVE, check_output


def register(commands) -> None:
    tokenizer = commands.add_parser("tokenizer", help="train and evaluate the VQ tokenizer")
    subcommands = tokenizer.add_subparsers(dest="tokenizer_command", required=True)
    register_tokenizer_train(subcommands)

    evaluate = subcommands.add_parser("eval", help="PSNR and codebook usage on a split")
    _add_study_flags(evaluate)
    number_flag(evaluate, "--batch-size", POSITIVE, default=500, help="images per batch (default %(default)s)")
    number_flag(evaluate, "--limit", POSITIVE, help="only the first N images")
    number_flag(evaluate, "--num-workers", NON_NEGATIVE, default=0, help="data loading processes (default %(default)s: "
                          "in this process)")
    add_json_flag(evaluate)
    evaluate.set_defaults(func=cmd_tokenizer_eval)

    reconstruct = subcommands.add_parser("reconstruct", help="originals vs reconstructions PNG")
    _add_study_flags(reconstruct)
    reconstruct.add_argument("--out", default="reconstructions.png", help="the PNG to write (default %(default)s)")
    number_flag(reconstruct, "--n", POSITIVE, default=32, help="images (default %(default)s)")
    number_flag(reconstruct, "--columns", POSITIVE, default=8, help="pairs per row (default %(default)s)")
    add_overwrite_flag(reconstruct, "a PNG written by ctfgen")
    reconstruct.set_defaults(func=cmd_tokenizer_reconstruct)


def _add_study_flags(parser) -> None:
    add_tokenizer_flag(parser)
    parser.add_argument("--split", default="test", help="the data split (default %(default)s)")
    add_data_flags(parser)
    add_device_flag(parser)


def cmd_tokenizer_eval(args) -> None:
    from ctfgen.tokenizer.evaluate import evaluate_tokenizer

    model, dataset = load_tokenizer_and_data(args, args.split)
    result = evaluate_tokenizer(model, dataset, batch_size=args.batch_size, limit=args.limit,
                                num_workers=args.num_workers)
    result |= {"split": args.split, "tokenizer": str(args.tokenizer)}
    if args.json:
        print_json(result)
    else:
        print(f"PSNR {result['psnr']:.2f} dB over {result['n_images']} images; codebook usage "
              f"{result['codebook_usage']:.1%} ({result['codes_used']}/{result['codebook_size']})")


def cmd_tokenizer_reconstruct(args) -> None:
    from ctfgen.data.images import is_ctfgen_png, make_grid, save_png
    from ctfgen.tokenizer.evaluate import reconstruction_pairs

    check_output(args.out, flag="--out", what="a PNG written by ctfgen", is_ours=is_ctfgen_png,
                 overwrite=args.overwrite, directory=False)
    model, dataset = load_tokenizer_and_data(args, args.split)
    pairs = reconstruction_pairs(model, dataset, args.n)
    print(f"wrote {save_png(make_grid(pairs, ncol=2 * min(args.columns, args.n)), args.out)} "
          f"(original | reconstruction pairs)")
