#!/usr/bin/env bash
# Set up a fresh machine: Fashion-MNIST from Debian, a virtualenv with the CPU build of PyTorch, ctfgen.
# --test (scripts/test.sh passes it): also what the test suite needs beyond that, so that every test runs: Debian's
# Chromium (the web demo's browser tests) and torch-fidelity (the FID Inception-v3 tests). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
for_tests=
for arg in "$@"; do
  case "$arg" in
    --test) for_tests=1 ;;
    *) echo "usage: scripts/setup.sh [--test]" >&2; exit 2 ;;
  esac
done

packages=()
[ -d /usr/share/datasets/fashion-mnist ] || [ -n "${CTFGEN_DATA:-}" ] || packages+=(dataset-fashion-mnist)
[ -z "$for_tests" ] || [ -x /usr/bin/chromium ] || packages+=(chromium)  # driven by Playwright in tests/test_serve.py
if [ ${#packages[@]} -gt 0 ]; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"
fi

[ -d .venv ] || python3 -m venv .venv
# pip takes seconds even with nothing to do: it is skipped while this script and pyproject.toml are unchanged since
# it last succeeded here (.venv/setup-stamp) and every module below is found.
key="$(cat scripts/setup.sh pyproject.toml | sha256sum | cut -d' ' -f1)${for_tests:+ test}"
modules="ctfgen torch gradio pytest${for_tests:+ playwright torch_fidelity}"
if ! grep -qxF -e "$key" -e "$key test" .venv/setup-stamp 2>/dev/null || ! .venv/bin/python -c \
    'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))' $modules; then
  .venv/bin/pip install -q torch==2.13.0   # the CPU wheel; a bare `torch` may pull a multi-GB CUDA build
  .venv/bin/pip install -q -e ".[test,web]"  # web: the demo (ctfgen serve), tested in the suite
  if [ -n "$for_tests" ]; then
    # torch-fidelity declares torchvision, which pip may answer with another torch build; ctfgen and its tests use
    # only its Inception-v3 and metric modules (pyproject.toml, the inception extra), hence --no-deps.
    .venv/bin/pip install -q --no-deps torch-fidelity==0.4.0
  fi
  echo "$key" > .venv/setup-stamp
fi
