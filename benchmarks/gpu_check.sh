#!/usr/bin/env bash
# The one-command GPU check, run from the repository root on a machine with one CUDA GPU:
#
#   bash benchmarks/gpu_check.sh [gpu_check.py options]      # the check (see benchmarks/gpu_check.py)
#   bash benchmarks/gpu_check.sh --stash-parts                # only keep carried wheel parts for a later run
#
# Prepared beforehand with benchmarks/gpu_wheels.sh on a machine with the package registry:
# .whl/*.whl (packages the GPU machine lacks: megatron-core, deepspeed, pydantic, hjson, flash-attn-4 and its
# CuTe-DSL wheels) and .gpu/parts/ (a wheel too large for one transfer, in parts + a sha256 manifest).
#
# 1. joins the wheel parts found in .gpu/parts/ and in the stash ($GPU_CHECK_STASH, default
#    /tmp/gpu_check_parts, where --stash-parts copied an earlier transfer's parts), checking every sha256
#    (a missing or damaged part is named; the check then runs without that wheel);
# 2. installs the wheels into a private --target folder, with no index and no dependencies, and puts it on
#    PYTHONPATH with the checkout and CuTe-DSL's package folder (what its .pth file does in a site-packages);
# 3. prints the GPU, the versions and whether flash_attn.cute imports, then runs benchmarks/gpu_check.py under a
#    timeout, writing its JSON files, table.txt and its log to $OUT (default bench_out/gpu_check).
# Env: OUT (results), GPU_CHECK_SITE (install folder, default /tmp/site), GPU_CHECK_TIMEOUT (s, default 480),
# PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
py=${PYTHON:-python3}
out_dir=${OUT:-bench_out/gpu_check}
site=${GPU_CHECK_SITE:-/tmp/site}
stash=${GPU_CHECK_STASH:-/tmp/gpu_check_parts}
shopt -s nullglob

if [ "${1:-}" = "--stash-parts" ]; then
  mkdir -p "$stash"
  parts=(.gpu/parts/*.part-* .gpu/parts/*.parts.json)
  [ ${#parts[@]} -gt 0 ] && cp "${parts[@]}" "$stash/"
  echo "== stashed ${#parts[@]} files in $stash:"
  ls -l "$stash"
  exit 0
fi

mkdir -p "$out_dir"
wheels=(.whl/*.whl)
manifests=(.gpu/parts/*.parts.json "$stash"/*.parts.json)
if [ ${#manifests[@]} -gt 0 ]; then
  echo "== joining wheel parts (.gpu/parts, $stash)"
  if "$py" benchmarks/wheel_parts.py join --from .gpu/parts "$stash" --to .gpu/joined; then
    wheels+=(.gpu/joined/*.whl)
  else   # the check still runs: flash-attn-4 then cannot import, and its rows and the log say so
    echo "gpu_check.sh: joining the wheel parts failed; continuing without them" >&2
  fi
fi
if [ ${#wheels[@]} -gt 0 ]; then
  echo "== installing ${#wheels[@]} wheels into $site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "${wheels[@]}" || { echo "gpu_check.sh: installing the carried wheels failed" >&2; exit 3; }
fi
export PYTHONPATH="$site:$site/nvidia_cutlass_dsl/dsl_packages:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 DS_ACCELERATOR=${DS_ACCELERATOR:-cuda} WANDB_MODE=disabled HF_HUB_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

echo "== nvidia-smi"
nvidia-smi || echo "(nvidia-smi failed)"
echo "== versions"
"$py" - <<'EOF'
import importlib.metadata as md, platform, sys, time
print("python", platform.python_version(), sys.executable)
for name in ("torch", "triton", "numpy", "megatron-core", "deepspeed", "pydantic", "pydantic-core", "hjson",
             "typing-extensions", "flash-attn-4", "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-cu13", "quack-kernels",
             "apache-tvm-ffi", "torch-c-dlpack-ext", "cuda-bindings", "einops", "protobuf"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} -")
import torch
print("cuda available", torch.cuda.is_available(), "| cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
start = time.perf_counter()
try:
    import flash_attn.cute
    print(f"flash_attn.cute imports ({time.perf_counter() - start:.1f} s): {flash_attn.cute.flash_attn_func}")
except Exception as exc:
    print(f"flash_attn.cute does not import: {type(exc).__name__}: {exc}")
EOF

echo "== benchmarks/gpu_check.py $*"
timeout --signal=TERM --kill-after=15 "${GPU_CHECK_TIMEOUT:-480}" \
  "$py" benchmarks/gpu_check.py --out "$out_dir" "$@" 2>&1 | tee "$out_dir/gpu_check.log"
rc=${PIPESTATUS[0]}
echo "== gpu_check.py exit $rc; files in $out_dir:"
ls -la "$out_dir"
exit "$rc"
