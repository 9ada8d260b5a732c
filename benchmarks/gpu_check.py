"""One-GPU check of the project's own code: attention numerics, CALM-M / Transformer-M training steps, energy loss.

    python benchmarks/gpu_check.py [--out DIR] [--smoke]

Sections (each guarded: one failure is recorded and the next still runs; each prints its result and
writes DIR/<section>.json as soon as it ends):

  env        versions, device, the measured bf16 GEMM peaks (calm_train.train.flops.measure_peak_flops,
             and a large 8192^3 product timed with events)
  attention  the project's core attention (SDPACoreAttention, [S, B, H, D]) with torch's own SDPA choice
             (sdpa-default: what the model runs when flash_attn is absent) and each forced SDPA backend, vs
             SDPA-MATH in fp32 on the upcast inputs: max |err| and ||err|| / ||ref|| of the output and of
             dq, dk, dv; forward and forward+backward times
  calm_step  bf16 CALM-M optimizer step through calm_train.parallel.engine.TrainEngine (DeepSpeed) with a
             random frozen autoencoder of the paper's size: step time, tokens/s, MFU, peak memory
  ar_step    the same for the Transformer-M baseline at 2048 tokens
  energy     the project's energy_score vs a naive one that materialises [B, T, N, M, D]: memory, time, error

MFU = train_flops_per_token x tokens/s / peak, against the H200's dense bf16 spec (989 TFLOP/s) and the
two measured peaks.  --smoke runs the same code with tiny sizes on CPU (fp32); GPU-only numbers
(memory, MFU vs the spec) are null there.  --plain measures the steps without the engine.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
import traceback
import types

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")      # before anything imports deepspeed

from calm_train.config import load_config                                   # noqa: E402
from calm_train.models.autoencoder import Autoencoder                       # noqa: E402
from calm_train.models.rng import SampleRNG, sample_seeds                   # noqa: E402
from calm_train.parallel import runtime                                     # noqa: E402
from calm_train.train.flops import measure_peak_flops, train_flops_per_token  # noqa: E402

H200_BF16_DENSE_PEAK = 989e12
GIB = 2 ** 30

# Full sizes are the paper's (calm_m.yaml, transformer_m.yaml, Llama 3 vocabulary); smoke sizes run on 2 CPU cores.
SIZES = {
    "full": dict(vocab=128256, calm_seq=8192, ar_seq=2048, micro=(4, 2, 1), accumulation=4, warmup=2, steps=5,
                 attn=dict(B=4, H=16, S=2048, D=64), attn_iters=20, energy_iters=10, gemm=8192, overrides=[],
                 calm_overrides=[]),
    "smoke": dict(vocab=512, calm_seq=64, ar_seq=32, micro=(2,), accumulation=2, warmup=1, steps=2,
                  attn=dict(B=1, H=2, S=64, D=16), attn_iters=2, energy_iters=2, gemm=256,
                  overrides=["model.backbone.hidden_size=64", "model.backbone.intermediate_size=128",
                             "model.backbone.num_layers=2", "model.backbone.num_heads=4"],
                  calm_overrides=["model.ae.hidden_size=32", "model.ae.intermediate_size=64", "model.ae.latent_size=16",
                                  "model.head.num_blocks=2", "model.head.noise_size=16",
                                  "model.head.num_target_samples=10"]),
}


REPORT: list[str] = []      # every result line, printed as it comes and again as the final table


def report(line: str) -> None:
    print(line)
    REPORT.append(line)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def reset_memory(device: torch.device) -> float | None:
    """Start a peak-memory window; returns GiB allocated now (None on CPU: not tracked)."""
    gc.collect()
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / GIB


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> dict:
    out, ref = out.detach().double(), ref.detach().double()
    diff = out - ref
    return {"max_abs": float(diff.abs().max()), "rel": float(diff.norm() / ref.norm()),
            "finite": bool(torch.isfinite(out).all())}


# ------------------------------------------------------------------------------------------------
def section_env(device: torch.device, size: dict) -> dict:
    import importlib.metadata as md
    versions = {}
    for name in ("torch", "megatron-core", "deepspeed", "pydantic", "numpy", "triton", "transformers", "flash-attn"):
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
def section_attention(device: torch.device, size: dict) -> dict:
    from megatron.core.transformer.enums import AttnMaskType
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from calm_train.config import BackboneArch
    from calm_train.models.attention import SDPACoreAttention, flash_unavailable_reason
    from calm_train.models.backbone import transformer_config

    B, H, S, D = (size["attn"][k] for k in "BHSD")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    arch = BackboneArch(hidden_size=H * D, intermediate_size=4 * H * D, num_layers=1, num_heads=H)
    core = SDPACoreAttention(transformer_config(arch, tp=1, pp=1, dtype=dtype), layer_number=1,
                             attn_mask_type=AttnMaskType.causal, attention_type="self").to(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q_SBHD, k_SBHD, v_SBHD, dout_SBHD = (torch.randn(S, B, H, D, generator=gen).to(device, dtype) for _ in range(4))
    dout_SBX = dout_SBHD.flatten(2)

    def run(inputs):
        leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
        out_SBX = core(*leaves, None)
        out_SBX.backward(dout_SBX.to(out_SBX.dtype))
        return out_SBX, [x.grad for x in leaves]

    with sdpa_kernel(SDPBackend.MATH):
        ref_out, ref_grads = run([x.float() for x in (q_SBHD, k_SBHD, v_SBHD)])
    flops_fwd = 4 * B * H * S * S * D / 2          # two [S, S] products, causal half
    backends = {"sdpa-default": None, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
                "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                f"sdpa-math-{str(dtype)[6:]}": SDPBackend.MATH}
    out = {"shape_SBHD": [S, B, H, D], "dtype": str(dtype), "reference": "SDPA MATH, float32, upcast inputs",
           "flash_attn": flash_unavailable_reason(dtype) or "available", "backends": {}}
    for name, backend in backends.items():
        try:
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                o, grads = run((q_SBHD, k_SBHD, v_SBHD))
                row = {"out": rel_err(o, ref_out)}
                row.update({f"d{n}": rel_err(g, r) for n, g, r in zip("qkv", grads, ref_grads)})
                with torch.no_grad():
                    row["fwd"] = time_ms(lambda: core(q_SBHD, k_SBHD, v_SBHD, None), device, size["attn_iters"])
                row["fwd_bwd"] = time_ms(lambda: run((q_SBHD, k_SBHD, v_SBHD)), device, size["attn_iters"])
            row["fwd_tflops"] = flops_fwd / row["fwd"]["median_ms"] / 1e9
            row["fwd_bwd_tflops"] = 3.5 * flops_fwd / row["fwd_bwd"]["median_ms"] / 1e9
            report(f"[attention] {name:17s} out rel {row['out']['rel']:.2e} max {row['out']['max_abs']:.2e}  "
                   f"dq rel {row['dq']['rel']:.2e}  fwd {row['fwd']['median_ms']:.3f} ms  "
                   f"fwd+bwd {row['fwd_bwd']['median_ms']:.3f} ms ({row['fwd_bwd_tflops']:.4g} TFLOP/s)")
        except Exception as exc:                              # noqa: BLE001 - a backend may not exist here
            row = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            report(f"[attention] {name:17s} unavailable: {row['error'][:120]}")
        out["backends"][name] = row
    return out


# ------------------------------------------------------------------------------------------------
def step_config(name: str, size: dict, micro: int, device: torch.device):
    kind_overrides, seq = [], size["ar_seq"]
    if name == "calm_m":     # the AE is built in place (random, frozen): the path is never read
        kind_overrides, seq = ["model.autoencoder=random-frozen", *size["calm_overrides"]], size["calm_seq"]
    return load_config(name, [f"model.vocab_size={size['vocab']}", f"data.seq_len={seq}", f"train.micro_batch={micro}",
                              f"train.global_batch={micro * size['accumulation']}", "train.warmup_steps=0",
                              f"train.dtype={'bf16' if device.type == 'cuda' else 'fp32'}",
                              *size["overrides"], *kind_overrides])


class PlainAdamW:
    """Fallback when the DeepSpeed engine is missing or fails: the task's model with torch AdamW, no master weights."""

    def __init__(self, cfg, task, device: torch.device, dtype: torch.dtype):
        from calm_train.parallel.engine import param_groups
        self.cfg, self.task, self.device = cfg, task, device
        self.model = task.build_model(cfg, params_dtype=dtype).to(device)
        t = cfg.train
        self.opt = torch.optim.AdamW(param_groups(self.model, t.weight_decay), lr=t.lr,
                                     betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)

    def train_step(self, tokens_BL: torch.Tensor, sample_ids: torch.Tensor, step: int):
        micro = self.cfg.train.micro_batch
        losses = []
        for tokens, ids in zip(tokens_BL.to(self.device).split(micro), sample_ids.split(micro)):
            rng = SampleRNG(sample_seeds(self.cfg.train.seed, step, ids), self.device)
            loss = self.task.loss(self.model, tokens, rng) / (tokens_BL.shape[0] // micro)
            loss.backward()
            losses.append(float(loss.detach()))
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return types.SimpleNamespace(loss=sum(losses), grad_norm=float(norm))


def engine_trainer(cfg, task, device: torch.device):
    from calm_train.parallel.engine import TrainEngine, build_world
    return TrainEngine(cfg, task, build_world(cfg)), f"TrainEngine (DeepSpeed ZeRO-{cfg.parallel.zero_stage})"


def plain_trainer(cfg, task, device: torch.device):
    dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32
    return PlainAdamW(cfg, task, device, dtype), "plain model + torch.optim.AdamW (no master weights)"


def section_step(name: str, device: torch.device, size: dict, peaks: dict) -> dict:
    """The engine's step at the largest micro-batch that fits; if the engine fails (build or step), the
    plain model + AdamW at that micro-batch, labelled, with the engine's error kept in the result."""
    from calm_train.train.tasks import task_for
    errors, engine_error = [], None
    makers = (plain_trainer,) if size["plain"] else (engine_trainer, plain_trainer)
    for micro in size["micro"]:
        for make in makers:
            if make is not makers[0] and engine_error is None:
                break
            cfg = step_config(name, size, micro, device)
            m = cfg.model
            before_build = reset_memory(device)
            runtime.init_distributed(tp=1, pp=1, seed=cfg.train.seed)
            autoencoder = trainer = None
            if m.kind == "calm":   # random frozen AE of the configured (paper's) size, fp32 as load_frozen_autoencoder
                autoencoder = Autoencoder(m.ae, m.vocab_size, m.patch_size).requires_grad_(False).eval().to(device)
            try:
                trainer, label = make(cfg, task_for(cfg, autoencoder), device)
                out = run_steps(name, cfg, trainer, label, device, size, peaks, before_build)
                return dict(out, engine_error=engine_error, oom=errors)
            except torch.cuda.OutOfMemoryError as exc:
                errors.append(f"{make.__name__} micro_batch {micro}: out of memory: {str(exc).splitlines()[0]}")
                print(f"[{name}] {errors[-1]}; trying a smaller micro-batch")
                break
            except Exception as exc:                          # noqa: BLE001 - measured anyway, labelled
                if make is not engine_trainer:
                    raise
                traceback.print_exc()
                engine_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                report(f"[{name}] TrainEngine failed ({engine_error}); measuring the plain model + torch AdamW")
            finally:
                trainer = autoencoder = None
                reset_memory(device)
    raise RuntimeError(f"{name}: no micro-batch in {size['micro']} fits: {errors}")


def run_steps(name: str, cfg, trainer, label: str, device: torch.device, size: dict, peaks: dict,
              before_build: float) -> dict:
    t, seq = cfg.train, cfg.data.seq_len
    gen = torch.Generator().manual_seed(0)
    tokens_BL = torch.randint(0, cfg.model.vocab_size, (t.global_batch, seq), generator=gen)
    sample_ids = torch.arange(t.global_batch)
    after_build = reset_memory(device)
    losses, times = [], []
    for step in range(1, size["warmup"] + size["steps"] + 1):
        sync(device)
        t0 = time.perf_counter()
        result = trainer.train_step(tokens_BL, sample_ids, step)
        sync(device)
        if step > size["warmup"]:
            times.append(time.perf_counter() - t0)
        losses.append(float(result.loss))
    step_s = statistics.median(times)
    tokens_per_s = t.global_batch * seq / step_s
    flops_per_token = train_flops_per_token(cfg.model, seq)
    achieved = flops_per_token * tokens_per_s
    peak = peak_gib(device)
    out = {"trainer": label, "kind": cfg.model.kind, "seq_len": seq, "micro_batch": t.micro_batch,
           "global_batch": t.global_batch, "accumulation": t.global_batch // t.micro_batch,
           "dtype": t.dtype, "attention": cfg.model.attention, "step_s_median": step_s, "step_s_all": times,
           "tokens_per_s": tokens_per_s, "flops_per_token": flops_per_token, "achieved_tflops": achieved / 1e12,
           "mfu_vs_spec_989": achieved / H200_BF16_DENSE_PEAK if device.type == "cuda" else None,
           "allocated_before_build_gib": before_build, "allocated_after_build_gib": after_build,
           "peak_memory_gib": peak, "peak_memory_this_model_gib": None if peak is None else peak - before_build,
           "losses": losses, "losses_finite": all(math.isfinite(x) for x in losses),
           "params": sum(p.numel() for p in trainer.model.parameters())}
    for key in ("peak_measure_peak_flops", "peak_gemm_large"):
        out[f"mfu_vs_{key[5:]}"] = achieved / peaks[key] if key in peaks else None
    mfu, measured = out["mfu_vs_spec_989"], out["mfu_vs_gemm_large"]
    report(f"[{name}] {label}: micro {t.micro_batch} x {out['accumulation']}  step {step_s * 1e3:.1f} ms  "
           f"{tokens_per_s:,.0f} tok/s  {flops_per_token / 1e9:.3f} GFLOP/tok  MFU vs spec {percent(mfu)}, vs "
           f"{size['gemm']}^3 GEMM {percent(measured)}  peak mem {fmt_gib(peak)}  losses {[round(x, 4) for x in losses]}")
    return out


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
    cfg = step_config("calm_m", size, size["micro"][0], device)
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
    parser.add_argument("--plain", action="store_true", help="step sections: plain model + AdamW, no engine")
    args = parser.parse_args(argv)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = dict(SIZES["smoke" if args.smoke else "full"], plain=args.plain)
    device = runtime.pick_device()[0]
    if device.type != "cuda" and not args.smoke:
        print("gpu_check: no CUDA device; run with --smoke on CPU")
        return 2
    start = time.perf_counter()
    results: dict = {}
    with runtime.single_process(seed=0):
        sections = {"env": lambda: section_env(device, size),
                    "attention": lambda: section_attention(device, size),
                    "calm_step": lambda: section_step("calm_m", device, size, results["env"]),
                    "ar_step": lambda: section_step("transformer_m", device, size, results["env"]),
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
    calm, ar = results.get("calm_step", {}), results.get("ar_step", {})
    if "tokens_per_s" in calm and "tokens_per_s" in ar:
        report(f"[compare] CALM-M / Transformer-M training tokens/s: {calm['tokens_per_s'] / ar['tokens_per_s']:.2f}x "
               f"({calm['seq_len']} vs {ar['seq_len']} tokens per sequence)")
    results["wall_s"] = time.perf_counter() - start
    (out_dir / "summary.json").write_text(json.dumps(results, indent=1, default=str))
    print("\n== gpu_check summary ==\n" + "\n".join(REPORT))
    print(f"gpu_check: {results['wall_s']:.0f} s, results in {out_dir}")
    return 1 if any(isinstance(v, dict) and "error" in v for v in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
