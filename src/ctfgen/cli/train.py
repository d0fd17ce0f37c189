"""`ctfgen train` (the transformers) and `ctfgen tokenizer train`: their flags are their configs' fields."""

from __future__ import annotations

from ctfgen.cli.common import add_dataclass_flags, config_from_args, show_progress
from ctfgen.errors import check_finished
from ctfgen.tokenizer.config import TokenizerTrainConfig
from ctfgen.training.config import TrainConfig

RESUME = "the same command with --resume continues it"


def register(commands) -> None:
    parser = commands.add_parser("train", help="train the baseline GPT, the stage-1 GPT or the stage-2 refiner "
                                               "(single process, or DDP / FSDP2 under torchrun)")
    add_dataclass_flags(parser, TrainConfig)
    parser.set_defaults(func=cmd_train)


def register_tokenizer_train(tokenizer_commands) -> None:
    parser = tokenizer_commands.add_parser("train", help="train a VQ tokenizer (single process or under torchrun)")
    add_dataclass_flags(parser, TokenizerTrainConfig)
    parser.set_defaults(func=cmd_tokenizer_train)


def cmd_train(args) -> None:
    from ctfgen.training.train import train

    cfg = config_from_args(TrainConfig, args, progress=show_progress(args))
    result = train(cfg)
    if result is not None:  # the main process reports
        extra = "".join(f", {k} {result[k]:.4f}" for k in ("loss", "eval_loss", "eval_acc") if k in result)
        print(f"checkpoint: {result['checkpoint']} (step {result['step']}{extra})")
        check_finished(f"the {cfg.stage} training", result["step"], cfg.steps, RESUME)


def cmd_tokenizer_train(args) -> None:
    from ctfgen.tokenizer.train import train_tokenizer

    cfg = config_from_args(TokenizerTrainConfig, args, progress=show_progress(args))
    result = train_tokenizer(cfg)
    if result is not None:  # the main process reports
        print(f"checkpoint: {result['checkpoint']} (step {result['step']})")
        check_finished("the tokenizer's training", result["step"], cfg.steps, RESUME)
