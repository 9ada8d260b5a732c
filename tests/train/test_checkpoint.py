"""Checkpoint manager: atomic saves, `latest`, incomplete/corrupt checkpoints reported and skipped, pruning."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest

from calm_train.convert.native import CheckpointError, resolve_checkpoint, step_name, verify_checkpoint
from calm_train.train.checkpoint import CheckpointManager


def writer(payload: bytes):
    def write(directory: pathlib.Path) -> None:
        (directory / "engine").mkdir()
        (directory / "engine" / "weights.bin").write_bytes(payload)
        (directory / "state.json").write_text("{}")
    return write


def test_save_writes_manifest_and_latest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, log=lambda m: None)
    path = manager.save(3, writer(b"abc"), {"kind": "ar"})
    assert path.name == step_name(3)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    manifest = verify_checkpoint(path)
    assert manifest["step"] == 3 and manifest["kind"] == "ar"
    assert manifest["files"]["engine/weights.bin"][0] == 3
    assert resolve_checkpoint(tmp_path) == path
    assert not list((tmp_path / "checkpoints").glob(".partial-*"))


def test_prune_keeps_last_and_every(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, keep_every=4, log=lambda m: None)
    for step in range(1, 10):
        manager.save(step, writer(bytes([step])), {})
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert kept == [step_name(4), step_name(8), step_name(9)]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_damaged_checkpoint_is_named_and_skipped(tmp_path, damage):
    logs = []
    manager = CheckpointManager(tmp_path, keep_last=5, log=logs.append)
    good = manager.save(1, writer(b"good-weights"), {})
    bad = manager.save(2, writer(b"newer-weights"), {})
    target = bad / "engine" / "weights.bin"
    if damage == "truncate":
        target.write_bytes(b"new")
    elif damage == "flip":
        target.write_bytes(b"NEWER-weights")
    elif damage == "delete":
        target.unlink()
    else:
        (bad / "manifest.json").unlink()
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(bad)
    assert str(bad) in str(err.value) and "Fix:" in str(err.value)
    if damage != "flip":                  # the cheap scan (sizes) finds all but same-size corruption
        assert manager.latest() == good
        assert any(str(bad) in line for line in logs)
    assert manager.latest(hashes=True) == good    # what a resume uses: same-size corruption is found too
    assert bad.exists()                   # reported, never deleted


def test_missing_checkpoint_error_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="neither a run directory nor a checkpoint"):
        resolve_checkpoint(tmp_path / "nothing")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path)


def test_kill_during_save_keeps_previous_latest(tmp_path):
    """SIGKILL in the middle of writing a checkpoint: `latest` still names the previous complete one."""
    script = textwrap.dedent(f"""
        import os, pathlib, signal, sys
        from calm_train.train.checkpoint import CheckpointManager
        manager = CheckpointManager({str(tmp_path)!r}, log=lambda m: None)
        def write_ok(d):
            (d / "a.bin").write_bytes(b"x" * 1000)
        manager.save(1, write_ok, {{}})
        def write_and_die(d):
            (d / "a.bin").write_bytes(b"y" * 500)
            os.kill(os.getpid(), signal.SIGKILL)
        manager.save(2, write_and_die, {{}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == step_name(1)
    assert (root / f".partial-{step_name(2)}").is_dir()
    manager = CheckpointManager(tmp_path, log=lambda m: None)
    assert manager.latest() == root / step_name(1)
    # the next save of step 2 redoes the partial directory and completes
    manager.save(2, writer(b"z"), {})
    assert manager.latest() == root / step_name(2)
    assert not (root / f".partial-{step_name(2)}").exists()
