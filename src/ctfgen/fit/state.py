"""DIR/fit.json: what a fit was asked, what it chose, and which steps it has finished.

    {"format": "ctfgen-fit-v1", "command": "ctfgen fit ...", "preset": "tiny", "data": {...}, "config": {...},
     "steps": {"tokenizer": {"fingerprint": "...", "inputs": {...}, "state": "done", "seconds": 12.3,
                             "result": {...}}, ...}}

A step's fingerprint covers its options and the fingerprints of the steps it reads, so that a change reaches every
step after it. "started" marks a step whose work in progress (a training run to resume) belongs to that fingerprint:
it is recorded only after another fingerprint's work has been removed. Every write is atomic: a kill leaves the
previous fit.json or the next one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from ctfgen.errors import CtfgenError
from ctfgen.files import write_atomic
from ctfgen.validation import check_destination, check_writable_place

FORMAT = "ctfgen-fit-v1"
FIT_JSON = "fit.json"


def fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _read(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def is_fit_dir(directory) -> bool:
    return _read(Path(directory) / FIT_JSON) is not None


class FitState:
    """fit.json of the folder `out`: read once, rewritten (by the main process) at each change."""

    def __init__(self, out: Path, record: dict):
        self.out, self.record = out, record

    @classmethod
    def open(cls, out) -> FitState:
        """The state of the fit in `out`; a new one for a new or empty folder. Any other folder is refused."""
        out = Path(out)
        check_destination(out, directory=True)
        check_writable_place(out)
        record = _read(out / FIT_JSON)
        if record is None and out.exists() and any(out.iterdir()):
            if (out / FIT_JSON).exists():
                raise CtfgenError(f"{out / FIT_JSON} is damaged or not ctfgen's; remove it to start the fit afresh")
            raise CtfgenError(f"--out {out} is not empty and holds no ctfgen fit ({FIT_JSON}); choose a new or empty "
                              f"folder")
        record = record or {"format": FORMAT}
        if not isinstance(record.get("steps"), dict):
            record["steps"] = {}
        return cls(out, record)

    def step(self, name: str) -> dict | None:
        entry = self.record["steps"].get(name)
        return entry if isinstance(entry, dict) else None

    def begin(self, **fields) -> None:
        """Record this run's command, preset, data and choices (the steps' records stay)."""
        self.record |= fields
        self.save()

    def started(self, name: str, fp: str, inputs: dict) -> None:
        self.record["steps"][name] = {"fingerprint": fp, "inputs": inputs, "state": "started"}
        self.save()

    def done(self, name: str, fp: str, inputs: dict, seconds: float, result: dict, resumed: bool = False) -> None:
        """A finished step; `seconds`: this run's time, only the last part of a `resumed` one."""
        self.record["steps"][name] = {"fingerprint": fp, "inputs": inputs, "state": "done",
                                      "seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                      "result": result} | ({"resumed": True} if resumed else {})
        self.save()

    def save(self) -> None:
        text = json.dumps(self.record, indent=2) + "\n"
        write_atomic(self.out / FIT_JSON, lambda tmp: Path(tmp).write_text(text))
