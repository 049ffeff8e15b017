#!/usr/bin/env bash
# What the test suite needs beyond `pip install -c constraints.txt -e ".[all]"`: packages that pip extras cannot
# express (special build flags, --no-deps installs, side environments). Run from the repository root inside the
# test venv; part of the README's test command, so CI runs it on every fresh clone. Idempotent: a second run only
# checks what is there. Every section says what it installs and which tests need it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import sys; sys.exit(0 if sys.prefix != sys.base_prefix else 'run this inside the test venv')"
