"""The shape of the `ctfgen` command: every flag explained, the training flags made from their configs (so that a
default changed in one place shows in the other), the modules small, and the library deciding for it."""

import argparse
from pathlib import Path

import pytest

from ctfgen import cli
from ctfgen.backends.precision import PRECISIONS
from ctfgen.cli.common import config_from_args
from ctfgen.evaluation.classifier import ClassifierConfig, ClassifierTrainConfig
from ctfgen.models.config import GPT_PRESETS
from ctfgen.tokenizer.model import VQ_PRESETS
from ctfgen.tokenizer.train import TokenizerTrainConfig
from ctfgen.training.train import STAGES, TrainConfig

CLI_DIR = Path(cli.__file__).parent


def commands(parser, name="ctfgen"):
    """(name, parser) of the command and of every subcommand under it."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from commands(sub, f"{name} {sub_name}")


def test_every_command_and_flag_has_a_help_line():
    missing = []
    for name, parser in commands(cli.build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{name} {choice.dest}" for choice in action._choices_actions if not choice.help]
            elif not isinstance(action, argparse._HelpAction) and not (action.help or "").strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing


@pytest.mark.parametrize("argv,cls,required", [
    (["train"], TrainConfig, dict(stage="stage1", codes="c", out="o")),
    (["tokenizer", "train"], TokenizerTrainConfig, dict(out="o")),
    (["eval", "train-classifier"], ClassifierTrainConfig, dict(out="o")),
])
def test_training_flags_default_to_their_config_fields(argv, cls, required):
    given = [arg for key, value in required.items() for arg in (f"--{key}", value)]
    args = cli.build_parser().parse_args(argv + given)
    extra = {"model": config_from_args(ClassifierConfig, args)} if cls is ClassifierTrainConfig else {}
    assert config_from_args(cls, args, **extra) == cls(**required)  # every field, defaults included


def test_choices_are_the_librarys_constants():
    parser = cli.build_parser()
    flags = {name: {a.dest: a for a in p._actions} for name, p in commands(parser)}
    assert tuple(flags["ctfgen train"]["stage"].choices) == STAGES
    assert tuple(flags["ctfgen train"]["model"].choices) == tuple(GPT_PRESETS)
    assert tuple(flags["ctfgen train"]["precision"].choices) == PRECISIONS
    assert tuple(flags["ctfgen tokenizer train"]["model"].choices) == tuple(VQ_PRESETS)


def test_existing_flag_spellings_still_parse():
    args = cli.build_parser().parse_args(["train", "--stage", "baseline", "--codes", "c", "--out", "o", "--resume",
                                          "--fsdp", "--compile", "--no-progress", "--lr-schedule", "cosine"])
    assert args.resume and args.fsdp and args.compile and not args.progress and args.lr_schedule == "cosine"
    args = cli.build_parser().parse_args(["eval", "train-classifier", "--out", "o", "--no-flip", "--channels",
                                          "8,16"])
    assert not args.flip and args.channels == (8, 16)


def test_cli_modules_stay_small_and_leave_rank_and_config_files_to_the_library():
    for path in CLI_DIR.glob("*.py"):
        text = path.read_text()
        assert len(text.splitlines()) <= 300, path.name
        assert "RANK" not in text and "config.json" not in text, path.name
