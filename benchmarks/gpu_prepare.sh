#!/usr/bin/env bash
# Prepare the GPU run (benchmarks/gpu_run.sh) on a machine with the package registry and without a GPU:
#
#   bash benchmarks/gpu_prepare.sh          # PYTHON=.venv/bin/python by default
#
# 1. benchmarks/gpu_wheels.sh: the wheels the GPU machine lacks in .whl/, the 88 MiB CuTe-DSL wheel in .gpu/big/;
# 2. benchmarks/gpu_data.py: the Debian documentation corpus and the wikitext file, tokenized, in .gpu/data/;
# 3. benchmarks/gpu_carry.py plan: the transfers of at most 64 MiB each (.gpu/call-*/, .gpu/calls.json), printed.
# Every output is under the git-ignored .whl/ and .gpu/.  Extra arguments go to gpu_data.py (e.g.
# --known-answer DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
PYTHON=$py bash benchmarks/gpu_wheels.sh
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} "$py" benchmarks/gpu_data.py "$@"
"$py" benchmarks/gpu_carry.py plan
