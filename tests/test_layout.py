"""The package's shape: the names a user needs at the top, loaded lazily so that `ctfgen --help` imports no torch;
modules that stay small."""

import subprocess
import sys
from pathlib import Path

import pytest

import ctfgen

SRC = Path(ctfgen.__file__).parent

# Every command's --help, in a fresh interpreter, and then which heavy modules came in.
HELP_WITHOUT_TORCH = """
import argparse, contextlib, io, sys
import ctfgen, ctfgen.cli

def helps(parser, argv):
    yield argv + ["--help"]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from helps(sub, argv + [name])

parser = ctfgen.cli.build_parser()
shown = 0
with contextlib.redirect_stdout(io.StringIO()):
    for argv in helps(parser, []):
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            shown += e.code == 0
print(shown, sorted(m for m in ("torch", "scipy", "safetensors", "gradio") if m in sys.modules))
"""


def test_help_of_every_command_imports_no_torch():
    run = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH], capture_output=True, text=True, check=True)
    shown, heavy = run.stdout.split(maxsplit=1)
    assert int(shown) >= 15 and heavy.strip() == "[]", run.stdout  # every command answered, none of them imported


def test_the_names_a_user_needs_are_at_the_top():
    from ctfgen import GPT, CtfgenError, CTFPipeline, Refiner, SamplingParams, SamplingRequest, VQModel
    from ctfgen.errors import CtfgenError as home_error
    from ctfgen.models.gpt import GPT as home_gpt
    from ctfgen.pipeline import CTFPipeline as home_pipeline
    from ctfgen.sampling.params import SamplingParams as home_params

    assert (CTFPipeline, SamplingParams, CtfgenError, GPT) == (home_pipeline, home_params, home_error, home_gpt)
    assert {"CTFPipeline", "SamplingParams", "SamplingRequest", "VQModel", "Refiner"} <= set(dir(ctfgen))
    assert SamplingRequest([0]).count == 1 and VQModel.__module__ == "ctfgen.tokenizer.model"
    assert Refiner.__module__ == "ctfgen.models.refiner"
    with pytest.raises(AttributeError, match="has no attribute 'Pipeline'"):
        ctfgen.Pipeline  # noqa: B018


def test_no_module_over_350_lines():
    long = {str(path.relative_to(SRC)): n for path in SRC.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > 350}
    assert not long
