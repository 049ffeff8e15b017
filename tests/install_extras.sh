#!/usr/bin/env bash
# What the test suite needs beyond `pip install -c constraints.txt -e ".[all]"`: packages that pip extras cannot
# express (special build flags, --no-deps installs, side environments). Run from the repository root inside the
# test venv; part of the README's test command, so CI runs it on every fresh clone. Idempotent: a second run only
# checks what is there. Every section says what it installs and which tests need it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import sys; sys.exit(0 if sys.prefix != sys.base_prefix else 'run this inside the test venv')"

# DeepSpeed (tests/integrations: the ZeRO-3 runs over gloo). Its sdist builds no ops with DS_BUILD_OPS=0 and
# needs torch at build time, so it is built without isolation against the venv's torch (an isolated build would
# resolve a fresh torch). The first ZeRO-3 run JIT-builds a small shm op with g++ and caches it.
if ! python -c "import deepspeed" >/dev/null 2>&1; then
    DS_BUILD_OPS=0 pip install -c constraints.txt --no-build-isolation "deepspeed==0.19.8"
fi

# axolotl (tests/integrations: the BonekernPlugin test drives axolotl's own PluginManager). Its requirements pin a
# different torch and a GPU stack, so it is installed without them; the plugin base class needs addict, trl and
# datasets, which the `trainers` extra and constraints.txt already bring.
if ! python -c "import axolotl.integrations.base" >/dev/null 2>&1; then
    pip install -c constraints.txt --no-deps "axolotl==0.19.0" "addict==2.4.0"
fi
