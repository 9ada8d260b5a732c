"""The engine on one CUDA GPU: bf16 (train.dtype auto) under ZeRO 0-3 for the AR model and CALM,
the non-finite skip, a bit-exact resume, and throughput/MFU of a small model against the bf16
GEMM peak measured in the same run.

    python benchmarks/gpu_engine_check.py --out gpu_engine_check.json

Prints one line per check and writes JSON.  Needs CUDA; not a test (CI has no GPU).
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB, SEQ = 1024, 128


def config(kind: str, zero: int, small: bool):
    from calm_train.config import load_config
    overrides = [f"model.vocab_size={VOCAB}", f"data.seq_len={SEQ}", f"parallel.zero_stage={zero}",
                 "train.micro_batch=4", "train.global_batch=8", "train.warmup_steps=0"]
    if small:
        overrides += ["model.backbone.hidden_size=1024", "model.backbone.intermediate_size=2752",
                      "model.backbone.num_layers=8", "model.backbone.num_heads=16",
                      "train.micro_batch=16", "train.global_batch=32"]
    if kind == "calm":
        overrides.append("model.autoencoder=random-frozen-ae")
    return load_config(f"tiny_{kind}", overrides)


def engine_for(cfg):
    from calm_train.models.autoencoder import Autoencoder
    from calm_train.parallel.engine import TrainEngine, build_world
    from calm_train.train.tasks import task_for
    world = build_world(cfg)
    torch.manual_seed(0)
    ae = None
    if cfg.model.kind == "calm":
        ae = Autoencoder(cfg.model.ae, VOCAB, cfg.model.patch_size).to(world.device)
    return TrainEngine(cfg, task_for(cfg, ae), world), world


def batch(cfg, step: int):
    gen = torch.Generator().manual_seed(step)
    return torch.randint(0, VOCAB, (cfg.train.global_batch, SEQ), generator=gen), torch.arange(cfg.train.global_batch)


def check(kind: str, zero: int) -> dict:
    """3 bf16 steps, a skipped step with an inf weight, then save -> step / load -> step must agree."""
    cfg = config(kind, zero, small=False)
    engine, world = engine_for(cfg)
    results = [engine.train_step(*batch(cfg, s), s) for s in (1, 2, 3)]
    skipped = None
    if zero < 3:        # ZeRO-3 holds no whole weight on the module to poison
        weight = engine.model.backbone.decoder.layers[0].mlp.linear_fc2.weight
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.fill_(float("inf"))
        skipped = engine.train_step(*batch(cfg, 4), 4).skipped
        with torch.no_grad():
            weight.copy_(saved)
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, "t", {"step": 4})
        first = engine.train_step(*batch(cfg, 5), 5)
        engine, world = engine_for(cfg)
        engine.load_checkpoint(tmp, "t")
        second = engine.train_step(*batch(cfg, 5), 5)
    state = engine.state_for_export()
    return {"kind": kind, "zero": zero, "dtype": str(next(engine.model.parameters()).dtype),
            "losses": [r.loss for r in results], "norms": [r.grad_norm for r in results],
            "finite": all(math.isfinite(r.loss) and math.isfinite(r.grad_norm) for r in results),
            "skip": skipped, "resume_equal": first.loss == second.loss and first.grad_norm == second.grad_norm,
            "export_keys": len(state), "export_dtype": str(next(iter(state.values())).dtype)}


def throughput(kind: str, peak: float, steps: int = 8) -> dict:
    from calm_train.train.flops import train_flops_per_token
    cfg = config(kind, 1, small=True)
    engine, _ = engine_for(cfg)
    times = []
    for s in range(1, steps + 3):
        tokens, ids = batch(cfg, s)
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.train_step(tokens, ids, s)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_s = sorted(times[2:])[len(times[2:]) // 2]
    tokens_per_s = cfg.train.global_batch * SEQ / step_s
    return {"kind": kind, "step_s": step_s, "tokens_per_s": tokens_per_s,
            "mfu": train_flops_per_token(cfg.model, SEQ) * tokens_per_s / peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_engine_check.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from calm_train.parallel import runtime
    from calm_train.train.flops import measure_peak_flops
    if not torch.cuda.is_available():
        raise SystemExit("gpu_engine_check.py needs a CUDA GPU")
    report = {"checks": [], "throughput": []}
    with runtime.single_process(seed=0):
        report["peak_bf16_flops"] = measure_peak_flops(torch.device("cuda"), torch.bfloat16, seconds=1.0)
        for kind in ("ar", "calm"):
            for zero in (0, 1, 2, 3):
                row = check(kind, zero)
                report["checks"].append(row)
                print(json.dumps(row), flush=True)
        for kind in ("ar", "calm"):
            row = throughput(kind, report["peak_bf16_flops"])
            report["throughput"].append(row)
            print(json.dumps(row), flush=True)
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
