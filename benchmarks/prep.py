"""Data-prep throughput: `calm-train prepare` vs a plain HF `datasets.map` tokenising baseline, and
TokenLoader samples/s.  MB/s per core = MB of input text / CPU seconds (user + sys of the process and
its children), which stays meaningful on a shared machine; wall-clock rates are printed beside it,
and the load average (`uptime`) before and after is recorded.

    python benchmarks/prep.py [--input FILE.jsonl] [--repeat 8] [--large 4] [--workers 1] [--reps 2]
                              [--out bench_out/prep.json]

Default input: ../shared/data/wikitext/wikitext_document_level-test.json beside the checkout, repeated
--repeat times, and --large times more for the big run.  Rows:
  end to end      one `python -m data_prep.cli` process (start-up included: ~0.2 CPU s);
  steady state    (big run - small run): the CPU cost of each further MB, what a corpus of GBs sees;
  minus start-up  small run - a run of 1 document;
Each prepare row is the best (least CPU) of --reps runs.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DEFAULT_INPUT = SHARED / "wikitext" / "wikitext_document_level-test.json"
LLAMA3 = SHARED / "llama3_tokenizer" / "tokenizer.model"


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_prepare(args: list[str], reps: int = 1) -> tuple[float, float]:
    """Wall and CPU seconds of a `python -m data_prep.cli` run: the least CPU of `reps` runs."""
    best = (float("inf"), float("inf"))
    for _ in range(reps):
        cpu0, t0 = _children_cpu(), time.perf_counter()
        subprocess.run([sys.executable, "-m", "data_prep.cli", *args], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
        best = min(best, (_children_cpu() - cpu0, time.perf_counter() - t0))
    return best[1], best[0]


def datasets_map_baseline(path: pathlib.Path, tokenizer_json: pathlib.Path, cache: pathlib.Path) -> tuple[float, float]:
    """load_dataset('json') + batched map with HF tokenizers (encode_batch_fast, one thread), one process."""
    os.environ["HF_HOME"] = str(cache)
    import datasets
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    cpu0, t0 = _self_cpu(), time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache))
    out = ds.map(lambda b: {"ids": [e.ids for e in tok.encode_batch_fast(b["text"])]}, batched=True,
                 batch_size=256, remove_columns=ds.column_names)
    assert len(out) == len(ds)
    return time.perf_counter() - t0, _self_cpu() - cpu0


def encode_only(path: pathlib.Path, tokenizer_path) -> tuple[float, float]:
    """The prepare tokenizer's own encode over the docs, no I/O (what one worker does per chunk)."""
    from calm_train.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    docs = [json.loads(line)["text"] for line in path.open()]
    cpu0, t0 = _self_cpu(), time.perf_counter()
    for doc in docs:
        tok.encode_array(doc)
    return time.perf_counter() - t0, _self_cpu() - cpu0


def loader_rate(data_dir: pathlib.Path, batch: int, workers: int) -> dict:
    from calm_train.data.loader import TokenLoader

    loader = TokenLoader(data_dir, "train", batch_size=batch, dp_rank=0, dp_size=1, seed=0, num_workers=workers)
    n, t0 = 0, time.perf_counter()
    for b in loader:
        if loader.epoch > 0:
            break
        n += len(b["sample_ids"])
    wall = time.perf_counter() - t0
    seq = loader.info.seq_len
    loader.close()
    return {"samples": n, "wall_s": round(wall, 2), "samples_per_s": round(n / wall, 1),
            "tokens_per_s": round(n * seq / wall)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=str(DEFAULT_INPUT), help="JSON lines with a 'text' field")
    p.add_argument("--repeat", type=int, default=8, help="concatenate the input this many times")
    p.add_argument("--large", type=int, default=4, help="the big run repeats the input --repeat x --large times")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--reps", type=int, default=2, help="runs per prepare row (the least CPU counts)")
    p.add_argument("--vocab", type=int, default=8192, help="train:VOCAB tokenizer shared by both pipelines")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--out", default="bench_out/prep.json")
    args = p.parse_args(argv)
    if not pathlib.Path(args.input).is_file():
        print(f"input {args.input} not found: pass --input FILE.jsonl", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ["RAYON_NUM_THREADS"] = "1"
    load_before = os.getloadavg()
    work = pathlib.Path(tempfile.mkdtemp(prefix="calm_prep_bench_"))
    lines = pathlib.Path(args.input).read_text().splitlines(keepends=True)
    big_repeat = args.repeat * args.large
    src, big = work / "input.jsonl", work / "big.jsonl"
    src.write_text("".join(lines * args.repeat))
    big.write_text("".join(lines * big_repeat))
    mb1 = sum(len(json.loads(line)["text"].encode()) for line in lines) / 1e6

    rows = []

    def row(name, mb, wall, cpu, cores):
        rows.append({"pipeline": name, "text_mb": round(mb, 2), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                     "mb_per_s_per_core": round(mb / cpu, 2), "mb_per_s_wall": round(mb / wall, 2), "cores": cores})

    def prepare(path, tokenizer, name, workers=args.workers):
        return run_prepare(["--input", str(path), "--seq-len", str(args.seq_len), "--workers", str(workers),
                            "--tokenizer", str(tokenizer), "--out", str(work / name)], args.reps)

    wall, cpu = run_prepare(["--input", str(src), "--tokenizer", f"train:{args.vocab}", "--out", str(work / "tok"),
                             "--tokenizer-only"])
    row(f"train:{args.vocab} (BPE training only)", mb1 * args.repeat, wall, cpu, 1)
    tok_json = work / "tok" / "tokenizer.json"
    small = prepare(src, tok_json, "bpe")
    row(f"prepare x{args.repeat}, BPE {args.vocab} via tiktoken ranks", mb1 * args.repeat, *small, args.workers)
    large = prepare(big, tok_json, "bpe_big")
    row(f"prepare x{big_repeat}, same", mb1 * big_repeat, *large, args.workers)
    row(f"  steady state (x{big_repeat} - x{args.repeat})", mb1 * (big_repeat - args.repeat),
        large[0] - small[0], large[1] - small[1], args.workers)
    (work / "one.jsonl").write_text(lines[0])
    one = prepare(work / "one.jsonl", tok_json, "one")
    row(f"  minus start-up (x{args.repeat} - 1 document)", mb1 * args.repeat, small[0] - one[0],
        small[1] - one[1], args.workers)
    if args.workers == 1:
        row(f"prepare x{big_repeat}, --workers 2", mb1 * big_repeat, *prepare(big, tok_json, "bpe_w2", 2), 2)
    if LLAMA3.is_file():
        row(f"prepare x{args.repeat}, Llama 3 tiktoken", mb1 * args.repeat, *prepare(src, LLAMA3, "llama3"),
            args.workers)
    row(f"encode only, BPE {args.vocab} (tiktoken)", mb1 * args.repeat, *encode_only(src, tok_json), 1)
    row(f"datasets.map + tokenizers, BPE {args.vocab}", mb1 * args.repeat,
        *datasets_map_baseline(src, tok_json, work / "hf"), 1)
    loader = {f"workers={w}": loader_rate(work / "bpe", 16, w) for w in (0, 2)}
    load_after = os.getloadavg()
    shutil.rmtree(work)

    print(f"{'pipeline':48s} {'text MB':>8s} {'wall s':>8s} {'CPU s':>8s} {'MB/s/core':>10s} {'MB/s wall':>10s}")
    for r in rows:
        print(f"{r['pipeline']:48s} {r['text_mb']:8.2f} {r['wall_s']:8.2f} {r['cpu_s']:8.2f} "
              f"{r['mb_per_s_per_core']:10.2f} {r['mb_per_s_wall']:10.2f}")
    for name, r in loader.items():
        print(f"TokenLoader {name}, batch 16, seq {args.seq_len}: {r['samples_per_s']} samples/s, "
              f"{r['tokens_per_s']} tokens/s ({r['samples']} samples)")
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}, on {os.cpu_count()} CPUs")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "prepare": rows, "loader": loader, "cpus": os.cpu_count(),
                               "load_before": load_before, "load_after": load_after}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
