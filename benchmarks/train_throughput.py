"""Training throughput and MFU of the parallel engine on this machine (CPU or GPU).

    python benchmarks/train_throughput.py [--out train_throughput.json] [--steps 6] [--warmup 2]

For each model (tiny/small AR and CALM) and layout (1 process; 2 processes as DP=2 ZeRO-1 and
as TP=2) it spawns the processes (gloo on CPU, one thread each), trains random tokens through
TrainEngine and times the steps after warm-up.  MFU = model FLOP/s (calm_train.train.flops, the
same count the training log uses) / (processes x the fp32 GEMM peak of one thread, measured by
each process right after its timed steps).  Prints a table and writes JSON.  Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import statistics
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = {
    "tiny_ar": ("tiny_ar", []),
    "tiny_calm": ("tiny_calm", []),
    "small_ar": ("tiny_ar", ["model.backbone.hidden_size=256", "model.backbone.intermediate_size=688",
                             "model.backbone.num_layers=4", "model.backbone.num_heads=8"]),
    "small_calm": ("tiny_calm", ["model.backbone.hidden_size=256", "model.backbone.intermediate_size=688",
                                 "model.backbone.num_layers=4", "model.backbone.num_heads=8"]),
}
LAYOUTS = {"1proc": (1, []), "dp2_zero1": (2, ["parallel.zero_stage=1"]), "tp2": (2, ["parallel.tp=2"])}
VOCAB, SEQ, GLOBAL_BATCH, MICRO = 1024, 128, 8, 4


def build_config(model: str, layout: str):
    from calm_train.config import load_config
    name, extra = MODELS[model]
    overrides = [f"model.vocab_size={VOCAB}", f"data.seq_len={SEQ}", f"train.global_batch={GLOBAL_BATCH}",
                 f"train.micro_batch={MICRO}", "train.warmup_steps=0", *extra, *LAYOUTS[layout][1]]
    if name == "tiny_calm":
        overrides.append("model.autoencoder=random-frozen-ae")
    return load_config(name, overrides)


def worker(rank: int, world: int, port: int, model: str, layout: str, steps: int, warmup: int, out: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from calm_train.models.autoencoder import Autoencoder
    from calm_train.parallel import runtime
    from calm_train.parallel.engine import TrainEngine, build_world
    from calm_train.train.flops import measure_peak_flops
    from calm_train.train.tasks import task_for
    cfg = build_config(model, layout)
    runtime.init_distributed(cfg.parallel.tp, cfg.parallel.pp, seed=0)
    world_ = build_world(cfg)
    ae = Autoencoder(cfg.model.ae, VOCAB, cfg.model.patch_size).to(world_.device) if cfg.model.kind == "calm" else None
    engine = TrainEngine(cfg, task_for(cfg, ae), world_)
    per_rank = GLOBAL_BATCH // world_.dp_size
    gen = torch.Generator().manual_seed(world_.dp_rank)
    times = []
    for step in range(1, warmup + steps + 1):
        tokens = torch.randint(0, VOCAB, (per_rank, SEQ), generator=gen)
        start = time.perf_counter()
        engine.train_step(tokens, torch.arange(per_rank) + step * GLOBAL_BATCH, step)
        times.append(time.perf_counter() - start)
    # the MFU denominator is measured by every process right after its steps, under the same load
    peak = torch.tensor([measure_peak_flops(world_.device, torch.float32, seconds=1.0)], dtype=torch.float64)
    torch.distributed.all_reduce(peak)
    if rank == 0:
        pathlib.Path(out).write_text(json.dumps({"times": times[warmup:], "peak": float(peak) / world}))
    runtime.destroy()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="train_throughput.json")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from calm_train.train.flops import train_flops_per_token
    rows = []
    for model in MODELS:
        for layout, (world, _) in LAYOUTS.items():
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "times.json")
                torch.multiprocessing.start_processes(
                    worker, args=(world, free_port(), model, layout, args.steps, args.warmup, out), nprocs=world,
                    start_method="spawn")
                measured = json.loads(pathlib.Path(out).read_text())
            cfg = build_config(model, layout)
            step_s, peak = statistics.median(measured["times"]), measured["peak"]
            tokens_per_s = GLOBAL_BATCH * SEQ / step_s
            mfu = train_flops_per_token(cfg.model, SEQ) * tokens_per_s / (peak * world)
            rows.append({"model": model, "layout": layout, "processes": world, "step_s": step_s,
                         "tokens_per_s": tokens_per_s, "peak_flops_per_process": peak, "mfu": mfu})
            print(f"{model:11s} {layout:10s} procs={world} step {step_s:7.3f}s  {tokens_per_s:9.0f} tok/s  "
                  f"peak {peak / 1e9:6.1f} GFLOP/s/proc  MFU {100 * mfu:5.1f}%", flush=True)
    result = {"seq_len": SEQ, "global_batch": GLOBAL_BATCH,
              "micro_batch": MICRO, "vocab_size": VOCAB, "threads_per_process": 1, "rows": rows}
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
