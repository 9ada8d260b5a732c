"""Part 2 of the GPU run: flash-attn-4 against SDPA, and training steps of today's settings against the speed switches.

    python benchmarks/gpu_check.py --out FILE.json [--smoke] [--only SECTION ...] [--ladder] [--no-profile]

Sections (each guarded: one failure is recorded and the next still runs; each prints its result lines, and
FILE.json, with every section so far, the machine's kind and the side-by-side table, is rewritten after every
section and every training-step variant, so a run cut off by its timeout keeps what it measured):

  env        versions, device, the measured bf16 GEMM peaks (calm_train.train.flops.measure_peak_flops,
             and a large 8192^3 product timed with events), the vendor's dense bf16 spec of the device
  attention  benchmarks/gpu_attention.py: flash-attn-4 and every SDPA backend against fp32 SDPA-math
             (output and dq, dk, dv), speed; a decode step and grouped-query attention
  steps      CALM-M and Transformer-M training steps through TrainEngine (DeepSpeed ZeRO-1, bf16 with fp32
             master weights): baseline (today's settings) for both, then optimised (every speed switch) for
             both, then with --ladder CALM-M's ladder (baseline + one switch each); tokens/s, MFU against the
             spec and the measured GEMM peak, peak memory, the losses of the first steps and their largest
             relative difference from the baseline's (gpu_steps.py); for the CALM-M baseline and optimised
             runs a torch.profiler breakdown by module (profile_step.py)
  energy     the project's energy_score vs a naive one that materialises [B, T, N, M, D]: memory, time, error

MFU = train_flops_per_token x tokens/s / peak.  --smoke runs the same code with tiny sizes on CPU (fp32;
the flash rows then say why flash cannot run; the optimised runs without torch.compile, whose C++ build
takes minutes on 2 cores: tests/parallel/test_perf.py covers it); GPU-only numbers (memory, MFU vs the spec)
are null there.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import time
import traceback

import common  # first: it sets the environment (DS_ACCELERATOR=cpu without CUDA) before DeepSpeed is imported
import torch

import gpu_attention
import gpu_steps
from common import rel_err, sync, time_ms
from gpu_steps import GIB, peak_gib, reset_memory, step_config

from calm_train.parallel import runtime
from calm_train.train.flops import measure_peak_flops, spec_peak_flops

# Full sizes are the paper's (calm_m.yaml, transformer_m.yaml, Llama 3 vocabulary); smoke sizes run on 2 CPU cores.
# micro x accumulation is today's setting (the baseline); micro_search the candidates of the optimised runs (those
# whose peak memory, extrapolated from the baseline's, fits the GPU); optimised_extra: overrides of the optimised runs.
SIZES = {
    "full": dict(vocab=128256, calm_seq=8192, ar_seq=2048, micro=4, accumulation=4, micro_search=(16, 8, 4),
                 warmup=2, steps=5, attn=dict(B=4, H=16, S=2048, D=64), attn_iters=20, energy_iters=10, gemm=8192,
                 profile_steps=2, overrides=[], calm_overrides=[], optimised_extra=[]),
    "smoke": dict(vocab=512, calm_seq=64, ar_seq=32, micro=2, accumulation=2, micro_search=(4, 2), warmup=1, steps=2,
                  attn=dict(B=1, H=2, S=64, D=16), attn_iters=2, energy_iters=2, gemm=256, profile_steps=1,
                  overrides=["model.backbone.hidden_size=64", "model.backbone.intermediate_size=128",
                             "model.backbone.num_layers=2", "model.backbone.num_heads=4"],
                  calm_overrides=["model.ae.hidden_size=32", "model.ae.intermediate_size=64", "model.ae.latent_size=16",
                                  "model.head.num_blocks=2", "model.head.noise_size=16",
                                  "model.head.num_target_samples=10"],
                  optimised_extra=["perf.compile=off"]),
}
MODELS = {"calm_m": "CALM-M", "transformer_m": "Transformer-M"}


REPORT: list[str] = []      # every result line, printed as it comes and again at the end


def report(line: str) -> None:
    print(line, flush=True)
    REPORT.append(line)


# ------------------------------------------------------------------------------------------------
def section_env(device: torch.device, size: dict) -> dict:
    import importlib.metadata as md
    versions = {}
    for name in ("torch", "megatron-core", "deepspeed", "pydantic", "numpy", "triton", "transformers", "flash-attn-4",
                 "nvidia-cutlass-dsl"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    out = {"python": platform.python_version(), "versions": versions, "device": str(device),
           "ds_accelerator": os.environ.get("DS_ACCELERATOR")}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out["peak_measure_peak_flops"] = measure_peak_flops(device, dtype)
    n = size["gemm"]
    a_NN, b_NN = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    gemm = time_ms(lambda: a_NN @ b_NN, device, iters=10, warmup=3)
    out["peak_gemm_large"] = 2 * n ** 3 / (gemm["median_ms"] / 1e3)
    out["gemm_large"] = dict(gemm, n=n, dtype=str(dtype))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(name=props.name, sm_count=props.multi_processor_count, total_gib=props.total_memory / GIB,
                   capability=list(torch.cuda.get_device_capability(device)), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), peak_spec=spec_peak_flops(props.name, dtype))
    spec = f"{out['peak_spec'] / 1e12:.4g} TFLOP/s" if out.get("peak_spec") else "unknown"
    report(f"[env] {out.get('name', device)}  peak {str(dtype)[6:]} GEMM: measure_peak_flops "
           f"{out['peak_measure_peak_flops'] / 1e12:.4g} TFLOP/s, {n}^3 {out['peak_gemm_large'] / 1e12:.4g} TFLOP/s "
           f"(dense spec {spec})  versions {versions}")
    return out


# ------------------------------------------------------------------------------------------------
def section_steps(device: torch.device, size: dict, peaks: dict, save, ladder: bool, profile: bool) -> dict:
    """Baseline for both models, optimised for both (the side-by-side table), then CALM-M's ladder;
    save(results) after every variant."""
    import profile_step

    def profiler(engine, batch, first_step):
        result = profile_step.profile_steps(engine, batch, first_step, size["profile_steps"])
        REPORT.append(profile_step.print_profile(result, f"[profile] {engine.cfg.model.kind}"))
        return result

    jobs = [(model, variant) for variant in ("baseline", "optimised") for model in MODELS]
    jobs += [("calm_m", variant) for variant in gpu_steps.variants(ladder) if variant not in ("baseline", "optimised")]
    plans = gpu_steps.variants(ladder)
    results: dict = {model: {} for model in MODELS}
    for model, variant in jobs:
        overrides, search = plans[variant]
        baseline = results[model].get("baseline", {})
        candidates = gpu_steps.fitting_micro(size["micro_search"], baseline, peaks.get("total_gib")) if search \
            else (size["micro"],)
        if variant == "optimised":
            overrides = overrides + size["optimised_extra"]
        with_profile = profile and model == "calm_m" and variant in ("baseline", "optimised")
        row = gpu_steps.run_variant(model, variant, overrides, candidates, device, size, peaks,
                                    profile=profiler if with_profile else None)
        if variant != "baseline":
            row.update(gpu_steps.compare_losses(row, results[model].get("baseline", {})))
        results[model][variant] = row
        report(step_line(MODELS[model], row))
        if variant == "optimised" and "error" in row:
            for fallback, fallback_overrides in gpu_steps.FALLBACKS.items():
                row = gpu_steps.run_variant(model, fallback, fallback_overrides + size["optimised_extra"], candidates,
                                            device, size, peaks)
                row.update(gpu_steps.compare_losses(row, results[model].get("baseline", {})))
                results[model][fallback] = row
                report(step_line(MODELS[model], row))
                if "error" not in row:
                    break
        save(results)
    return results


def step_line(model: str, row: dict) -> str:
    head = f"[steps] {model:13s} {row['variant']:13s}"
    if "error" in row:
        return f"{head} FAILED: {row['error'][:240]}"
    diff = row.get("loss_rel_diff_max")
    same = "" if diff is None else f"  loss vs baseline max rel {diff:.2e} ({'ok' if row['loss_within_tolerance'] else 'OVER'} " \
                                   f"{row['loss_tolerance']:.0e})"
    return (f"{head} micro {row['micro_batch']} x {row['accumulation']}  step {row['step_s'] * 1e3:.1f} ms  "
            f"{row['tokens_per_s']:,.0f} tok/s  MFU spec {percent(row['mfu_vs_spec'])} GEMM "
            f"{percent(row['mfu_vs_gemm_large'])}  peak {fmt_gib(row['peak_memory_gib'])}  first steps "
            f"{[round(x, 1) for x in row['first_steps_s']]} s  losses {[round(x, 4) for x in row['losses']]}{same}\n"
            f"        {row['engine']}")


def side_by_side(steps: dict) -> list[dict]:
    rows = []
    for model, label in MODELS.items():
        for variant, row in steps.get(model, {}).items():
            rows.append({"model": label, "variant": variant, "micro": None if "error" in row else
                         f"{row['micro_batch']} x {row['accumulation']}",
                         "attention": None if "error" in row else row["engine"].split(" ")[1],
                         "step_ms": row["step_s"] * 1e3 if "step_s" in row else None,
                         "tokens_per_s": row.get("tokens_per_s"),
                         "mfu_spec": row.get("mfu_vs_spec"), "mfu_gemm": row.get("mfu_vs_gemm_large"),
                         "peak_gib": row.get("peak_memory_gib"), "loss1": (row.get("losses") or [None])[0],
                         "loss_diff": row.get("loss_rel_diff_max"), "error": row.get("error")})
    return rows


def print_side_by_side(rows: list[dict]) -> str:
    return common.print_table(rows, [
        ("model", "model", "s"), ("variant", "variant", "s"), ("micro", "micro x acc", "s"),
        ("attention", "attention", "s"), ("step_ms", "step ms", ".1f"), ("tokens_per_s", "tokens/s", ",.0f"),
        ("mfu_spec", "MFU spec", ".1%"), ("mfu_gemm", "MFU GEMM", ".1%"), ("peak_gib", "peak GiB", ".1f"),
        ("loss1", "loss@1", ".5f"), ("loss_diff", "max rel dloss", ".1e"), ("error", "error", "s")],
        title=f"baseline vs optimised (loss: max over the first steps of |loss - baseline| / baseline, "
              f"tolerance {gpu_steps.LOSS_TOLERANCE:.0e})")


def percent(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def fmt_gib(x: float | None) -> str:
    return "n/a (CPU)" if x is None else f"{x:.2f} GiB"


# ------------------------------------------------------------------------------------------------
def naive_energy_score(samples_BTND: torch.Tensor, targets_BTMD: torch.Tensor, beta: float) -> torch.Tensor:
    """The same estimator with every difference vector materialised ([B, T, N, M, D] and [B, T, N, N, D])."""
    from calm_train.models.energy import SQRT_FLOOR
    x, y = samples_BTND.float(), targets_BTMD.float()
    N = x.shape[-2]
    fit_BT = ((x[..., :, None, :] - y[..., None, :, :]).pow(2).sum(-1) + SQRT_FLOOR).pow(beta / 2).mean((-2, -1))
    off_diagonal_NN = 1 - torch.eye(N, device=x.device)
    spread_BTNN = ((x[..., :, None, :] - x[..., None, :, :]).pow(2).sum(-1) + SQRT_FLOOR).pow(beta / 2)
    return 2 * fit_BT - (spread_BTNN * off_diagonal_NN).sum((-2, -1)) / (N * (N - 1))


def section_energy(device: torch.device, size: dict) -> dict:
    from calm_train.models.energy import energy_score
    cfg = step_config("calm_m", size, size["micro"], [], device)
    h = cfg.model.head
    B, T, N, M, D = cfg.train.micro_batch, cfg.data.seq_len // cfg.model.patch_size - 1, h.num_samples, \
        h.num_target_samples, cfg.model.ae.latent_size
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    samples_BTND = torch.randn(B, T, N, D, generator=gen).to(device, dtype)
    targets_BTMD = (torch.randn(B, T, 1, D, generator=gen) + 0.3 * torch.randn(B, T, M, D, generator=gen)).to(device)
    out = {"shape_BTNMD": [B, T, N, M, D], "samples_dtype": str(dtype), "targets_dtype": "torch.float32",
           "naive_diff_tensor_gib": B * T * N * M * D * 4 / GIB}
    results = {}
    for name, fn in (("project", energy_score), ("naive", naive_energy_score)):
        def fwd_bwd():
            x = samples_BTND.detach().requires_grad_(True)
            loss_BT = fn(x, targets_BTMD, h.beta)
            loss_BT.mean().backward()
            return loss_BT.detach(), x.grad
        try:
            base = reset_memory(device)
            loss_BT, grad_BTND = fwd_bwd()
            sync(device)
            peak = peak_gib(device)
            row = {"peak_extra_gib": None if peak is None else peak - base,
                   "time": time_ms(fwd_bwd, device, size["energy_iters"], warmup=1), "loss_mean": float(loss_BT.mean())}
            results[name] = (loss_BT, grad_BTND)
        except torch.cuda.OutOfMemoryError as exc:
            row = {"error": f"out of memory: {str(exc).splitlines()[0]}"}
        out[name] = row
        report(f"[energy] {name:8s} " + (row["error"] if "error" in row else f"fwd+bwd {row['time']['median_ms']:.2f} ms  "
               f"peak extra {fmt_gib(row['peak_extra_gib'])}  loss {row['loss_mean']:.5f}"))
        reset_memory(device)
    if len(results) == 2:
        out["loss_vs_naive"] = rel_err(results["project"][0], results["naive"][0])
        out["grad_vs_naive"] = rel_err(results["project"][1].float(), results["naive"][1].float())
        report(f"[energy] project vs naive: loss rel {out['loss_vs_naive']['rel']:.2e}, "
               f"grad rel {out['grad_vs_naive']['rel']:.2e}")
    return out


# ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True, help="the JSON result (gpu_check_<kind>.json)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU test of every code path)")
    parser.add_argument("--only", nargs="*", default=None, help="sections to run (default: all)")
    parser.add_argument("--ladder", action="store_true", help="steps: also CALM-M's ladder (one switch at a time)")
    parser.add_argument("--no-profile", action="store_true", help="steps: no torch.profiler breakdown")
    args = parser.parse_args(argv)
    size = SIZES["smoke" if args.smoke else "full"]
    device = runtime.pick_device()[0]
    if device.type != "cuda" and not args.smoke:
        print("gpu_check: no CUDA device; run with --smoke on CPU")
        return 2
    start = time.perf_counter()
    results: dict = {"argv": sys.argv, "kind": common.device_kind(), "machine": common.machine(),
                     "sizes": "smoke" if args.smoke else "full", "loss_tolerance": gpu_steps.LOSS_TOLERANCE}

    def save(steps: dict | None = None) -> None:
        if steps is not None:
            results["steps"] = steps
        rows = side_by_side(results.get("steps", {}))
        results.update(side_by_side=rows, report=REPORT, wall_s=time.perf_counter() - start)
        common.write_json(args.out, results)

    with runtime.single_process(seed=0):
        sections = {"env": lambda: section_env(device, size),
                    "attention": lambda: gpu_attention.section_attention(device, size, report),
                    "steps": lambda: section_steps(device, size, results["env"], save, args.ladder,
                                                   not args.no_profile),
                    "energy": lambda: section_energy(device, size)}
        for name, fn in sections.items():
            if args.only is not None and name not in args.only and name != "env":
                continue
            t0 = time.perf_counter()
            try:
                results[name] = fn()
            except Exception as exc:                          # noqa: BLE001 - keep the other sections
                traceback.print_exc()
                results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:1000]}"}
                report(f"[{name}] FAILED: {results[name]['error'][:300]}")
            results[name]["section_s"] = time.perf_counter() - t0
            save()
            reset_memory(device)
    results["table"] = print_side_by_side(results["side_by_side"]) if "steps" in results else ""
    save()
    print("\n== gpu_check summary ==\n" + "\n".join(REPORT) + "\n" + results["table"])
    print(f"gpu_check: {results['wall_s']:.0f} s, results in {args.out}")
    failed = [name for name, v in results.items() if isinstance(v, dict) and "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
