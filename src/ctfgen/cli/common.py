"""What several commands share: flags made from a config dataclass, the data, tokenizer and pipeline flags,
--overwrite, progress and JSON output."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing

from ctfgen.choices import WEIGHT_DTYPES
from ctfgen.data.assets import pretrained_dir
from ctfgen.validation import IMAGE_SIZE, WHOLE, flag_name, rule_of


def bundled(*parts: str) -> str:
    """A path in the bundled Fashion-MNIST assets (the default of the flags that take one)."""
    return str(pretrained_dir().joinpath("fmnist", *parts))


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """A `--field-name` flag for each field of the dataclass `cls` but `skip`, with the field's type and rule (see
    ctfgen.validation.rule_of: a value it refuses is refused as the flag is read, naming the flag), default, choices
    (metadata["choices"]) and help line (metadata["help"]): the parser states none of them again. A field without a
    default is a required flag; a bool field is `--name` when it defaults to False, `--name/--no-name` when it
    defaults to True."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        flag, kind, text = flag_name(field.name), _value_type(hints[field.name]), field.metadata["help"]
        if kind is bool:
            if field.default:
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=True,
                                    help=f"{text} (default on)")
            else:
                parser.add_argument(flag, action="store_true", help=text)
            continue
        if field.default is dataclasses.MISSING:
            options = dict(required=True)
        else:
            options = dict(default=field.default)
            if isinstance(field.default, tuple):
                text += f" (default {','.join(map(str, field.default))})"
            elif field.default is not None:
                text += " (default %(default)s)"
        rule = rule_of(field, hints[field.name])
        parser.add_argument(flag, type=rule.flag_type(flag) if rule else _parser_of(kind, flag),
                            choices=field.metadata.get("choices"), help=text, **options)


def number_flag(parser: argparse.ArgumentParser, flag: str, rule, **options) -> None:
    """A flag whose value is a number that `rule` (the one the library checks it with) accepts, refused as it is
    read otherwise, naming the flag (see ctfgen.validation)."""
    parser.add_argument(flag, type=rule.flag_type(flag), **options)


def _value_type(annotation):
    """The type a flag's value takes: `int | None` takes an int (None is the default, "not given")."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return annotation


def _parser_of(kind, flag: str):
    """What turns a flag's text into a value of `kind`: the type itself, or for tuple[int, ...] comma-separated
    whole numbers."""
    if typing.get_origin(kind) is not tuple:
        return kind
    whole_number = WHOLE.flag_type(flag)

    def comma_separated(text: str) -> tuple:
        return tuple(whole_number(part) for part in text.split(","))

    return comma_separated


def config_from_args(cls: type, args: argparse.Namespace, **values):
    """`cls` from the flags that `add_dataclass_flags` made for its fields, and `values` besides."""
    given = {field.name: getattr(args, field.name) for field in dataclasses.fields(cls) if hasattr(args, field.name)}
    return cls(**given | values)


def add_data_flags(parser: argparse.ArgumentParser, skip_bad: bool = True) -> None:
    """--data and its options; `skip_bad`: --skip-bad-images too (for commands that can do without an image)."""
    parser.add_argument("--data", default="fmnist", help="'fmnist' (bundled) or an image folder in ImageNet layout")
    parser.add_argument("--data-dir", help="Fashion-MNIST IDX directory (default $CTFGEN_DATA or "
                                           "/usr/share/datasets/fashion-mnist)")
    number_flag(parser, "--image-size", IMAGE_SIZE, default=256, help="resize/crop size for image folders "
                "(default %(default)s)")
    if skip_bad:
        parser.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images with a warning")


def add_tokenizer_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", default=bundled("tokenizer"),
                        help="tokenizer checkpoint directory (default: the bundled Fashion-MNIST one)")


def add_pipeline_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", default=bundled(), help="pipeline directory, as `ctfgen assemble` writes it "
                        "(default: the bundled Fashion-MNIST one)")


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")


def add_overwrite_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true", help=f"replace the output when it holds {what}; "
                        "anything else is never replaced")


def add_weights_dtype_flag(parser: argparse.ArgumentParser) -> None:
    """--dtype of the weights a command writes (export, assemble): as they are stored, unless a cast is asked for."""
    parser.add_argument("--dtype", choices=WEIGHT_DTYPES, help="cast the floating-point weights to this, e.g. fp16 "
                        "to ship (a cast that rounds says so); default: as they are stored, nothing lost")


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars only on a terminal: in a log file or a pipe they would bury an error's one line."""
    return args.progress and sys.stderr.isatty()


def load_tokenizer_and_data(args: argparse.Namespace, split: str):
    """The --tokenizer model and a split of the --data dataset, as the tokenizer studies take them."""
    from ctfgen.data.datasets import load_dataset
    from ctfgen.tokenizer.model import VQModel
    from ctfgen.training.distributed import pick_device

    model = VQModel.from_pretrained(args.tokenizer, device=pick_device(args.device))
    dataset = load_dataset(args.data, split, data_dir=args.data_dir, image_size=args.image_size,
                           skip_bad=args.skip_bad_images)
    return model, dataset
