"""`calm-train prepare`: input text -> tokenizer -> K-aligned packed MDS shards in --out.

One process (with --workers W tokenizer/writer processes):
    calm-train prepare --input 'data/*.jsonl' --tokenizer train:32768 --out data/prepared
Split over an array of jobs (e.g. SLURM_ARRAY_TASK_ID), then one merge:
    calm-train prepare --input ... --tokenizer tok.json --out DIR --shard-index I --num-shards N
    calm-train prepare --out DIR --merge [--workers W]
The merged directory holds the same samples, byte for byte, as the single-process run.  `train:VOCAB`
cannot be trained per task: train it once with --tokenizer-only and pass DIR/tokenizer.json to the tasks.
Nothing is written into --out before the output is complete (data_prep.staging): a previous output
stays intact until the new one replaces it, and a directory of other files is refused.
--out s3://BUCKET/PREFIX prepares in a local staging directory and uploads the finished output,
dataset.json last: readers need dataset.json, so a half-uploaded dataset is never taken.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

from calm_train.data.dataset_info import DataError
from calm_train.data.tokenizer import load_tokenizer
from calm_train.errors import positive_int, run_command
from calm_train.storage.url import is_url, require_client
from data_prep.bpe import parse_train_spec, train_bpe
from data_prep.encode import Settings, run_task
from data_prep.sources import expand_inputs
from data_prep.staging import Staging
from data_prep.write import merge

SHARD_BYTES = 64 << 20


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", default=[], metavar="PATH_OR_GLOB",
                        help="JSON lines ('text' field), Parquet ('text' column) or plain text files, dirs, globs")
    parser.add_argument("--tokenizer", metavar="SPEC",
                        help="a tokenizer.json, a tiktoken BPE file (e.g. Llama 3 tokenizer.model with its "
                             "tokenizer_config.json beside it), or train:VOCAB (byte-level BPE on the input)")
    parser.add_argument("--out", required=True, metavar="DIR", help="prepared data directory, or s3://BUCKET/PREFIX "
                        "(prepared locally, then uploaded with dataset.json last)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sample, a multiple of K")
    parser.add_argument("--patch-size", type=int, default=4, help="K: documents start at multiples of K")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="fraction of documents (by content hash) for the val split "
                             "(default 0.01, or 0 with --val-input)")
    parser.add_argument("--val-input", nargs="+", default=[], metavar="PATH", help="separate validation input")
    parser.add_argument("--workers", type=positive_int, default=1, help="tokenizer / shard writer processes")
    parser.add_argument("--samples-per-shard", type=positive_int, default=None,
                        help="samples per MDS shard (default: ~64 MiB of tokens)")
    parser.add_argument("--shard-index", type=int, default=None, help="this task's index in an array of tasks")
    parser.add_argument("--num-shards", type=int, default=None, help="number of tasks in the array")
    parser.add_argument("--merge", action="store_true", help="merge the finished array tasks in --out")
    parser.add_argument("--tokenizer-only", action="store_true",
                        help="only train/copy the tokenizer into --out (for array runs with train:VOCAB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an --out that holds other files than a previous prepare output "
                             "(they are moved aside to OUT.before-prepare-TIME, not deleted)")


def run_prepare(args: argparse.Namespace) -> int:
    """The prepare command; bad arguments or input raise DataError (exit 1 in the CLI).  Prints one JSON line."""
    summary = prepare_to_url(args) if is_url(args.out) else prepare_here(args)
    print(json.dumps(summary))
    return 0


def prepare_to_url(args: argparse.Namespace) -> dict:
    """--out URL: prepared in a local staging directory, then uploaded (data/remote.py: dataset.json last)."""
    from calm_train.data.remote import upload_prepared
    from calm_train.storage import objects
    url = args.out.rstrip("/")
    require_client(url, "--out", write=True)
    if args.merge or args.tokenizer_only or args.shard_index is not None or args.num_shards is not None:
        raise DataError(f"--out {url}: array tasks, --merge and --tokenizer-only write to a directory that every task "
                        "shares. Fix: run them with a local (shared) --out DIR, or prepare in one process to the URL")
    objects.check_writable(url)                 # a missing bucket or a denied request stops before any work
    local = objects.cache_dir("prepare", url) / url.rsplit("/", 1)[-1]
    shutil.rmtree(local.parent, ignore_errors=True)     # our own leftover of an interrupted prepare
    try:
        summary = prepare_here(argparse.Namespace(**{**vars(args), "out": str(local), "overwrite": False}))
        start = time.time()
        uploaded = upload_prepared(local, url, lambda m: print(f"calm-train prepare: {m}", file=sys.stderr))
    finally:
        shutil.rmtree(local.parent, ignore_errors=True)
    return {**summary, "out": url, "uploaded_mb": round(uploaded / 1e6, 3), "upload_s": round(time.time() - start, 2)}


def prepare_here(args: argparse.Namespace) -> dict:
    """Prepare into the local --out; the summary printed as JSON."""
    stage = Staging(args.out)
    stage.recover()
    start = time.time()
    if args.merge:
        stage.check(args.overwrite)
        info = merge(stage.root, stage.begin(), workers=args.workers)
        stage.commit()
        return {"out": args.out, "splits": info.splits, "wall_s": round(time.time() - start, 2)}
    if not args.input or not args.tokenizer:
        raise DataError("--input and --tokenizer are required (except with --merge)")
    if args.seq_len < 1 or args.patch_size < 1 or args.seq_len % args.patch_size:
        raise DataError(f"--seq-len {args.seq_len} is not a positive multiple of --patch-size {args.patch_size}")
    array = args.shard_index is not None or args.num_shards is not None
    num_shards = args.num_shards or 1
    index = args.shard_index or 0
    if array and not (args.shard_index is not None and args.num_shards and 0 <= index < num_shards):
        raise DataError("--shard-index I and --num-shards N go together, with 0 <= I < N")
    val_fraction = args.val_fraction if args.val_fraction is not None else (0.0 if args.val_input else 0.01)
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction} is not in [0, 1)")
    vocab = parse_train_spec(args.tokenizer)
    if vocab is not None and array and not args.tokenizer_only:
        raise DataError("train:VOCAB is trained once, not per task. Fix: run prepare --tokenizer-only first "
                        "(into its own --out DIR), then pass --tokenizer DIR/tokenizer.json to every task")
    stage.check(args.overwrite, tokenizer_only=args.tokenizer_only)
    inputs = expand_inputs(args.input)
    val_inputs = expand_inputs(args.val_input) if args.val_input else []

    new = stage.begin() if args.tokenizer_only or not array else None
    if vocab is not None:
        (new / "tokenizer.json").write_bytes(train_bpe(inputs, vocab))
        tokenizer = load_tokenizer(new / "tokenizer.json")
    else:
        tokenizer = load_tokenizer(args.tokenizer)
    if args.tokenizer_only:
        tokenizer.save(new)
        stage.commit()
        return {"tokenizer": str(pathlib.Path(args.out) / tokenizer.main), "vocab_size": tokenizer.vocab_size}

    per_shard = args.samples_per_shard or max(1, SHARD_BYTES // (4 * args.seq_len))
    settings = Settings(seq_len=args.seq_len, patch_size=args.patch_size, val_fraction=val_fraction,
                        samples_per_shard=per_shard, inputs=inputs, val_inputs=val_inputs,
                        num_shards=num_shards, tokenizer_sha256=tokenizer.sha256)
    if not array:
        stage.clear_work()                          # a single process is the whole array: no other task's work
    run_task(stage.root, settings, tokenizer, index, args.workers)
    if array:
        return {"task": index, "num_shards": num_shards, "wall_s": round(time.time() - start, 2)}
    info = merge(stage.root, new, workers=args.workers, tokenizer=tokenizer)
    stage.commit()
    return {"out": args.out, "splits": info.splits, "documents": info.documents,
            "text_mb": round(info.text_bytes / 1e6, 3), "wall_s": round(time.time() - start, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prepare_arguments(parser)
    return run_command("prepare", run_prepare, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
