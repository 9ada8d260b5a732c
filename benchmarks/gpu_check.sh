#!/usr/bin/env bash
# The one-command GPU check, run from the repository root on a machine with one CUDA GPU:
#
#   bash benchmarks/gpu_check.sh [gpu_check.py options]
#
# 1. installs wheels carried in .whl/ (packages that machine lacks: megatron-core, deepspeed, pydantic,
#    hjson, ...) into a private --target folder, with no index and no dependencies;
# 2. puts that folder and the checkout on PYTHONPATH (no `pip install -e` needed, no console scripts used);
# 3. prints the GPU and the versions, then runs benchmarks/gpu_check.py under a timeout, writing its JSON
#    files and its log to $OUT (default bench_out/gpu_check).
# Env: OUT (results), GPU_CHECK_SITE (install folder, default /tmp/site), GPU_CHECK_TIMEOUT (s, default 420).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out_dir=${OUT:-bench_out/gpu_check}
site=${GPU_CHECK_SITE:-/tmp/site}
mkdir -p "$out_dir"
shopt -s nullglob
wheels=(.whl/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  echo "== installing ${#wheels[@]} carried wheels into $site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "${wheels[@]}" || { echo "gpu_check.sh: installing .whl/*.whl failed" >&2; exit 3; }
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 DS_ACCELERATOR=${DS_ACCELERATOR:-cuda} WANDB_MODE=disabled HF_HUB_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

echo "== nvidia-smi"
nvidia-smi || echo "(nvidia-smi failed)"
echo "== versions"
python3 - <<'EOF'
import importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "triton", "numpy", "megatron-core", "deepspeed", "pydantic", "pydantic-core", "hjson",
             "typing-extensions", "transformers", "flash-attn"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} -")
import torch
print("cuda available", torch.cuda.is_available(), "| cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
EOF

echo "== benchmarks/gpu_check.py $*"
timeout --signal=TERM --kill-after=15 "${GPU_CHECK_TIMEOUT:-420}" \
  python3 benchmarks/gpu_check.py --out "$out_dir" "$@" 2>&1 | tee "$out_dir/gpu_check.log"
rc=${PIPESTATUS[0]}
echo "== gpu_check.py exit $rc; files in $out_dir:"
ls -la "$out_dir"
exit "$rc"
