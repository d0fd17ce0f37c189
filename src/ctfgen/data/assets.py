"""Where the bundled assets live."""

from __future__ import annotations

import os
from pathlib import Path

REPO_PRETRAINED = Path(__file__).resolve().parents[3] / "pretrained"  # src/ctfgen/data/assets.py -> the repository


def pretrained_dir() -> Path:
    """Bundled assets: $CTFGEN_PRETRAINED, else the repository's pretrained/ folder."""
    return Path(os.environ.get("CTFGEN_PRETRAINED", REPO_PRETRAINED))
