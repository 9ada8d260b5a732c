"""Test-wide environment: CPU DeepSpeed without JIT builds, no network, quiet logging."""
import os
import pathlib

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """../shared/data beside the checkout; tests that need it skip with the reason where it is absent."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip(f"shared data directory {path} is absent (it sits beside the checkout in CI)")
    return path


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> pathlib.Path:
    """About 150 KB of real English prose (Python's language reference topics), as JSON lines."""
    import json
    from pydoc_data import topics
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    docs = [topics.topics[name] for name in sorted(topics.topics)][:60]
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    return path


@pytest.fixture(scope="session")
def tiny_data(tiny_corpus, tmp_path_factory) -> pathlib.Path:
    """A prepared data directory (byte-level BPE 512, seq-len 32, K=4, 10% validation) shared by the session."""
    from calm_train.cli import main
    out = tmp_path_factory.mktemp("data") / "tiny"
    assert main(["prepare", "--input", str(tiny_corpus), "--tokenizer", "train:512", "--out", str(out),
                 "--seq-len", "32", "--patch-size", "4", "--val-fraction", "0.1"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_ae(tiny_data, tmp_path_factory) -> pathlib.Path:
    """A 2-step autoencoder run: a fixed frozen autoencoder for CALM (its quality does not matter)."""
    import subprocess
    import sys
    run = tmp_path_factory.mktemp("shared") / "ae"
    proc = subprocess.run([sys.executable, "-m", "calm_train", "train", "tiny_autoencoder", f"run_dir={run}",
                           f"data.train={tiny_data}", "train.steps=2", "logging.progress=false"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """One S3-compatible server on 127.0.0.1 for the session (tests/storage/s3server.py); the environment of
    this process and of every calm-train it launches points at it, and CALM_TRAIN_CACHE at a private cache."""
    import sys
    sys.path.insert(0, str(REPO / "tests" / "storage"))
    from s3server import start_session_server
    os.environ["CALM_TRAIN_CACHE"] = str(tmp_path_factory.mktemp("calm_train_cache"))
    server = start_session_server()
    yield server
    server.stop()
