"""prepare never destroys data: it writes beside --out and swaps the finished output in; a kill -9 at
random moments of a real prepare leaves the previous output (or the new, complete one) in --out; a
directory of user files is refused, and --overwrite moves it aside instead of deleting it."""
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest

from calm_train.data.verify import verify_dataset
from data_prep.cli import main
from data_prep.staging import Staging, output_kind

SEQ = 32


def tree(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def args(corpus: pathlib.Path, tokenizer: pathlib.Path, out: pathlib.Path, seq_len: int = SEQ) -> list[str]:
    return ["--input", str(corpus), "--tokenizer", str(tokenizer), "--out", str(out), "--seq-len", str(seq_len),
            "--val-fraction", "0.1", "--samples-per-shard", "16"]


@pytest.fixture(scope="module")
def outputs(tiny_corpus, tiny_data, tmp_path_factory):
    """Two prepared outputs of the same corpus (seq-len 32 and 64) as references."""
    root = tmp_path_factory.mktemp("staging")
    tok = tiny_data / "tokenizer.json"
    for name, seq_len in (("a", SEQ), ("b", 2 * SEQ)):
        assert main(args(tiny_corpus, tok, root / name, seq_len)) == 0
    return root


def test_user_files_are_refused_and_overwrite_moves_them_aside(tiny_corpus, tiny_data, outputs, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "train" / "mine.bin").write_bytes(b"\x00\x01")
    mine = tree(out)
    tok = tiny_data / "tokenizer.json"
    assert main(args(tiny_corpus, tok, out)) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"calm-train prepare: error: --out {out} is not empty") and "--overwrite" in line
    assert tree(out) == mine and not Staging(out).root.exists()

    assert main(args(tiny_corpus, tok, out) + ["--overwrite"]) == 0
    assert tree(out) == tree(outputs / "a")
    (aside,) = tmp_path.glob("out.before-prepare-*")
    assert tree(aside) == mine and not Staging(out).root.exists()

    # a previous prepare output is replaced without --overwrite; --tokenizer-only does not replace data
    assert main(args(tiny_corpus, tok, out, 2 * SEQ)) == 0
    assert tree(out) == tree(outputs / "b")
    assert main(["--input", str(tiny_corpus), "--tokenizer", str(tok), "--out", str(out), "--tokenizer-only"]) == 1
    assert "--tokenizer-only would replace" in capsys.readouterr().err and tree(out) == tree(outputs / "b")


def test_an_interrupted_swap_is_finished_by_the_next_prepare(outputs, tmp_path):
    """The state between the two renames of the swap (previous output aside, --out absent): recover()."""
    import shutil
    out = tmp_path / "data"
    stage = Staging(out)
    stage.root.mkdir()
    shutil.copytree(outputs / "a", stage.old)
    shutil.copytree(outputs / "b", stage.new)
    stage.recover()
    assert tree(out) == tree(outputs / "b") and not stage.old.exists()
    shutil.copytree(outputs / "a", stage.old)            # killed while deleting the previous output
    stage.recover()
    assert tree(out) == tree(outputs / "b") and not stage.old.exists()


def test_kill9_at_random_moments_keeps_the_previous_output(tiny_corpus, tiny_data, outputs, tmp_path):
    """Real prepares (seq-len 64 over a seq-len 32 output) killed at random moments: --out always verifies and
    holds one complete output; the previous one until the new one is complete."""
    import shutil
    out = tmp_path / "data"
    shutil.copytree(outputs / "a", out)
    old, new = tree(outputs / "a"), tree(outputs / "b")
    command = [sys.executable, "-m", "data_prep.cli", *args(tiny_corpus, tiny_data / "tokenizer.json", out, 2 * SEQ)]
    stage = Staging(out)

    def launch() -> tuple[subprocess.Popen, float]:
        """A prepare, once it has started writing (its staging directory exists); when that was."""
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
        while not stage.root.exists() and proc.poll() is None:
            time.sleep(0.002)
        return proc, time.monotonic()

    proc, writing = launch()                          # a whole run: how long it writes
    assert proc.wait() == 0 and tree(out) == new
    write_s = time.monotonic() - writing
    rng = random.Random(10)
    seen = []
    for fraction in [rng.uniform(0.0, 1.1) for _ in range(6)]:
        shutil.rmtree(out)
        shutil.copytree(outputs / "a", out)
        proc, writing = launch()
        time.sleep(max(0.0, writing + fraction * write_s - time.monotonic()))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if not out.exists():                          # killed between the two renames of the swap
            stage.recover()
        got = tree(out)
        assert got in (old, new), f"killed {fraction:.2f} into {write_s:.2f}s of writing: --out holds a mixture"
        verify_dataset(out)
        seen.append(got == new)
    assert main(args(tiny_corpus, tiny_data / "tokenizer.json", out, 2 * SEQ)) == 0
    assert tree(out) == new and not Staging(out).root.exists()
    assert output_kind(out) == "data" and json.loads((out / "dataset.json").read_text())["seq_len"] == 2 * SEQ
    print(f"kills: {len(seen)} ({sum(seen)} after the swap) in {write_s:.2f}s of writing")
