"""Training-step variants of the GPU check: today's settings (baseline) against the speed switches.

A variant is a list of config overrides on top of the model's config (calm_m or transformer_m at the
check's sizes).  Every variant trains the same global batch (the same sequences and sample ids, hence
the same noise draws) from the same initial weights, so the losses of the first steps agree up to bf16
rounding; `compare_losses` checks it against LOSS_TOLERANCE.

    baseline      model.attention=sdpa, perf.compile=off, perf.fused_adamw=off, micro-batch 4 x 4 accumulation
    +fused AdamW  perf.fused_adamw=on
    +flash-attn-4 model.attention=flash
    +micro-batch  the largest micro-batch of the check's candidates that fits, same global batch (fewer
                  accumulation steps); candidates whose peak memory, extrapolated from the baseline's, would
                  exceed MEMORY_FRACTION of the GPU are not tried (an out-of-memory error after a compilation
                  costs a minute)
    +compile      perf.compile=on
    optimised     all of them, attention auto (flash-attn-4 when it imports, else SDPA: the row says which);
                  if it fails, FALLBACKS in turn, so that one run gives the table

Each run: a fresh torch.compile state (torch._dynamo.reset: every variant compiles for its own static shapes),
build the engine (TrainEngine: DeepSpeed ZeRO-1, bf16 with fp32 master weights), `warmup` steps (torch.compile
and flash-attn-4 compile their kernels here), `steps` timed steps back to back, peak memory.
"""
from __future__ import annotations

import math
import time
import traceback

import torch
import torch._dynamo
from common import sync

from calm_train.config import load_config
from calm_train.models.autoencoder import Autoencoder
from calm_train.parallel import runtime
from calm_train.parallel.engine import TrainEngine, build_world
from calm_train.train.flops import train_flops_per_token
from calm_train.train.tasks import task_for

GIB = 2 ** 30
MEMORY_FRACTION = 0.85
# bf16 tolerance of "optimised == baseline": the largest |loss - baseline loss| / baseline loss over the first
# steps (warm-up included).  Step 1 sees identical weights (only kernel rounding differs); later steps add
# the rounding of different gradient sums (micro-batch 16 vs 4 x 4 accumulation) through AdamW.
LOSS_TOLERANCE = 2e-2
BASELINE = ["model.attention=sdpa", "perf.compile=off", "perf.fused_adamw=off", "perf.recompute=off"]
LEVERS = {
    "+fused AdamW": ["perf.fused_adamw=on"],
    "+flash-attn-4": ["model.attention=flash"],
    "+micro-batch": [],                       # micro-batch search only
    "+compile": ["perf.compile=on"],
}
OPTIMISED = ["model.attention=auto", "perf.compile=on", "perf.fused_adamw=on", "perf.recompute=off"]
# tried in turn only when the optimised run fails (one GPU run must give the table): without flash-attn-4, then
# also without compilation
FALLBACKS = {"optimised (sdpa)": OPTIMISED + ["model.attention=sdpa"],
             "optimised (sdpa, eager)": OPTIMISED + ["model.attention=sdpa", "perf.compile=off"]}


def variants(ladder: bool) -> dict[str, tuple[list[str], bool]]:
    """name -> (overrides, search the largest micro-batch); baseline first, optimised second, then the ladder."""
    out = {"baseline": (BASELINE, False), "optimised": (OPTIMISED, True)}
    if ladder:
        out.update({name: (BASELINE + extra, name == "+micro-batch") for name, extra in LEVERS.items()})
    return out


def fitting_micro(candidates: tuple[int, ...], baseline: dict, total_gib: float | None) -> tuple[int, ...]:
    """The candidates whose peak, extrapolated linearly in the micro-batch from the baseline's (memory after the
    engine's build + activations x micro / baseline micro), is within MEMORY_FRACTION of the GPU; the smallest
    always.  Without a baseline's memory (CPU, or a failed baseline) all of them."""
    peak, static, micro = (baseline.get(k) for k in ("peak_memory_gib", "allocated_after_build_gib", "micro_batch"))
    if None in (peak, static, micro, total_gib):
        return tuple(candidates)
    fits = [m for m in candidates if static + (peak - static) * m / micro <= MEMORY_FRACTION * total_gib]
    return tuple(fits) or (min(candidates),)


def reset_memory(device: torch.device) -> float | None:
    import gc
    gc.collect()
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / GIB


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def step_config(name: str, size: dict, micro: int, overrides: list[str], device: torch.device):
    kind_overrides, seq = [], size["ar_seq"]
    if name == "calm_m":     # the AE is built in place (random, frozen): the path is never read
        kind_overrides, seq = ["model.autoencoder=random-frozen", *size["calm_overrides"]], size["calm_seq"]
    global_batch = size["micro"] * size["accumulation"]
    return load_config(name, [f"model.vocab_size={size['vocab']}", f"data.seq_len={seq}", f"train.micro_batch={micro}",
                              f"train.global_batch={global_batch}", "train.warmup_steps=0",
                              f"train.dtype={'bf16' if device.type == 'cuda' else 'fp32'}",
                              *size["overrides"], *kind_overrides, *overrides])


def build_engine(cfg, device: torch.device) -> TrainEngine:
    runtime.init_distributed(tp=1, pp=1, seed=cfg.train.seed)
    autoencoder = None
    if cfg.model.kind == "calm":   # random frozen AE of the configured (paper's) size, fp32 as load_frozen_autoencoder
        torch.manual_seed(1)
        m = cfg.model
        autoencoder = Autoencoder(m.ae, m.vocab_size, m.patch_size).requires_grad_(False).eval().to(device)
    return TrainEngine(cfg, task_for(cfg, autoencoder), build_world(cfg))


def batch(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return (torch.randint(0, cfg.model.vocab_size, (cfg.train.global_batch, cfg.data.seq_len), generator=gen),
            torch.arange(cfg.train.global_batch))


def run_variant(name: str, variant: str, overrides: list[str], candidates: tuple[int, ...], device: torch.device,
                size: dict, peaks: dict, profile=None) -> dict:
    """Build and time one variant at the first micro-batch of `candidates` that fits (an out-of-memory error moves
    to the next).  `profile(engine, batch, first_step)` runs after the timing."""
    errors = []
    for micro in candidates:
        torch._dynamo.reset()     # compile each variant afresh, for its own static shapes (as a new process would)
        before_build = reset_memory(device)
        engine = None
        try:
            cfg = step_config(name, size, micro, overrides, device)
            t0 = time.perf_counter()
            engine = build_engine(cfg, device)
            out = {"variant": variant, "overrides": overrides, "engine": engine.describe(),
                   "build_s": time.perf_counter() - t0, "oom": errors}
            out.update(time_steps(engine, cfg, device, size, peaks, before_build))
            if profile is not None:
                out["profile"] = profile(engine, batch(cfg), size["warmup"] + size["steps"] + 1)
            return out
        except torch.cuda.OutOfMemoryError as exc:
            errors.append(f"micro_batch {micro}: out of memory: {str(exc).splitlines()[0][:200]}")
            print(f"[{name} {variant}] {errors[-1]}; trying a smaller micro-batch", flush=True)
        except Exception as exc:                              # noqa: BLE001 - recorded, the next variant runs
            traceback.print_exc()
            return {"variant": variant, "overrides": overrides, "micro_batch": micro,
                    "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
        finally:
            engine = None
            reset_memory(device)
    return {"variant": variant, "overrides": overrides, "error": f"no micro-batch fits: {errors}"}


def time_steps(engine: TrainEngine, cfg, device: torch.device, size: dict, peaks: dict,
               before_build: float | None) -> dict:
    """warmup + steps optimizer steps on one fixed batch.  The warm-up steps (compilation) are timed one by
    one; the others back to back with one synchronisation at the end, as a training loop that reads the loss
    only at log steps runs them (the host enqueues the next step while the GPU finishes this one)."""
    t, seq = cfg.train, cfg.data.seq_len
    tokens_BL, sample_ids = batch(cfg)
    after_build = reset_memory(device)
    results, first_steps_s = [], []
    for step in range(1, size["warmup"] + 1):
        sync(device)
        t0 = time.perf_counter()
        results.append(engine.train_step(tokens_BL, sample_ids, step))
        sync(device)
        first_steps_s.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for step in range(size["warmup"] + 1, size["warmup"] + size["steps"] + 1):
        results.append(engine.train_step(tokens_BL, sample_ids, step))
    sync(device)
    step_s = (time.perf_counter() - t0) / size["steps"]
    losses = [r.loss for r in results]             # read after the timing: no host sync inside it
    tokens_per_s = t.global_batch * seq / step_s
    flops_per_token = train_flops_per_token(cfg.model, seq)
    achieved = flops_per_token * tokens_per_s
    peak = peak_gib(device)
    out = {"kind": cfg.model.kind, "seq_len": seq, "micro_batch": t.micro_batch, "global_batch": t.global_batch,
           "accumulation": t.global_batch // t.micro_batch, "first_steps_s": first_steps_s,
           "step_s": step_s, "timed_steps": size["steps"], "tokens_per_s": tokens_per_s,
           "flops_per_token": flops_per_token, "achieved_tflops": achieved / 1e12,
           "mfu_vs_spec": achieved / peaks["peak_spec"] if peaks.get("peak_spec") else None,
           "peak_spec_tflops": peaks["peak_spec"] / 1e12 if peaks.get("peak_spec") else None,
           "allocated_before_build_gib": before_build, "allocated_after_build_gib": after_build,
           "peak_memory_gib": peak, "losses": losses, "losses_finite": all(math.isfinite(x) for x in losses),
           "skipped": [r.skipped for r in results], "params": sum(p.numel() for p in engine.model.parameters())}
    for key in ("peak_measure_peak_flops", "peak_gemm_large"):
        out[f"mfu_vs_{key[5:]}"] = achieved / peaks[key] if peaks.get(key) else None
    return out


def compare_losses(row: dict, baseline: dict) -> dict:
    """|loss - baseline| / |baseline| per step, its maximum, and whether it is within LOSS_TOLERANCE."""
    if "losses" not in row or "losses" not in baseline:
        return {}
    rel = [abs(a - b) / abs(b) for a, b in zip(row["losses"], baseline["losses"])]
    worst = max(rel) if rel and all(math.isfinite(x) for x in rel) else math.inf
    return {"loss_rel_diff": rel, "loss_rel_diff_step1": rel[0] if rel else None, "loss_rel_diff_max": worst,
            "loss_within_tolerance": worst <= LOSS_TOLERANCE, "loss_tolerance": LOSS_TOLERANCE}
