#!/usr/bin/env bash
# The README's test command: installs what the tests need, then runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
# The report test renders pages in Debian's headless Chromium.
if ! command -v chromium-headless-shell >/dev/null && ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium-headless-shell >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium-headless-shell >/dev/null
  fi
fi
python3 -m venv .venv
. .venv/bin/activate
pip install -q -e ".[test]"
# Two workers: most of a test's time is single-threaded XLA compilation, so
# the two cores run two tests at once (they share the compilation cache that
# tests/conftest.py sets up before the workers start).
python -m pytest -q -n 2 --durations=15 "$@"
