"""Validation speaks one language (issue 23): one set of rules (ctfgen.validation's Whole and Real) for configs,
command-line flags and the API, and one answer to "is 3.0 a whole number?" at every door: yes, 3."""

import dataclasses
import json
import math
import typing

import pytest
import tomllib

from ctfgen import cli
from ctfgen.errors import CtfgenError
from ctfgen.evaluation.classifier import ClassifierConfig, ClassifierTrainConfig
from ctfgen.models.config import GPTConfig
from ctfgen.sampling.params import SamplingParams, whole_number
from ctfgen.tokenizer.model import VQConfig
from ctfgen.tokenizer.train import TokenizerTrainConfig
from ctfgen.training.train import TrainConfig
from ctfgen.validation import POSITIVE, Real, Whole, config_from_dict, rule_of
from test_cli import commands

TRAIN = ["train", "--stage", "stage1", "--codes", "c", "--out", "o"]


def through_python(value):
    return TrainConfig(stage="stage1", codes="c", out="o", steps=value).steps


def through_json(value):
    return config_from_dict(VQConfig, json.loads(json.dumps({"num_res_blocks": value})), "config.json").num_res_blocks


def through_toml(value):
    return ClassifierTrainConfig(out="o", **tomllib.loads(f"epochs = {value}")).epochs


def through_the_api(value):
    return whole_number(value, "per_class", minimum=1)


def through_sampling_params(value):
    return SamplingParams(top_k=value).top_k


def through_a_flag(value):
    return cli.build_parser().parse_args(TRAIN + ["--steps", str(value)]).steps


DOORS = [through_python, through_json, through_toml, through_the_api, through_sampling_params, through_a_flag]


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("value", [3, 3.0, "3e0"])
def test_three_is_three_at_every_door(door, value):
    if value == "3e0" and door not in (through_toml, through_a_flag):
        value = 3e0  # a spelling only text has; elsewhere the float it spells
    got = door(value)
    assert got == 3 and type(got) is int


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("value", [3.5, "nan", "inf"])
def test_a_fraction_or_no_finite_number_is_refused_at_every_door(door, value):
    if door not in (through_toml, through_a_flag) and isinstance(value, str):
        value = float(value)
    with pytest.raises(CtfgenError, match=r"(steps|num_res_blocks|epochs|per_class|top_k) must be a whole number"):
        door(value)


def test_text_and_booleans_are_not_numbers_outside_the_command_line():
    for value in ("3", True):
        with pytest.raises(CtfgenError, match="must be a whole number"):
            through_python(value)
    with pytest.raises(CtfgenError, match="--steps must be a whole number, got 'three'"):
        through_a_flag("three")


def test_configs_read_from_files_store_whole_numbers_as_ints():
    config = config_from_dict(GPTConfig, {"dim": 256.0, "n_head": 4.0, "rope_base": 10000}, "config.json")
    assert (config.dim, config.n_head) == (256, 4) and type(config.dim) is int
    assert config.rope_base == 10000.0 and type(config.rope_base) is float


CONFIG_COMMANDS = [
    ("ctfgen train", TrainConfig, dict(stage="stage1", codes="c", out="o")),
    ("ctfgen tokenizer train", TokenizerTrainConfig, dict(out="o")),
    ("ctfgen eval train-classifier", ClassifierTrainConfig, dict(out="o")),
    ("ctfgen eval train-classifier", ClassifierConfig, dict()),
]


def below(rule) -> float:
    """A value the rule refuses for being too small or too large."""
    if rule.low is not None:
        return rule.low - 1
    return rule.high + 1


@pytest.mark.parametrize("command,cls,required", CONFIG_COMMANDS, ids=[c.__name__ for _, c, _ in CONFIG_COMMANDS])
def test_flags_refuse_what_their_config_field_refuses_in_the_same_words(command, cls, required):
    """Each flag made from a config field is read by the field's own rule: the value the config refuses, the flag
    refuses as it is read, with the same words, naming the flag instead of the field."""
    parser = dict(commands(cli.build_parser()))[command]
    flags = {action.dest: action for action in parser._actions}
    hints = typing.get_type_hints(cls)
    checked = 0
    for field in dataclasses.fields(cls):
        name, rule = field.name, rule_of(field, hints[field.name])
        if name not in flags or rule is None or (rule.low is None and rule.high is None):
            continue
        bad = below(rule)
        with pytest.raises(CtfgenError) as refused_by_config:
            cls(**required, **{name: bad})
        flag = "--" + name.replace("_", "-")
        with pytest.raises(CtfgenError) as refused_by_flag:
            flags[name].type(str(bad))
        assert str(refused_by_flag.value) == str(refused_by_config.value).replace(name, flag, 1)
        checked += 1
    assert checked  # not a vacuous loop


def test_every_number_flag_reads_its_text_by_a_rule():
    """No flag is a bare int or float: those would refuse "3.0" (int) or leave the range to a check elsewhere."""
    bare = [f"{name} {'/'.join(action.option_strings)}" for name, parser in commands(cli.build_parser())
            for action in parser._actions if action.type in (int, float)]
    assert not bare


def test_rules_say_what_is_wrong():
    assert POSITIVE.problem(0) == "must be at least 1"
    assert Whole(0, 255).problem(256) == "must be between 0 and 255"
    assert Real(0, 1, low_open=True).problem(0.0) == "must be in (0, 1]"
    assert Real(0, low_open=True).problem(-1) == "must be > 0" and Real(1).problem(0.5) == "must be >= 1"
    assert Whole().problem(2**70) is None and Whole().problem(math.inf) == "must be a whole number"
    with pytest.raises(CtfgenError, match="^--n must be at least 1, got 0$"):
        POSITIVE.flag_type("--n")("0")
    assert isinstance(POSITIVE.flag_type("--n")("1e3"), int)


def test_a_flag_value_refused_ends_as_one_line(capsys):
    assert cli.main(TRAIN + ["--grad-accum", "2.5"]) == 2
    err = capsys.readouterr().err
    assert err == "ctfgen: error: --grad-accum must be a whole number, got 2.5\n"
