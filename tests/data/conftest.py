"""Fixtures for loader tests: a small prepared directory and one pool of spawned gloo ranks."""
import json
import multiprocessing
import os
import pathlib
import socket
import sys
import traceback

import pytest

HERE = pathlib.Path(__file__).parent
SEQ_LEN, K, SAMPLES_MULTIPLE = 128, 4, 16


def topic_docs() -> list[str]:
    from pydoc_data import topics
    return [topics.topics[k] for k in sorted(topics.topics)]


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> pathlib.Path:
    """pydoc topics with a byte-level BPE of 400, seq_len 128, K=4, 24 samples per shard, no val split.

    Just enough topics are taken for a sample count divisible by 16, so dp=2 epochs split evenly
    into batches for 0 or 2 loader workers.
    """
    from calm_train.data.tokenizer import load_tokenizer
    from data_prep.cli import main
    from data_prep.packing import packed_length

    root = tmp_path_factory.mktemp("prepared")
    docs = topic_docs()
    write_jsonl(root / "all.jsonl", docs[:20])
    assert main(["--input", str(root / "all.jsonl"), "--tokenizer", "train:400", "--out", str(root / "tok"),
                 "--tokenizer-only"]) == 0
    tok = load_tokenizer(root / "tok" / "tokenizer.json")
    total = 0
    for k, text in enumerate(docs, 1):
        total += packed_length(len(tok.encode(text)), K)
        if k >= 12 and -(-total // SEQ_LEN) % SAMPLES_MULTIPLE == 0:
            break
    return prepare_docs(root, "data", docs[:k], root / "tok" / "tokenizer.json")


def prepare_docs(root: pathlib.Path, name: str, docs: list[str], tokenizer: str | pathlib.Path,
                 seq_len: int = SEQ_LEN) -> pathlib.Path:
    """`calm-train prepare` of `docs` into root/name (K=4, 24 samples per shard, no val split)."""
    from data_prep.cli import main
    write_jsonl(root / f"{name}.jsonl", docs)
    out = root / name
    assert main(["--input", str(root / f"{name}.jsonl"), "--tokenizer", str(tokenizer), "--out", str(out),
                 "--seq-len", str(seq_len), "--patch-size", str(K), "--val-fraction", "0",
                 "--samples-per-shard", "24"]) == 0
    return out


@pytest.fixture(scope="session")
def prepare():
    """`prepare_docs` for tests that make datasets of their own."""
    return prepare_docs


@pytest.fixture(scope="session")
def prepared_b(prepared, tmp_path_factory) -> pathlib.Path:
    """Other pydoc topics with the tokenizer of `prepared` (a second dataset of one mixture)."""
    return prepare_docs(tmp_path_factory.mktemp("prepared_b"), "data_b", topic_docs()[-12:],
                        prepared / "tokenizer.json")


def write_jsonl(path: pathlib.Path, docs: list[str]) -> pathlib.Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return path


def _serve(rank: int, tasks, results) -> None:
    """A rank of the pool: runs `module:function(rank, world, *args)` in a fresh gloo group per task."""
    import importlib

    import torch.distributed as dist

    sys.path.insert(0, str(HERE))
    while True:
        task = tasks.get()
        if task is None:
            return
        name, world, port, args, env = task
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                           "LOCAL_WORLD_SIZE": str(world), **env})
        try:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
            module, function = name.split(":")
            results.put((rank, True, getattr(importlib.import_module(module), function)(rank, world, *args)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


class RankPool:
    """Spawned processes reused by every case of a module; a case runs on the first `world` of them."""

    def __init__(self, size: int):
        ctx = multiprocessing.get_context("spawn")
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(size)]
        self.procs = [ctx.Process(target=_serve, args=(r, self.tasks[r], self.results))
                      for r in range(size)]
        for p in self.procs:
            p.start()

    def run(self, name: str, world: int, *args, timeout: float = 240, env: dict | None = None) -> list:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for r in range(world):
            self.tasks[r].put((name, world, port, args, env or {}))
        out = {}
        for _ in range(world):
            rank, ok, value = self.results.get(timeout=timeout)   # queue.Empty instead of a hang
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{value}")
            out[rank] = value
        return [out[r] for r in range(world)]

    def close(self) -> None:
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def rank_pool():
    pool = RankPool(4)
    yield pool
    pool.close()
