#!/usr/bin/env bash
# The one GPU run, from the repository root on a machine with one CUDA GPU and no package registry:
#
#   bash benchmarks/gpu_run.sh [--parts check,learning] [--ladder] [--known-answer DIR] [--dry-run]
#   bash benchmarks/gpu_run.sh --stash        # an earlier transfer: keep its carried parts for the run
#
# Prepared beforehand by `bash benchmarks/gpu_prepare.sh` on a machine with the registry (the wheels the GPU
# machine lacks in .whl/, the prepared data in .gpu/data/, the large CuTe-DSL wheel in parts in .gpu/call-*/,
# and the transfers to make in .gpu/calls.json).  Steps:
# 1. joins the wheel parts found in .gpu/call-*/ and in the stash ($GPU_STASH, where --stash copied an earlier
#    transfer's), checking every part's and the joined wheel's sha256 (a missing or damaged part is named; the
#    run then goes on without that wheel: flash-attn-4 cannot import and its rows say so);
# 2. installs every wheel into a private --target folder (no index, no dependencies) and puts it on PYTHONPATH
#    with the checkout and CuTe-DSL's package folder (what its .pth file does in a site-packages);
# 3. prints the GPU, the versions and whether megatron-core, DeepSpeed, streaming and flash_attn.cute import;
# 4. part `check` (benchmarks/gpu_check.py) under $CHECK_TIMEOUT s, then part `learning`
#    (benchmarks/learning_gpu.py) under $LEARNING_TIMEOUT s; each writes its JSON as it goes, so a part cut off
#    by its timeout keeps what it measured, and a failed part does not stop the next.
# Results in $OUT (default bench_out/gpu_run), KIND = h100 | h200 from the device's name (cpu in a dry run):
#   gpu_run_KIND.log  gpu_check_KIND.json  gpu_check_KIND.log  learning_gpu_KIND.json  learning_gpu_KIND.png
#   learning_gpu_KIND.log        (6 files: within what one call brings back)
# --dry-run: the same steps on CPU with tiny sizes (gpu_check.py --smoke, learning_gpu.py --smoke; step 3 prints the
# versions but leaves the import checks to the parts); tests/benchmarks/test_gpu_run.py runs it, with the data of
# `gpu_data.py --corpus FILE.jsonl` in GPU_CARRY_ROOT/.gpu/data.
# Env: OUT, PYTHON (python3), GPU_CARRY_ROOT (where .whl/ and .gpu/ are; default the checkout), GPU_SITE
# (/tmp/gpu_run_site), GPU_STASH (/tmp/gpu_run_stash), GPU_WORK (/tmp/gpu_run_work: run directories),
# CHECK_TIMEOUT (225), LEARNING_TIMEOUT (290), LEARNING_BUDGET (LEARNING_TIMEOUT - 30: learning_gpu.py's own
# plan; the rest covers its imports and plot).
#
# Time budget (sized from the last H200 run: CALM-M 450 ms per step at micro-batch 4 x 4, Transformer-M 351 ms;
# flash-attn-4's compilation measured on the CPU; torch.compile times estimated), at most ~9 minutes in all:
#   setup      ~30 s   join 88 MiB + sha256, pip install of ~21 wheels, versions, imports of flash_attn.cute
#   check      225 s   imports 15, env 5, attention 30 (flash-attn-4 compiles fwd/bwd/decode/GQA kernels),
#                      CALM-M baseline 25 (build 10 + 7 steps x 0.45 + profile 10), Transformer-M baseline 13
#                      (10 + 7 x 0.35), CALM-M optimised 85 (build 10 + first-step torch.compile ~60 + steps +
#                      profile 10), Transformer-M optimised 48 (10 + compile ~35 + steps), energy 5: ~226 s;
#                      --ladder adds ~120 s (4 more CALM-M variants, one compiled): off unless asked
#   learning   290 s   imports 15, calibration 3 x ~10, AE ~30, CALM and AR ~80 each at equal FLOPs, evaluations
#                      45 (9 checkpoints on 131k wikitext tokens, 2 in-domain), plot; learning_gpu.py sizes the
#                      steps from the measured step times so that the plan ends within LEARNING_BUDGET
#   in all     ~545 s  (+ 10 s kill grace per part): inside one call's 600 s, ~2 min of a 15-minute lease left
#                      for the machine's start and the transfers; a re-run of one part: --parts learning with
#                      LEARNING_TIMEOUT=150, or --parts check
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
py=${PYTHON:-python3}
root=${GPU_CARRY_ROOT:-$PWD}
out_dir=${OUT:-bench_out/gpu_run}
site=${GPU_SITE:-/tmp/gpu_run_site}
stash=${GPU_STASH:-/tmp/gpu_run_stash}
work=${GPU_WORK:-/tmp/gpu_run_work}
check_timeout=${CHECK_TIMEOUT:-225}
learning_timeout=${LEARNING_TIMEOUT:-290}
learning_budget=${LEARNING_BUDGET:-$((learning_timeout - 30))}
shopt -s nullglob

parts=check,learning dry=() ladder=() known=()
while [ $# -gt 0 ]; do
  case "$1" in
    --stash)
      mkdir -p "$stash"
      carried=("$root"/.gpu/call-*/*)
      for file in "${carried[@]}"; do cp -f "$file" "$stash/" || exit 1; done
      echo "== stashed ${#carried[@]} files in $stash:"
      ls -l "$stash"
      exit 0 ;;
    --parts) parts=$2; shift ;;
    --dry-run) dry=(--smoke) ;;
    --ladder) ladder=(--ladder) ;;
    --known-answer) known=(--known-answer "$2"); shift ;;
    *) echo "gpu_run.sh: error: unknown argument $1 (see the header of benchmarks/gpu_run.sh)" >&2; exit 2 ;;
  esac
  shift
done
for part in ${parts//,/ }; do
  case "$part" in check|learning) ;; *) echo "gpu_run.sh: error: unknown part '$part' (check, learning)" >&2; exit 2 ;; esac
done
if [ ${#dry[@]} -gt 0 ]; then export DS_ACCELERATOR=cpu; fi

mkdir -p "$out_dir" "$work"
export PYTHONPATH="$site:$site/nvidia_cutlass_dsl/dsl_packages:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 DS_ACCELERATOR=${DS_ACCELERATOR:-cuda} WANDB_MODE=disabled HF_HUB_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
kind=$("$py" benchmarks/common.py 2>/dev/null | tail -1)
kind=${kind:-unknown}

run() {
echo "== gpu_run.sh on '$kind' ($(date -u +%Y-%m-%dT%H:%M:%SZ)), parts $parts ${dry[*]} ${ladder[*]} ${known[*]}"

wheels=("$root"/.whl/*.whl)
manifests=("$root"/.gpu/call-*/*.parts.json "$stash"/*.parts.json)
if [ ${#manifests[@]} -gt 0 ]; then
  echo "== joining wheel parts ($root/.gpu/call-*, $stash)"
  if "$py" benchmarks/gpu_carry.py join --from "$root"/.gpu/call-* "$stash" --to "$work/joined"; then
    wheels+=("$work"/joined/*.whl)
  else
    echo "gpu_run.sh: joining the wheel parts failed; going on without them" >&2
  fi
fi
if [ ${#wheels[@]} -gt 0 ]; then
  echo "== installing ${#wheels[@]} wheels into $site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "${wheels[@]}" || echo "gpu_run.sh: installing the carried wheels failed; the parts run with what imports" >&2
fi

echo "== nvidia-smi"
nvidia-smi || echo "(nvidia-smi failed)"
echo "== versions"
"$py" - "${dry[@]}" <<'EOF'
import importlib, importlib.metadata as md, platform, sys, time
print("python", platform.python_version(), sys.executable)
for name in ("torch", "torchvision", "triton", "numpy", "transformers", "tokenizers", "huggingface-hub", "safetensors",
             "megatron-core", "deepspeed", "pydantic", "pydantic-core", "hjson", "typing-extensions",
             "mosaicml-streaming", "brotli", "python-snappy", "cramjam", "zstd", "catalogue", "xxhash", "tiktoken",
             "flash-attn-4", "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-cu13", "quack-kernels",
             "apache-tvm-ffi", "torch-c-dlpack-ext", "cuda-bindings", "einops", "protobuf"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} -")
import torch
print("cuda available", torch.cuda.is_available(), "| cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
modules = ("megatron.core", "deepspeed", "streaming", "calm_train.data.loader", "flash_attn.cute")
if sys.argv[1:] == ["--smoke"]:         # a dry run: the parts import them anyway (each import check costs seconds)
    print("dry run: import checks left to the parts")
    modules = ()
for module in modules:
    start = time.perf_counter()
    try:
        importlib.import_module(module)
        print(f"{module} imports ({time.perf_counter() - start:.1f} s)")
    except Exception as exc:
        print(f"{module} does not import: {type(exc).__name__}: {exc}")
EOF

status=0
run_part() {   # name timeout command...
  local name=$1 limit=$2
  shift 2
  echo "== part $name (timeout ${limit} s): $*"
  local start=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee "$out_dir/${name}_$kind.log"
  local rc=${PIPESTATUS[0]}
  echo "== part $name: exit $rc after $((SECONDS - start)) s$([ "$rc" = 124 ] && echo ' (timed out: its JSON holds what it measured)')"
  [ "$rc" != 0 ] && [ "$status" = 0 ] && status=$rc
}
case ",$parts," in *,check,*)
  run_part gpu_check "$check_timeout" "$py" benchmarks/gpu_check.py --out "$out_dir/gpu_check_$kind.json" \
    "${dry[@]}" "${ladder[@]}" ;;
esac
case ",$parts," in *,learning,*)
  run_part learning_gpu "$learning_timeout" "$py" benchmarks/learning_gpu.py --data "$root/.gpu/data" \
    --out "$out_dir/learning_gpu_$kind.json" --budget-s "$learning_budget" --work "$work/learning" \
    "${dry[@]}" "${known[@]}" ;;
esac
echo "== gpu_run.sh: exit $status; files in $out_dir:"
ls -la "$out_dir"
return "$status"
}
run 2>&1 | tee -a "$out_dir/gpu_run_$kind.log"
exit "${PIPESTATUS[0]}"
