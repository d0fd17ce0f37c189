"""Reading the documentation for tests/test_docs.py: code blocks, tables with their result markers, quoted shell
commands split into argument lists, and figures looked up in result files. No ctfgen import here."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"<!--\s*results:(.*?)-->", re.S)
NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")
SEPARATORS = {"|", "||", "&&", ";", "&", "(", ")"}
REDIRECTIONS = {">", ">>", "<", ">&", "&>"}


@dataclass
class Table:
    line: int           # 1-based line of the header row
    marker: str | None  # the text inside <!-- results: ... -->, or None
    rows: list          # body rows, each a list of cells


def split_blocks(text: str) -> tuple[list[tuple[str, str]], str]:
    """The fenced code blocks as (language, body), and the text with every block blanked out (line count kept)."""
    blocks, prose, lang, body = [], [], None, []
    for line in text.splitlines():
        fence = FENCE.match(line.strip())
        if fence and lang is None:
            lang, body = fence.group(1), []
        elif line.strip() == "```" and lang is not None:
            blocks.append((lang, "\n".join(body)))
            lang = None
        elif lang is not None:
            body.append(line)
        prose.append("" if lang is not None or fence else line)
    return blocks, "\n".join(prose)


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def tables(prose: str) -> list[Table]:
    """Every markdown table outside code blocks, with the results marker that ends right above it (blank lines
    between are allowed)."""
    lines, found, i = prose.splitlines(), [], 0
    while i < len(lines):
        if not lines[i].lstrip().startswith("|"):
            i += 1
            continue
        start = i
        while i < len(lines) and lines[i].lstrip().startswith("|"):
            i += 1
        above = "\n".join(lines[:start]).rstrip()
        marker = MARKER.search(above[above.rfind("<!--"):]) if above.endswith("-->") else None
        found.append(Table(start + 1, marker.group(1) if marker else None, [cells(r) for r in lines[start + 2:i]]))
    return found


def numbers(cell: str) -> list[str]:
    """The figures a cell shows, as written ("3,546 (0.73)" -> ["3,546", "0.73"])."""
    return NUMBER.findall(cell.replace("**", ""))


def lookup(results: dict, path: str):
    """`stem.key.0.key` in the result files read so far, keyed by file stem; a key with dots in it
    (`stage2_oracle_t0.5`) is read whole: the longest run of parts that is a key wins."""
    stem, *keys = path.split(".")
    value = results[stem]
    while keys:
        if isinstance(value, list):
            value = value[int(keys.pop(0))]
            continue
        n = next((n for n in range(len(keys), 0, -1) if ".".join(keys[:n]) in value), 1)
        value, keys = value[".".join(keys[:n])], keys[n:]
    return float(value)


def evaluate(results: dict, term: str) -> float:
    """A cell's entry: `path`, `path/path` (a ratio), either followed by `*factor` (units, percent)."""
    term, _, factor = term.partition("*")
    top, _, bottom = term.partition("/")
    value = lookup(results, top) / (lookup(results, bottom) if bottom else 1.0)
    return value * float(factor or 1)


def shows(written: str, value: float) -> bool:
    """Whether `written` is `value` rounded to the decimals it shows."""
    decimals = len(written.partition(".")[2])
    return abs(float(written.replace(",", "")) - value) <= 0.5 * 10 ** -decimals * (1 + 1e-9)


def logical_lines(block: str) -> list[str]:
    """A shell block's commands: continuation lines joined, and lines joined while a quote is open."""
    out, pending = [], ""
    for line in block.splitlines():
        pending = f"{pending}\n{line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        out.append(pending)
        pending = ""
    return out + ([pending] if pending else [])


def commands(block: str) -> list[list[str]]:
    """The simple commands of a shell block as argument lists: variables assigned in the block expanded,
    pipelines, lists and redirections split off, leading `VAR=value` assignments dropped."""
    variables, found = {}, []
    for line in logical_lines(block):
        for name, value in variables.items():
            line = re.sub(rf"\$(?:{name}\b|\{{{name}\}})", value, line)
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        words, current = list(lexer), []
        for word in words + [";"]:
            if word in SEPARATORS:
                if len(current) == 1 and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", current[0]):
                    name, _, value = current[0].partition("=")
                    variables[name] = value
                while current and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", current[0]):
                    current.pop(0)
                if current:
                    found.append(current)
                current = []
            elif current and current[-1] in REDIRECTIONS:
                current.pop()  # the redirection and its target
            else:
                current.append(word)
    return found


def results_of(marker: str) -> tuple[bool, list[str], list[list[str]]]:
    """A marker's parts: pending or not, the result files it names, and one list of cell entries per row."""
    head, *spec = [line.split() for line in marker.strip().splitlines()]
    pending = head[:1] == ["pending"]
    return pending, head[1:] if pending else head, [line for line in spec if line]


def read_results(paths: list[str]) -> dict:
    return {Path(p).stem: json.loads((REPO / p).read_text()) for p in paths}


def script_flags(script: Path) -> set[str]:
    """The `--flags` a script's source names (argparse's add_argument strings; for a shell script, those of the
    Python scripts it runs too)."""
    text = script.read_text()
    sources = [text] + [(REPO / p).read_text() for p in re.findall(r"[\w/]+\.py", text) if (REPO / p).is_file()]
    return {flag for source in sources for flag in re.findall(r"""["'\s](--[a-z][a-z0-9-]*)""", source)}


def heading_slugs(text: str) -> set[str]:
    """GitHub's anchors of a markdown file's headings."""
    _, prose = split_blocks(text)
    heads = re.findall(r"^#+\s+(.*)$", prose, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}
