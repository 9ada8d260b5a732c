#!/usr/bin/env bash
# Prepare, on a machine with the package registry, the wheels that benchmarks/gpu_check.sh installs on a GPU
# machine without one (Python 3.12, x86-64, CUDA 13 build of torch already installed there):
#
#   bash benchmarks/gpu_wheels.sh            # PYTHON=.venv/bin/python by default (its pip downloads)
#
# .whl/        megatron-core, DeepSpeed (built as a wheel from its source distribution), pydantic and the
#              small packages they need, and flash-attn-4 with the CuTe-DSL wheels it needs (~20 MiB)
# .gpu/parts/  nvidia-cutlass-dsl-libs-cu13 (the CUDA 13 CuTe-DSL compiler, ~88 MiB) in parts of
#              $PART_MIB MiB (default 30) + a manifest with the sha256 of every part and of the wheel
# The packages the GPU machine already has (torch, einops, protobuf, cuda-bindings, typing-extensions, ...)
# are not downloaded.  Pins: pyproject.toml's and the `gpu` extra's.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
part_mib=${PART_MIB:-30}
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
download=("$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
          "${platforms[@]}")
rm -rf .whl .gpu/parts .gpu/big
mkdir -p .whl .gpu/parts .gpu/big
echo "== stack (megatron-core, pydantic, hjson) -> .whl/"
"${download[@]}" -d .whl megatron-core==0.16.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 hjson==3.1.0
echo "== DeepSpeed 0.19.8 (source distribution only: built as a pure-Python wheel, no ops) -> .whl/"
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
echo "== flash-attn-4 and its CuTe-DSL wheels -> .whl/"
"${download[@]}" -d .whl flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5
echo "== nvidia-cutlass-dsl-libs-cu13 -> .gpu/parts/ in ${part_mib} MiB parts"
"${download[@]}" -d .gpu/big nvidia-cutlass-dsl-libs-cu13==4.8.1
"$py" benchmarks/wheel_parts.py split .gpu/big/nvidia_cutlass_dsl_libs_cu13-*.whl --out-dir .gpu/parts \
  --part-mib "$part_mib"
rm -rf .gpu/big
echo "== prepared"
du -sh .whl .gpu/parts
ls -l .whl .gpu/parts
cat <<EOF
If one transfer to the GPU machine may carry at most ~64 MiB, carry the parts in two transfers, back to back
(files beside the checkout and in /tmp stay on that machine between them):
  1. .gpu/parts/*.part-00 and *.part-01, running: bash benchmarks/gpu_check.sh --stash-parts
  2. .whl, the remaining .gpu/parts/*.part-* and .gpu/parts/*.parts.json, running: bash benchmarks/gpu_check.sh
EOF
