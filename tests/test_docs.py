"""The documentation tells the truth about the repository: every table's figures equal those of the result file
its marker names, every quoted `ctfgen` command parses with the real CLI, every quoted script exists and takes
the flags it is given, and every link and quoted path leads somewhere."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from doc_checks import (
    NUMBER,
    REPO,
    commands,
    evaluate,
    heading_slugs,
    numbers,
    read_results,
    results_of,
    script_flags,
    shows,
    split_blocks,
    tables,
)

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "pretrained" / "fmnist" / "README.md"]
SHELL = ("bash", "sh", "shell", "console")
MAX_RESULT_BYTES = 64 * 1024
NAMED_RESULTS = {"docs/vocab_sweep.json"}  # result files outside docs/results/, where an issue asked for them
REPO_PATH = re.compile(r"^(?:scripts|benchmarks|experiments|tests|src|pretrained|docs)/[\w./-]*$")


def name(path: Path) -> str:
    return str(path.relative_to(REPO))


def parse_cli(args: list[str]) -> str | None:
    """None when `ctfgen ARGS` parses; else argparse's message."""
    from ctfgen.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(args)
    except SystemExit as e:
        return err.getvalue().strip() or f"exit {e.code}"
    return None


def known_flags(args: list[str]) -> str | None:
    """For a command named in running text (`ctfgen train --compile`): None when its subcommand exists and takes
    every flag given; required arguments may be left out."""
    from ctfgen.cli import build_parser

    parser, words = build_parser(), list(args)
    while words and not words[0].startswith("-") and parser._subparsers:  # noqa: SLF001 - argparse keeps them there
        choices = parser._subparsers._group_actions[0].choices  # noqa: SLF001
        if words[0] not in choices:
            return f"no command {words[0]!r}"
        parser = choices[words.pop(0)]
    unknown = sorted({w.split("=")[0] for w in words if w.startswith("-")} - set(parser._option_string_actions))
    return f"{parser.prog} takes no {', '.join(unknown)}" if unknown else None


def check_command(words: list[str], in_text: bool = False) -> str | None:
    """What is wrong with one quoted command, or None. ctfgen (also `-m ctfgen.cli` under python or torchrun) is
    parsed by its own parser (`in_text`: only its subcommand and flags are checked); a script must exist and name
    every flag it is given; other programs pass."""
    check_cli = known_flags if in_text else parse_cli
    program = Path(words[0]).name
    if "-m" in words and words[words.index("-m") + 1:][:1] == ["ctfgen.cli"]:
        return check_cli(words[words.index("-m") + 2:])
    if program == "ctfgen":
        return check_cli(words[1:])
    script = next((w for w in words[:2] if w.endswith((".py", ".sh")) and not w.startswith("-")), None)
    if script is None or not (program.startswith("python") or words[0] == script):
        return None
    if not (REPO / script).is_file():
        return f"{script} does not exist"
    unknown = sorted({w.split("=")[0] for w in words if w.startswith("--")} - script_flags(REPO / script))
    return f"{script} names no {', '.join(unknown)}" if unknown else None


COMMAND_LIKE = re.compile(r"(ctfgen|python|\.venv/bin/python|torchrun|scripts/|benchmarks/|experiments/)\S* ")


def quoted_shell(doc: Path) -> tuple[list[str], list[str]]:
    """The doc's shell blocks, and its inline code that starts like a command."""
    blocks, prose = split_blocks(doc.read_text())
    spans = re.findall(r"`([^`\n]+)`", prose)
    return [body for lang, body in blocks if lang in SHELL], [s for s in spans if COMMAND_LIKE.match(s)]


@pytest.mark.parametrize("doc", DOCS, ids=name)
def test_quoted_commands_run_as_written(doc):
    blocks, spans = quoted_shell(doc)
    quoted = [(c, False) for b in blocks for c in commands(b)] + [(c, True) for s in spans for c in commands(s)]
    problems = [f"{' '.join(c)}\n    -> {why}" for c, in_text in quoted if (why := check_command(c, in_text))]
    assert not problems, f"{name(doc)}: quoted commands that would not run:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=name)
def test_every_table_figure_equals_its_result_file(doc):
    """A table with figures (numbers outside its first column) has a results marker naming its files and, row by
    row, the entry behind each figure; each figure must be its entry rounded to the decimals it shows. A pending
    marker's table shows no figures, and its file must not exist yet (once it does, fill the table)."""
    text = doc.read_text()
    _, prose = split_blocks(text)
    written_by_a_command = "\n".join(text for d in DOCS for part in quoted_shell(d) for text in part)
    for table in tables(prose):
        where = f"{name(doc)}:{table.line}"
        figures = [[n for cell in row[1:] for n in numbers(cell)] for row in table.rows]
        if table.marker is None:
            assert not any(figures), f"{where}: a table with figures and no <!-- results: FILE ... --> marker"
            continue
        pending, files, spec = results_of(table.marker)
        for path in files:
            assert (path.startswith("docs/results/") or path in NAMED_RESULTS) and path.endswith(".json"), \
                f"{where}: {path} is not a result file"
            assert path in written_by_a_command, f"{where}: no quoted command writes {path}"
        if pending:
            assert not any(figures), f"{where}: a pending table shows figures"
            assert not any((REPO / p).exists() for p in files), f"{where}: {files} exist now: fill the table from them"
            continue
        for path in files:
            assert (REPO / path).stat().st_size <= MAX_RESULT_BYTES, f"{where}: {path} is not a small file"
        results = read_results(files)
        assert len(spec) == len(table.rows), f"{where}: {len(table.rows)} rows but {len(spec)} lines of entries"
        for row, shown, entries in zip(table.rows, figures, spec):
            assert len(shown) == len(entries), f"{where}: row {row[0]!r} shows {shown}, entries {entries}"
            for written, entry in zip(shown, entries):
                value = evaluate(results, entry)
                assert shows(written, value), f"{where}: row {row[0]!r} shows {written}, {entry} is {value!r}"


@pytest.mark.parametrize("doc", DOCS, ids=name)
def test_links_and_quoted_paths_exist(doc):
    text = doc.read_text()
    _, prose = split_blocks(text)
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            missing.append(target)
        elif anchor and path.suffix == ".md" and anchor not in heading_slugs(path.read_text()):
            missing.append(target)
    for span in re.findall(r"`([^`\n]+)`", prose):
        path = span.split()[0] if span.split() else ""
        if REPO_PATH.match(path) and not path.startswith("docs/results/") and not (REPO / path).exists():
            missing.append(path)
    assert not missing, f"{name(doc)}: links or paths that lead nowhere: {missing}"


def test_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail to docs/"


def test_result_files_are_small_json():
    """Every file under docs/results/, in sub-folders too (a study of many files, e.g. the vocabulary sweep's)."""
    for path in sorted(p for p in (REPO / "docs" / "results").rglob("*") if not p.is_dir()):
        assert path.suffix == ".json" and path.stat().st_size <= MAX_RESULT_BYTES, f"{name(path)}: not a small JSON"
        read_results([name(path)])


def test_python_examples_import_what_they_name():
    """The import lines of the docs' Python examples work (the rest needs data and time)."""
    for doc in DOCS:
        blocks, _ = split_blocks(doc.read_text())
        for lang, body in blocks:
            for line in body.splitlines() if lang == "python" else []:
                if re.match(r"(from ctfgen[\w.]* import |import ctfgen)", line):
                    exec(line, {})  # noqa: S102 - an import line from our own docs


def test_figures_checker_catches_a_wrong_figure():
    """The checker's own arithmetic: rounding to the decimals shown, ratios, factors, thousands separators."""
    results = {"r": {"a": 33.7528, "b": 45.0789, "n": [3546.2], "p": 0.9613}}
    assert shows("45.1", evaluate(results, "r.b")) and not shows("45.2", evaluate(results, "r.b"))
    assert shows("1.34", evaluate(results, "r.b/r.a")) and not shows("1.33", evaluate(results, "r.b/r.a"))
    assert shows("96.1", evaluate(results, "r.p*100")) and not shows("96.2", evaluate(results, "r.p*100"))
    assert shows("3,546", evaluate(results, "r.n.0")) and NUMBER.findall("3,546 (0.73)") == ["3,546", "0.73"]
