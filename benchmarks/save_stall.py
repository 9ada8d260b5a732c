"""How long a checkpoint save stalls training: train.async_save=false vs true, through the real training loop.

    python benchmarks/save_stall.py [--config transformer_s] [--steps 12] [--save-every 4] [--repeats 2]
                                    [--seq-len 128] [--vocab 8192] [--workdir DIR] [--set key=value ...] [--out FILE]

Prepares the embedded corpus once (byte-level BPE of --vocab tokens, --seq-len), then runs
`calm-train train CONFIG` (one process, OMP_NUM_THREADS=1, micro = global batch 2) for --steps steps with a
save every --save-every steps, synchronous and asynchronous in turn (--repeats times each).  From
metrics.jsonl (the loop writes, in the row after a save, how long `Run.save` blocked training):

  step s      median step_s of the steps (the plain step)
  stall s     save_stall_s: wall seconds the save blocked the training loop
  stall cpu s save_stall_cpu_s: CPU seconds of the training thread in the save (steady under machine load:
              it excludes waiting for a core; it also excludes waiting for the disk)
  interval s  the excess of the whole save interval (the time between the rows of the save step and of the
              next save step, from elapsed_s) over that many plain steps: the save's full cost to training
              time, including a background writer competing for the CPU
  peak GiB    the process's peak memory (metrics.jsonl peak_mem_gib): the async save's host copy

The saves inside the loop (not the final one) are measured.  The run directories live under --workdir and
are deleted afterwards.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile

import common  # first: it sets the environment before anything imports DeepSpeed

REPO = pathlib.Path(__file__).resolve().parents[1]


def calm_train(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "calm_train", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"calm-train {' '.join(args)} exited {proc.returncode}\n{proc.stderr[-4000:]}")


def prepare(workdir: pathlib.Path, seq_len: int, vocab: int) -> pathlib.Path:
    from data_prep.corpus import write_corpus_jsonl
    corpus = write_corpus_jsonl(workdir / "corpus.jsonl")
    calm_train("prepare", "--input", str(corpus), "--tokenizer", f"train:{vocab}", "--out", str(workdir / "data"),
               "--seq-len", str(seq_len), "--patch-size", "4", "--val-fraction", "0")
    return workdir / "data"


def measure(args, data: pathlib.Path, workdir: pathlib.Path, asynchronous: bool) -> dict:
    run = pathlib.Path(tempfile.mkdtemp(prefix="stall_", dir=workdir))
    try:
        calm_train("train", args.config, f"run_dir={run}", f"data.train={data}", f"train.steps={args.steps}",
                   f"train.save_every={args.save_every}", "train.micro_batch=2", "train.global_batch=2",
                   "train.eval_every=0", "train.warmup_steps=0", "train.keep_last=1", "logging.progress=false",
                   f"train.async_save={str(asynchronous).lower()}", *args.set)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
        files = json.loads((latest / "manifest.json").read_text())["files"]
        checkpoint_bytes = sum(size for size, _ in files.values())
    finally:
        shutil.rmtree(run, ignore_errors=True)
    by_step = {r["step"]: r for r in rows}
    plain = statistics.median(r["step_s"] for r in rows)
    saves = list(range(args.save_every, args.steps, args.save_every))
    stalls = [by_step[s + 1]["save_stall_s"] for s in saves]
    cpu = [by_step[s + 1]["save_stall_cpu_s"] for s in saves]
    costs = [by_step[s + args.save_every]["elapsed_s"] - by_step[s]["elapsed_s"] - args.save_every * plain
             for s in saves if s + args.save_every < args.steps]
    return {"mode": "async" if asynchronous else "sync", "step_s": plain, "stall_s": statistics.median(stalls),
            "stall_cpu_s": statistics.median(cpu), "stalls_s": stalls, "stalls_cpu_s": cpu,
            "interval_s": statistics.median(costs) if costs else None, "intervals_s": costs,
            "peak_mem_gib": max(r["peak_mem_gib"] for r in rows), "checkpoint_mib": checkpoint_bytes / common.MIB,
            "saves_measured": len(saves)}


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__, "save_stall")
    parser.add_argument("--config", default="transformer_s")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--workdir", default="bench_out", help="where data and run directories are made (then deleted)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    args = parser.parse_args(argv)
    base = pathlib.Path(args.workdir)
    base.mkdir(parents=True, exist_ok=True)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="save_stall_", dir=base.resolve()))
    try:
        data = prepare(workdir, args.seq_len, args.vocab)
        runs = []
        for repeat in range(args.repeats):
            for asynchronous in (False, True):          # in turn: a change of machine load falls on both alike
                runs.append({"repeat": repeat, **measure(args, data, workdir, asynchronous)})
                print(f"  {runs[-1]['mode']}: step {runs[-1]['step_s']:.2f} s, stall {runs[-1]['stall_s']:.2f} s "
                      f"({runs[-1]['stall_cpu_s']:.2f} s CPU)", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = []
    for mode in ("sync", "async"):
        mine = [r for r in runs if r["mode"] == mode]
        rows.append({"mode": mode, "config": args.config, "checkpoint_mib": mine[0]["checkpoint_mib"],
                     **{key: statistics.median(r[key] for r in mine if r[key] is not None)
                        for key in ("step_s", "stall_s", "stall_cpu_s", "interval_s", "peak_mem_gib")},
                     "saves_measured": sum(r["saves_measured"] for r in mine)})
    info = common.machine()
    table = common.print_table(rows, [
        ("mode", "save", "s"), ("checkpoint_mib", "ckpt MiB", ".0f"), ("step_s", "step s", ".2f"),
        ("stall_s", "stall s", ".2f"), ("stall_cpu_s", "stall cpu s", ".2f"), ("interval_s", "interval s", ".2f"), ("peak_mem_gib", "peak GiB", ".2f"),
        ("saves_measured", "saves", "d")],
        title=f"save stall [{args.config}, seq {args.seq_len}, vocab {args.vocab}, batch 2, 1 thread] on "
              f"{info['device']}, load {info['load_avg_1_5_15'][0]:.1f}")
    common.write_json(args.out, {"benchmark": "save_stall", "machine": info, "rows": rows, "runs": runs,
                                 "table": table, "argv": sys.argv[1:] if argv is None else argv})
    return 0


if __name__ == "__main__":
    sys.exit(main())
