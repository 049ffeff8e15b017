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

# Triton 3.6 side venv (tests/triton/test_versions.py): the support matrix covers Triton 3.6.x (torch 2.10 / 2.11)
# as well as the main venv's 3.7.x, and CI proves it by running the interpreter suite and the AOT resource check
# under 3.6.0 in a plain venv (no system site packages) at .venv-triton36 (gitignored). torch comes from the same
# constraints (2.13.0, the pip wheel cache is reused), triton is pinned to 3.6.0 in place of constraints.txt's pin.
# numpy is pinned to 2.3.5 there because Triton 3.6's interpreter turns every runtime loop bound into an int with
# int() on a one-element array (triton/runtime/interpreter.py, tensor.__index__), which numpy 2.4 refuses; 3.7
# squeezes first. No kernel rewrite avoids it: any `range` over a runtime argument (K, M, ...) goes through it.
TRITON36_VENV=.venv-triton36
TRITON36_PINS=("triton==3.6.0" "numpy==2.3.5")
if ! "$TRITON36_VENV/bin/python" -c "import torch, triton, numpy, pytest, hypothesis, platformdirs, pytest_timeout
assert triton.__version__ == '3.6.0' and numpy.__version__ == '2.3.5'" >/dev/null 2>&1; then
    "$(python -c 'import sys; print(sys._base_executable)')" -m venv "$TRITON36_VENV"
    constraints="$(mktemp)"
    grep -v -E '^(triton|numpy)==' constraints.txt > "$constraints"
    printf '%s\n' "${TRITON36_PINS[@]}" >> "$constraints"
    "$TRITON36_VENV/bin/pip" install -q -c "$constraints" torch "${TRITON36_PINS[@]}" platformdirs \
        pytest hypothesis pytest-timeout
    rm -f "$constraints"
fi
