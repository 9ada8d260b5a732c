#!/usr/bin/env bash
# Download, on a machine with the package registry, the wheels that benchmarks/gpu_run.sh installs on a GPU
# machine without one.  That machine (checked 2026-11) has Python 3.12 on x86-64 with torch 2.11 (CUDA 13),
# torchvision 0.26, numpy 2.5, transformers 5.x, tokenizers 0.23, safetensors 0.8, huggingface_hub 1.x, xxhash,
# einops, msgpack, ninja, psutil, py-cpuinfo, tqdm, PyYAML, tiktoken, matplotlib, cuda-bindings: none of those
# is downloaded (the run uses the machine's own).  Called by benchmarks/gpu_prepare.sh; on its own:
#
#   bash benchmarks/gpu_wheels.sh            # PYTHON=.venv/bin/python by default (its pip downloads)
#
# .whl/      what the run needs and the machine lacks (~22 MiB):
#            megatron-core; DeepSpeed (a source distribution: built here as a pure-Python wheel, no ops) with
#            pydantic, pydantic-core, annotated-types, typing-inspection, hjson; mosaicml-streaming (the data
#            loader of part 3) with what `import streaming` loads: brotli, python-snappy, cramjam, zstd (also the
#            project's shard codec), catalogue; flash-attn-4 with the small CuTe-DSL wheels, quack-kernels,
#            apache-tvm-ffi, torch-c-dlpack-ext
# .gpu/big/  nvidia-cutlass-dsl-libs-cu13, the CUDA 13 CuTe-DSL compiler (~88 MiB, more than one transfer):
#            benchmarks/gpu_carry.py splits it over the transfers
# Pins: pyproject.toml's (and its `gpu` extra's); the streaming needs at the versions the CPU tests run, except
# zstd: 1.5.7.2 has no cp312 wheel (a source distribution only), 1.5.6.1 has one and reads the same frames.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
download=("$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
          "${platforms[@]}")
rm -rf .whl .gpu/big
mkdir -p .whl .gpu/big
echo "== megatron-core, pydantic, hjson -> .whl/"
"${download[@]}" -d .whl megatron-core==0.16.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 hjson==3.1.0
echo "== DeepSpeed 0.19.8 (source distribution only: built as a pure-Python wheel, no ops) -> .whl/"
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
echo "== mosaicml-streaming 0.13.0 and what importing it needs -> .whl/"
"${download[@]}" -d .whl mosaicml-streaming==0.13.0 brotli==1.2.1 python-snappy==0.7.3 cramjam==2.14.0 \
  zstd==1.5.6.1 catalogue==2.0.10
echo "== flash-attn-4 and its CuTe-DSL wheels -> .whl/"
"${download[@]}" -d .whl flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5
echo "== nvidia-cutlass-dsl-libs-cu13 -> .gpu/big/"
"${download[@]}" -d .gpu/big nvidia-cutlass-dsl-libs-cu13==4.8.1
du -sh .whl .gpu/big
ls -l .whl .gpu/big
