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


def test_rng_states_round_trip_through_safetensors(tmp_path):
    import random

    import numpy as np
    import torch
    from calm_train.train.checkpoint import load_rng_state, rng_file, save_rng_state, set_rng_state
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    random.gauss(0, 1), np.random.randn()            # a cached gaussian in both
    path = rng_file(tmp_path, 7)
    save_rng_state(path)
    expected = (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(load_rng_state(path))
    assert (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist()) == expected
    assert path.name == "rank_00007.safetensors" and path.read_bytes()[8:9] == b"{"   # safetensors: JSON header


def test_pruning_killed_midway_is_recognised_and_finished_at_the_next_start(tmp_path):
    """SIGKILL while an old checkpoint is being deleted: what is left is a `.pruning-` directory, never a
    half-deleted step_N that would be reported as damaged; the next start removes it."""
    script = textwrap.dedent(f"""
        import os, shutil, signal
        from calm_train.train.checkpoint import CheckpointManager
        manager = CheckpointManager({str(tmp_path)!r}, keep_last=1, log=lambda m: None)
        def write(d):
            for i in range(3):
                (d / f"part{{i}}.bin").write_bytes(b"x" * 100)
        manager.save(1, write, {{}})
        real_unlink = os.unlink
        def unlink_then_die(path, *args, **kwargs):
            real_unlink(path, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)      # after the first file of the pruned checkpoint
        os.unlink = unlink_then_die
        manager.save(2, write, {{}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    root = tmp_path / "checkpoints"
    leftover = root / f".pruning-{step_name(1)}"
    assert leftover.is_dir() and len(list(leftover.iterdir())) < 4          # half deleted
    assert sorted(p.name for p in root.glob("step_*")) == [step_name(2)]
    logs = []
    manager = CheckpointManager(tmp_path, log=logs.append)
    assert manager.newest_intact() == (root / step_name(2), [])              # nothing reported as damaged
    manager.finish_pruning()
    assert not leftover.exists() and logs == [f"removed {leftover}: an old checkpoint whose pruning was interrupted"]
    assert verify_checkpoint(root / step_name(2))["step"] == 2


FULL_DISK_SCRIPT = """
set -u
mount -t tmpfs -o size=12m tmpfs "$MNT"
train() { "$PYTHON" -m calm_train train tiny_ar run_dir="$MNT/run" data.train="$DATA" train.save_every=1 \\
          logging.progress=false "$@"; }
train train.steps=2 > "$OUT/first.log" 2>&1; echo $? > "$OUT/first.rc"
# leave 256 KiB: enough for a metrics line, not for a checkpoint (model.safetensors alone is ~600 KB)
"$PYTHON" -c "import os; s = os.statvfs('$MNT'); open('$MNT/filler', 'wb').write(bytes(s.f_bavail * s.f_frsize \
                                                                                 - (256 << 10)))"
train train.steps=3 > "$OUT/full.log" 2>&1; echo $? > "$OUT/full.rc"
rm "$MNT/filler"
mount --bind "$MNT/run/checkpoints" "$MNT/run/checkpoints"
mount -o remount,bind,ro "$MNT/run/checkpoints"
train train.steps=3 > "$OUT/readonly.log" 2>&1; echo $? > "$OUT/readonly.rc"
umount "$MNT/run/checkpoints"
train train.steps=3 > "$OUT/after.log" 2>&1; echo $? > "$OUT/after.rc"
cp -a "$MNT/run" "$OUT/run"
"""


def test_full_and_read_only_file_system_during_a_save_keep_the_previous_checkpoint(tiny_data, tmp_path):
    """A real full file system (a 12 MiB tmpfs, filled) and a real read-only one (the checkpoints directory
    remounted read-only), each in a private mount namespace: the save of step 3 fails with one line that names the
    cause and says step 2 and `latest` are intact; after the file system is fixed the same command resumes."""
    import shutil
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-Urm", "true"]).returncode != 0:
        pytest.skip("no mount namespaces here (unshare -Urm): a real tmpfs cannot be mounted")
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir(), out.mkdir()
    env = {**os.environ, "MNT": str(mnt), "OUT": str(out), "DATA": str(tiny_data), "PYTHON": sys.executable}
    subprocess.run(["unshare", "-Urm", "bash", "-c", FULL_DISK_SCRIPT], env=env, timeout=900, check=True)
    rc = {name: int((out / f"{name}.rc").read_text()) for name in ("first", "full", "readonly", "after")}
    assert rc == {"first": 0, "full": 1, "readonly": 1, "after": 0}, (rc, (out / "full.log").read_text()[-3000:])
    run = mnt / "run"
    intact = f"the previous checkpoint {run}/checkpoints/{step_name(2)} and {run}/checkpoints/latest are intact"
    for name, cause in (("full", "No space left on device"), ("readonly", "Read-only file system")):
        err = [line for line in (out / f"{name}.log").read_text().splitlines() if "error:" in line]
        assert len(err) == 1 and err[0].startswith("calm-train train: error: could not save step_00000003"), err
        assert cause in err[0] and intact in err[0] and "Fix:" in err[0], err
        assert "Traceback" not in (out / f"{name}.log").read_text()
    after = (out / "after.log").read_text()
    assert f"resumed from {run}/checkpoints/{step_name(2)} at step 2" in after
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert verify_checkpoint(out / "run" / "checkpoints" / step_name(3))["step"] == 3


def test_async_save_failure_is_raised_at_the_next_save_as_the_same_line(tmp_path):
    def refused(directory: pathlib.Path) -> None:
        raise OSError(28, "No space left on device", str(directory / "model.safetensors"))
    errors = []
    for mode in (False, True):
        manager = CheckpointManager(tmp_path / str(mode), keep_last=2, log=lambda m: None, async_save=mode)
        manager.save(1, writer(b"ok"), {})
        try:
            manager.save(2, refused, {})
            manager.save(3, writer(b"later"), {})          # async: the failure of step 2 surfaces here
        except CheckpointError as err:
            errors.append(str(err).replace(str(tmp_path / str(mode)), "RUN"))
        assert manager.latest().name == step_name(1)        # nothing after the refused save was published
    assert len(errors) == 2 and errors[0] == errors[1] and "No space left on device [ENOSPC]" in errors[0]


def test_async_save_writes_the_same_files_and_resumes_the_same(tiny_data, tmp_path):
    """Two ranks (dp=2), train.async_save=true against a synchronous save: every file of every checkpoint is the
    same byte for byte (state.json up to its elapsed_s, config.yaml up to run_dir and train.async_save, and the
    manifest's hashes of those two), and a run resumed from the asynchronous checkpoint of step 2 continues
    exactly as the synchronous run."""
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from runs import Job, trajectory
    args = ["train", "tiny_ar", f"data.train={tiny_data}", "train.steps=4", "train.save_every=2", "train.keep_last=3",
            "logging.progress=false"]
    runs = {"sync": [], "async": ["train.async_save=true"],
            "resumed": ["train.async_save=true", f"train.resume_from={tmp_path / 'async'}/checkpoints/step_00000002"]}
    for name, extra in runs.items():
        job = Job(2, [*args, f"run_dir={tmp_path / name}", *extra], tmp_path / f"{name}.log")
        assert job.wait() == 0, job.output()[-4000:]

    def comparable(ckpt: pathlib.Path) -> dict:
        out = {}
        for path in sorted(p for p in ckpt.rglob("*") if p.is_file()):
            rel, data = str(path.relative_to(ckpt)), path.read_bytes()
            if rel == "state.json":
                state = json.loads(data)
                assert state["progress"].pop("elapsed_s") > 0
                data = state
            elif rel == "config.yaml":
                data = data.replace(b"async_save: true", b"async_save: false").split(b"\n", 1)[1]   # 1: run_dir
            elif rel == "manifest.json":
                data = {k: v for k, v in json.loads(data)["files"].items() if k not in ("state.json", "config.yaml")}
            out[rel] = data
        return out
    for step in (2, 4):
        sync, asynchronous = (comparable(tmp_path / run / "checkpoints" / step_name(step)) for run in ("sync", "async"))
        assert sync.keys() == asynchronous.keys() and "rng/rank_00001.safetensors" in sync
        assert sync == asynchronous
    assert trajectory(tmp_path / "async") == trajectory(tmp_path / "sync")
    assert trajectory(tmp_path / "resumed") == trajectory(tmp_path / "sync")[2:]
