"""One-GPU check: flash-attn-4 against SDPA, and training steps of today's settings against the speed switches.

    python benchmarks/gpu_check.py [--out DIR] [--smoke] [--only SECTION ...] [--no-ladder] [--no-profile]

Sections (each guarded: one failure is recorded and the next still runs; each prints its result and
writes DIR/<section>.json as soon as it ends; DIR/summary.json and DIR/table.txt at the end):

  env        versions, device, the measured bf16 GEMM peaks (calm_train.train.flops.measure_peak_flops,
             and a large 8192^3 product timed with events)
  attention  the project's core attention ([S, B, H, D]): flash-attn-4 (FlashCoreAttention, first call =
             its kernel compilation, timed apart), torch's own SDPA choice and each forced SDPA backend, vs
             SDPA-MATH in fp32 on the upcast inputs: max |err| and ||err|| / ||ref|| of the output and of
             dq, dk, dv; forward and forward+backward times; plus a decode step (16 new queries over a cache)
             and grouped-query attention (4 query heads per k/v head) against the same fp32 reference
  steps      CALM-M and Transformer-M training steps through TrainEngine (DeepSpeed ZeRO-1, bf16 with fp32
             master weights): baseline (today's settings) and optimised (every speed switch) for both,
             then the ladder (baseline + one switch each) for CALM-M; tokens/s, MFU against the 989 TFLOP/s
             spec and the measured GEMM peak, peak memory, the losses of the first steps and their largest
             relative difference from the baseline's (gpu_steps.py); for the CALM-M baseline and optimised
             runs a torch.profiler breakdown by module (profile_step.py)
  energy     the project's energy_score vs a naive one that materialises [B, T, N, M, D]: memory, time, error

MFU = train_flops_per_token x tokens/s / peak.  --smoke runs the same code with tiny sizes on CPU (fp32;
the flash rows then say why flash cannot run); GPU-only numbers (memory, MFU vs the spec) are null there.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import platform
import statistics
import sys
import time
import traceback

import common  # first: it sets the environment (DS_ACCELERATOR=cpu without CUDA) before DeepSpeed is imported
import torch

import gpu_steps
from common import sync
from gpu_steps import GIB, peak_gib, reset_memory, step_config

from calm_train.parallel import runtime
from calm_train.train.flops import measure_peak_flops

# Full sizes are the paper's (calm_m.yaml, transformer_m.yaml, Llama 3 vocabulary); smoke sizes run on 2 CPU cores.
# micro x accumulation is today's setting (the baseline); micro_search the candidates of the optimised runs.
SIZES = {
    "full": dict(vocab=128256, calm_seq=8192, ar_seq=2048, micro=4, accumulation=4, micro_search=(16, 8, 4),
                 warmup=2, steps=5, attn=dict(B=4, H=16, S=2048, D=64), attn_iters=20, energy_iters=10, gemm=8192,
                 profile_steps=2, overrides=[], calm_overrides=[]),
    "smoke": dict(vocab=512, calm_seq=64, ar_seq=32, micro=2, accumulation=2, micro_search=(4, 2), warmup=1, steps=2,
                  attn=dict(B=1, H=2, S=64, D=16), attn_iters=2, energy_iters=2, gemm=256, profile_steps=1,
                  overrides=["model.backbone.hidden_size=64", "model.backbone.intermediate_size=128",
                             "model.backbone.num_layers=2", "model.backbone.num_heads=4"],
                  calm_overrides=["model.ae.hidden_size=32", "model.ae.intermediate_size=64", "model.ae.latent_size=16",
                                  "model.head.num_blocks=2", "model.head.noise_size=16",
                                  "model.head.num_target_samples=10"]),
}
MODELS = {"calm_m": "CALM-M", "transformer_m": "Transformer-M"}


REPORT: list[str] = []      # every result line, printed as it comes and again at the end


def report(line: str) -> None:
    print(line, flush=True)
    REPORT.append(line)


def time_ms(fn, device: torch.device, iters: int, warmup: int = 2) -> dict:
    """Median and min wall time of fn() in ms (CUDA events on GPU, perf_counter on CPU), after warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "iters": iters}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> dict:
    out, ref = out.detach().double(), ref.detach().double()
    diff = out - ref
    return {"max_abs": float(diff.abs().max()), "rel": float(diff.norm() / ref.norm()),
            "finite": bool(torch.isfinite(out).all())}


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
                   cudnn=torch.backends.cudnn.version())
    report(f"[env] {out.get('name', device)}  peak {str(dtype)[6:]} GEMM: measure_peak_flops "
           f"{out['peak_measure_peak_flops'] / 1e12:.4g} TFLOP/s, {n}^3 {out['peak_gemm_large'] / 1e12:.4g} TFLOP/s "
           f"(H200 spec 989)  versions {versions}")
    return out


# ------------------------------------------------------------------------------------------------
def attention_cores(device: torch.device, dtype: torch.dtype, H: int, D: int, kv_heads: int | None = None):
    """(SDPACoreAttention, FlashCoreAttention or None, why flash cannot run) for H heads of size D."""
    from megatron.core.transformer.enums import AttnMaskType

    from calm_train.config import BackboneArch
    from calm_train.models.attention import FlashCoreAttention, SDPACoreAttention, flash_unavailable_reason
    from calm_train.models.backbone import transformer_config
    arch = BackboneArch(hidden_size=H * D, intermediate_size=4 * H * D, num_layers=1, num_heads=H,
                        num_kv_heads=kv_heads)
    config = transformer_config(arch, tp=1, pp=1, dtype=dtype)
    make = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    reason = flash_unavailable_reason(dtype, D)
    flash = FlashCoreAttention(**make).to(device) if reason is None else None
    return SDPACoreAttention(**make).to(device), flash, reason


def section_attention(device: torch.device, size: dict) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, S, D = (size["attn"][k] for k in "BHSD")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sdpa, flash, reason = attention_cores(device, dtype, H, D)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q_SBHD, k_SBHD, v_SBHD, dout_SBHD = (torch.randn(S, B, H, D, generator=gen).to(device, dtype) for _ in range(4))
    dout_SBX = dout_SBHD.flatten(2)

    def run(core, inputs):
        leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
        out_SBX = core(*leaves, None)
        out_SBX.backward(dout_SBX.to(out_SBX.dtype))
        return out_SBX, [x.grad for x in leaves]

    with sdpa_kernel(SDPBackend.MATH):
        ref_out, ref_grads = run(sdpa, [x.float() for x in (q_SBHD, k_SBHD, v_SBHD)])
    flops_fwd = 4 * B * H * S * S * D / 2          # two [S, S] products, causal half
    rows = {"flash-attn-4": (flash, None)}
    rows.update({"sdpa-default": (sdpa, None), "sdpa-flash": (sdpa, SDPBackend.FLASH_ATTENTION),
                 "sdpa-efficient": (sdpa, SDPBackend.EFFICIENT_ATTENTION), "sdpa-cudnn": (sdpa, SDPBackend.CUDNN_ATTENTION),
                 f"sdpa-math-{str(dtype)[6:]}": (sdpa, SDPBackend.MATH)})
    out = {"shape_SBHD": [S, B, H, D], "dtype": str(dtype), "reference": "SDPA MATH, float32, upcast inputs",
           "flash_attn_4": reason or "available", "backends": {}}
    for name, (core, backend) in rows.items():
        try:
            if core is None:
                raise RuntimeError(f"flash cannot run here: {reason}")
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                t0 = time.perf_counter()
                o, grads = run(core, (q_SBHD, k_SBHD, v_SBHD))
                sync(device)
                row = {"first_call_s": time.perf_counter() - t0, "out": rel_err(o, ref_out)}
                row.update({f"d{n}": rel_err(g, r) for n, g, r in zip("qkv", grads, ref_grads)})
                with torch.no_grad():
                    row["fwd"] = time_ms(lambda: core(q_SBHD, k_SBHD, v_SBHD, None), device, size["attn_iters"])
                row["fwd_bwd"] = time_ms(lambda: run(core, (q_SBHD, k_SBHD, v_SBHD)), device, size["attn_iters"])
            row["fwd_tflops"] = flops_fwd / row["fwd"]["median_ms"] / 1e9
            row["fwd_bwd_tflops"] = 3.5 * flops_fwd / row["fwd_bwd"]["median_ms"] / 1e9
            report(f"[attention] {name:17s} out rel {row['out']['rel']:.2e} max {row['out']['max_abs']:.2e}  "
                   f"dq rel {row['dq']['rel']:.2e} dk {row['dk']['rel']:.2e} dv {row['dv']['rel']:.2e}  "
                   f"fwd {row['fwd']['median_ms']:.3f} ms  fwd+bwd {row['fwd_bwd']['median_ms']:.3f} ms "
                   f"({row['fwd_bwd_tflops']:.4g} TFLOP/s)  first call {row['first_call_s']:.2f} s")
        except Exception as exc:                              # noqa: BLE001 - a backend may not exist here
            row = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
            report(f"[attention] {name:17s} unavailable: {row['error'][:160]}")
        out["backends"][name] = row
    out["cases"] = attention_cases(device, dtype, size)
    return out


def attention_cases(device: torch.device, dtype: torch.dtype, size: dict) -> dict:
    """A decode step (16 new queries at positions S-16.. over S cached keys, the KV-cache path) and GQA
    (H/4 k/v heads), forward only, flash-attn-4 and SDPA against SDPA-MATH in fp32 with the explicit mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    B, H, S, D = (size["attn"][k] for k in "BHSD")
    gen = torch.Generator(device="cpu").manual_seed(1)
    out = {}
    for case, kv_heads, new in (("decode", H, 16), ("gqa", max(1, H // 4), S)):
        sdpa, flash, reason = attention_cores(device, dtype, H, D, kv_heads)
        q = torch.randn(new, B, H, D, generator=gen).to(device, dtype)
        k, v = (torch.randn(S, B, kv_heads, D, generator=gen).to(device, dtype) for _ in range(2))
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            ref = sdpa.attend(q.float(), k.float(), v.float(), S - new)
        rows = {}
        for name, core in (("flash-attn-4", flash), ("sdpa-default", sdpa)):
            if core is None:
                rows[name] = {"error": f"flash cannot run here: {reason}"}
                continue
            try:
                with torch.no_grad():
                    rows[name] = rel_err(core.attend(q, k, v, S - new), ref)
            except Exception as exc:                          # noqa: BLE001 - recorded
                rows[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
        out[case] = {"q_SBHD": list(q.shape), "kv_SBHD": list(k.shape), **rows}
        report(f"[attention] {case:6s} " + "  ".join(
            f"{n}: " + (f"rel {r['rel']:.2e} max {r['max_abs']:.2e}" if "rel" in r else r["error"][:80])
            for n, r in rows.items()))
    return out


# ------------------------------------------------------------------------------------------------
def section_steps(device: torch.device, size: dict, peaks: dict, out_dir: pathlib.Path, ladder: bool,
                  profile: bool) -> dict:
    """Baseline and optimised for both models first (the side-by-side table), then CALM-M's ladder."""
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
        with_profile = profile and model == "calm_m" and variant in ("baseline", "optimised")
        row = gpu_steps.run_variant(model, variant, overrides, search, device, size, peaks,
                                    profile=profiler if with_profile else None)
        if variant != "baseline":
            row.update(gpu_steps.compare_losses(row, results[model].get("baseline", {})))
        results[model][variant] = row
        report(step_line(MODELS[model], row))
        if variant == "optimised" and "error" in row:
            for fallback, fallback_overrides in gpu_steps.FALLBACKS.items():
                row = gpu_steps.run_variant(model, fallback, fallback_overrides, True, device, size, peaks)
                row.update(gpu_steps.compare_losses(row, results[model].get("baseline", {})))
                results[model][fallback] = row
                report(step_line(MODELS[model], row))
                if "error" not in row:
                    break
        (out_dir / "steps.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def step_line(model: str, row: dict) -> str:
    head = f"[steps] {model:13s} {row['variant']:13s}"
    if "error" in row:
        return f"{head} FAILED: {row['error'][:240]}"
    diff = row.get("loss_rel_diff_max")
    same = "" if diff is None else f"  loss vs baseline max rel {diff:.2e} ({'ok' if row['loss_within_tolerance'] else 'OVER'} " \
                                   f"{row['loss_tolerance']:.0e})"
    return (f"{head} micro {row['micro_batch']} x {row['accumulation']}  step {row['step_s'] * 1e3:.1f} ms  "
            f"{row['tokens_per_s']:,.0f} tok/s  MFU spec {percent(row['mfu_vs_spec_989'])} GEMM "
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
                         "mfu_spec": row.get("mfu_vs_spec_989"), "mfu_gemm": row.get("mfu_vs_gemm_large"),
                         "peak_gib": row.get("peak_memory_gib"), "loss1": (row.get("losses") or [None])[0],
                         "loss_diff": row.get("loss_rel_diff_max"), "error": row.get("error")})
    return rows


def print_side_by_side(rows: list[dict]) -> str:
    return common.print_table(rows, [
        ("model", "model", "s"), ("variant", "variant", "s"), ("micro", "micro x acc", "s"),
        ("attention", "attention", "s"), ("step_ms", "step ms", ".1f"), ("tokens_per_s", "tokens/s", ",.0f"),
        ("mfu_spec", "MFU 989", ".1%"), ("mfu_gemm", "MFU GEMM", ".1%"), ("peak_gib", "peak GiB", ".1f"),
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
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench_out/gpu_check")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU test of every code path)")
    parser.add_argument("--only", nargs="*", default=None, help="sections to run (default: all)")
    parser.add_argument("--no-ladder", action="store_true", help="steps: baseline and optimised only")
    parser.add_argument("--no-profile", action="store_true", help="steps: no torch.profiler breakdown")
    args = parser.parse_args(argv)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = SIZES["smoke" if args.smoke else "full"]
    device = runtime.pick_device()[0]
    if device.type != "cuda" and not args.smoke:
        print("gpu_check: no CUDA device; run with --smoke on CPU")
        return 2
    start = time.perf_counter()
    results: dict = {}
    with runtime.single_process(seed=0):
        sections = {"env": lambda: section_env(device, size),
                    "attention": lambda: section_attention(device, size),
                    "steps": lambda: section_steps(device, size, results["env"], out_dir, not args.no_ladder,
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
            (out_dir / f"{name}.json").write_text(json.dumps(results[name], indent=1, default=str))
            reset_memory(device)
    results["wall_s"] = time.perf_counter() - start
    table = print_side_by_side(side_by_side(results.get("steps", {}))) if "steps" in results else ""
    results["table"] = table
    (out_dir / "summary.json").write_text(json.dumps(results, indent=1, default=str))
    (out_dir / "table.txt").write_text(table + "\n")
    print("\n== gpu_check summary ==\n" + "\n".join(REPORT) + "\n" + table)
    print(f"gpu_check: {results['wall_s']:.0f} s, results in {out_dir}")
    failed = [name for name, v in results.items() if isinstance(v, dict) and "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
