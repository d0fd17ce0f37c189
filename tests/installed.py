"""What some tests need beyond the package's own dependencies (Chromium, torch-fidelity), and one rule for when it
is missing: the test skips, saying what is missing and the command that installs it; in CI (CI set), which runs
scripts/test.sh and so installs all of it, the test fails instead, so that no test goes unrun unnoticed."""

import os

import pytest

SETUP = "scripts/setup.sh --test"  # what scripts/test.sh runs first


def require(missing: list[str], what: str) -> None:
    """Skip (in CI: fail) unless `missing`, the things `what` needs that are not installed, is empty."""
    if not missing:
        return
    message = f"{what} need {', '.join(missing)}: run {SETUP} (scripts/test.sh does)"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI installs it and runs every test", pytrace=False)
    pytest.skip(message)
