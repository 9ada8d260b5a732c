"""Checkpoint save and load time and bytes on disk vs model size, through the project's checkpoint path.

    python benchmarks/checkpoint.py [--sizes 64:2 256:4 512:8] [--kind calm|ar] [--vocab V]
                                    [--workdir DIR] [--set key=value ...] [--out FILE]

For each backbone size HIDDEN:LAYERS (MLP width 8/3 x hidden rounded to 16, head dim 32), in one
process (a world of one, ZeRO stage of the config): TrainEngine takes one optimizer step on random
tokens (so the AdamW state exists), then a save as the training loop writes it
(calm_train/train/loop.py Run.save) through calm_train.train.checkpoint.CheckpointManager:

  export     engine.state_for_export(): the full fp32 model gathered for model.safetensors
  optim export  reshard.optimizer_export(): the full Adam moments gathered for optimizer.safetensors
  safetensors  model.safetensors, optimizer.safetensors (plus autoencoder.safetensors for CALM)
  rest       rng/rank_00000.safetensors, state.json
  finalize   the manager's work after the files: sha256 of every file, fsync, manifest, rename, latest

then one more step (the weights move away from the saved ones) and a load as a resumed run and
`eval`/`generate` read it:

  verify     verify_checkpoint with hashes (sizes + sha256 of every file against the manifest)
  restore    calm_train.train.reshard.restore, what every resume runs (any layout): the layout-free
             weights + Adam moments + counters + RNG into the built engine; the restored weights are
             compared with the saved model.safetensors (`restored_exact`)
  safetensors  safetensors.torch.load_file of model.safetensors (what eval and generate read)

Bytes on disk per part.  The run directories live under --workdir and are deleted afterwards.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import sys
import tempfile
import time

import common  # first: it sets the environment before anything imports DeepSpeed
import torch
from safetensors.torch import load_file, save_file

from calm_train.config import load_config
from calm_train.models.autoencoder import Autoencoder
from calm_train.parallel import runtime
from calm_train.parallel.engine import TrainEngine, build_world
from calm_train.convert.native import save_autoencoder_file, verify_checkpoint
from calm_train.train.checkpoint import CheckpointManager, load_rng_state, rng_file, save_rng_state
from calm_train.train.loop import Progress
from calm_train.train.reshard import (OPTIMIZER_FILE, engine_counters, layout_of, optimizer_export, restore,
                                      write_optimizer)
from calm_train.train.tasks import task_for

SEQ_LEN, BATCH = 64, 2


def build_config(args, hidden: int, layers: int, run_dir: pathlib.Path):
    base = {"calm": "tiny_calm", "ar": "tiny_ar"}[args.kind]
    intermediate = round(hidden * 8 / 3 / 16) * 16
    return load_config(base, [f"run_dir={run_dir}", f"model.vocab_size={args.vocab}",
                              f"model.backbone.hidden_size={hidden}", f"model.backbone.intermediate_size={intermediate}",
                              f"model.backbone.num_layers={layers}", f"model.backbone.num_heads={max(1, hidden // 32)}",
                              f"data.seq_len={SEQ_LEN}", f"train.micro_batch={BATCH}", f"train.global_batch={BATCH}",
                              "train.warmup_steps=0", "train.keep_last=1", "model.autoencoder=random-frozen", *args.set])


def directory_bytes(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def measure(args, hidden: int, layers: int, workdir: pathlib.Path) -> dict:
    run_dir = pathlib.Path(tempfile.mkdtemp(prefix=f"ckpt_{hidden}x{layers}_", dir=workdir))
    cfg = build_config(args, hidden, layers, run_dir)
    m = cfg.model
    try:
        with runtime.single_process(seed=0):
            world = build_world(cfg)
            autoencoder = None
            if m.kind == "calm":
                torch.manual_seed(1)
                autoencoder = Autoencoder(m.ae, m.vocab_size, m.patch_size, m.init_std).to(world.device)
            engine = TrainEngine(cfg, task_for(cfg, autoencoder), world)
            tokens_BL = torch.randint(0, m.vocab_size, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
            ids = torch.arange(BATCH)
            engine.train_step(tokens_BL, ids, 1)
            times: dict[str, float] = {}
            export, times["save_export_s"] = timed(engine.state_for_export)
            (moments, moments_metadata), times["save_export_optimizer_s"] = timed(lambda: optimizer_export(engine))

            layout = layout_of(cfg, 1)

            def write(directory: pathlib.Path) -> None:
                def consolidated():
                    save_file({k: v.contiguous() for k, v in export.items()}, str(directory / "model.safetensors"))
                    write_optimizer(directory, moments, moments_metadata)
                    if autoencoder is not None:
                        save_autoencoder_file(autoencoder, directory)
                _, times["save_safetensors_s"] = timed(consolidated)

                def rest():
                    save_rng_state(rng_file(directory, 0))
                    (directory / "state.json").write_text(json.dumps({
                        "progress": {"step": 1}, "engine": engine_counters(engine), "layout": layout}))
                _, times["save_rest_s"] = timed(rest)

            manager = CheckpointManager(run_dir, keep_last=1, log=lambda message: None)
            path, manager_s = timed(lambda: manager.save(1, write, {"kind": m.kind}))
            written = sum(times[k] for k in ("save_safetensors_s", "save_rest_s"))
            times["save_finalize_s"] = manager_s - written
            times["save_total_s"] = manager_s + times["save_export_s"] + times["save_export_optimizer_s"]

            engine.train_step(tokens_BL, ids, 2)
            _, times["load_verify_s"] = timed(lambda: verify_checkpoint(path, hashes=True))
            saved_state = json.loads((path / "state.json").read_text())
            _, times["load_restore_s"] = timed(lambda: restore(engine, path, saved_state, layout, cfg, Progress(step=1),
                                                               load_rng_state(rng_file(path, 0))))
            saved, times["load_safetensors_s"] = timed(lambda: load_file(str(path / "model.safetensors")))
            times["load_total_s"] = times["load_verify_s"] + times["load_restore_s"]
            exact = equal(saved, engine.state_for_export())
            params = sum(v.numel() for v in export.values())
        total = directory_bytes(path)
        safetensors_bytes = (path / "model.safetensors").stat().st_size
        optimizer_bytes = (path / OPTIMIZER_FILE).stat().st_size
        return {"size": f"{hidden}:{layers}", "kind": m.kind, "zero_stage": cfg.parallel.zero_stage, "hidden": hidden,
                "layers": layers, "params": params, "fp32_model_mib": 4 * params / common.MIB, "bytes_total": total,
                "bytes_model_safetensors": safetensors_bytes, "bytes_optimizer_safetensors": optimizer_bytes,
                "bytes_other": total - safetensors_bytes - optimizer_bytes,
                "bytes_per_param": total / params, "mib_total": total / common.MIB,
                "save_mib_per_s": total / common.MIB / times["save_total_s"], "restored_exact": exact, **times}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__, "checkpoint")
    parser.add_argument("--sizes", nargs="+", default=["64:2", "256:4", "512:8"], metavar="HIDDEN:LAYERS")
    parser.add_argument("--kind", choices=("calm", "ar"), default="calm")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--workdir", default="bench_out", help="where the run directories are made (then deleted)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    args = parser.parse_args(argv)
    common.apply_threads(args.threads)
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        hidden, layers = (int(x) for x in size.split(":"))
        rows.append(measure(args, hidden, layers, workdir))
        print(f"  {size}: save {rows[-1]['save_total_s']:.2f} s, load {rows[-1]['load_total_s']:.2f} s, "
              f"{rows[-1]['mib_total']:.1f} MiB", flush=True)
    info = common.machine()
    table = common.print_table(rows, [
        ("size", "H:L", "s"), ("params", "params", ",d"), ("mib_total", "MiB on disk", ".1f"),
        ("bytes_per_param", "B/param", ".1f"),
        ("bytes_model_safetensors", "model.st B", ",d"), ("bytes_optimizer_safetensors", "optim.st B", ",d"),
        ("save_export_s", "export s", ".3f"), ("save_export_optimizer_s", "optim export s", ".3f"),
        ("save_safetensors_s", "st write s", ".3f"), ("save_finalize_s", "hash+fsync s", ".3f"),
        ("save_total_s", "save s", ".3f"), ("load_verify_s", "verify s", ".3f"), ("load_restore_s", "restore s", ".3f"),
        ("load_total_s", "load s", ".3f"), ("restored_exact", "exact", ""), ("load_safetensors_s", "st read s", ".3f")],
        title=f"checkpoint [{args.kind}, vocab {args.vocab}, ZeRO-{rows[0]['zero_stage']}] on {info['device']}, "
              f"load {info['load_avg_1_5_15'][0]:.1f}")
    common.write_json(args.out, {"benchmark": "checkpoint", "machine": info, "rows": rows, "table": table,
                                 "argv": sys.argv[1:] if argv is None else argv})
    return 0 if all(row["restored_exact"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
