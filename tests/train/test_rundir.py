"""Damaged checkpoints and history (calm_train/train/rundir.py): never a silent restart, nothing deleted.

Real runs whose checkpoint files get a flipped byte (their manifest left as it was: the damage is found by
sha256).  When no checkpoint is intact the run stops, naming each damaged file and the choices;
`train.resume_from=scratch` restarts with the old checkpoints and history moved aside; `train.resume_from=PATH`
resumes from a named checkpoint; a relaunch of the same command continues instead of applying the choice again.
"""
import json
import pathlib
import shutil
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from runs import in_one_process, metrics  # noqa: E402

from calm_train.convert.native import step_name, verify_checkpoint  # noqa: E402

pytestmark = pytest.mark.timeout(900)


def flip_a_byte(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def aside(path: pathlib.Path) -> list[pathlib.Path]:
    return sorted(path.parent.glob(f"{path.name}.before-restart-*"))


def ar_args(run: pathlib.Path, data: pathlib.Path, *extra: str) -> list[str]:
    return ["train", "tiny_ar", f"run_dir={run}", f"data.train={data}", "train.save_every=1", "logging.progress=false",
            *extra]


def test_no_intact_checkpoint_stops_the_run_and_scratch_restarts_with_the_old_run_aside(tiny_ar_run, tiny_data,
                                                                                       tmp_path):
    run, fresh = tmp_path / "ar", tmp_path / "killed_before_its_first_save"
    shutil.copytree(tiny_ar_run, run)
    damaged = [run / "checkpoints" / step_name(2) / "model.safetensors",
               run / "checkpoints" / step_name(1) / "optimizer.safetensors"]
    for path in damaged:
        flip_a_byte(path)
    before = {p.relative_to(run): p.read_bytes() for p in [*damaged, run / "metrics.jsonl"]}
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    stopped, restarted, relaunched, started = in_one_process(
        ar_args(run, tiny_data, "train.steps=2"),
        ar_args(run, tiny_data, "train.steps=2", "train.resume_from=scratch"),
        ar_args(run, tiny_data, "train.steps=3", "train.resume_from=scratch"),   # the same choice, relaunched
        ar_args(fresh, tiny_data, "train.steps=1"))

    assert stopped["code"] == 1, stopped["err"][-3000:]
    line = next(x for x in stopped["err"].splitlines() if "error:" in x)
    assert f"{run}/checkpoints holds checkpoints but none is intact" in line, line
    assert all(f"{path} does not match its sha256" in line for path in damaged), line
    assert "train.resume_from=scratch" in line and "train.resume_from=PATH" in line and "restore" in line, line

    assert restarted["code"] == 0, restarted["err"][-3000:]              # the old run, moved aside as it was
    [old_checkpoints], [old_metrics] = aside(run / "checkpoints"), aside(run / "metrics.jsonl")
    old_run = {"checkpoints": old_checkpoints, "metrics.jsonl": old_metrics}
    assert {rel: (old_run[rel.parts[0]] / pathlib.Path(*rel.parts[1:])).read_bytes() for rel in before} == before
    assert f"starting ar run in {run}" in restarted["err"]
    assert relaunched["code"] == 0, relaunched["err"][-3000:]
    assert f"train.resume_from=scratch: {run}/checkpoints/{step_name(2)} descends from that restart" \
        in relaunched["err"]
    assert len(aside(run / "checkpoints")) == 1 and [r["step"] for r in metrics(run)] == [1, 2, 3]
    state = json.loads((run / "checkpoints" / step_name(3) / "state.json").read_text())
    assert state["resume_from"] == "scratch" and verify_checkpoint(run / "checkpoints" / step_name(3))

    assert started["code"] == 0, started["err"][-3000:]                   # a start at step 0 over history
    [old] = aside(fresh / "metrics.jsonl")
    assert old.read_text() == '{"step": 1, "loss": 9.0}\n' and [r["step"] for r in metrics(fresh)] == [1]


def test_resume_from_a_named_checkpoint_truncates_history_and_is_applied_once(tiny_ar_run, tiny_data, tmp_path):
    run, backup = tmp_path / "ar", tmp_path / "backup" / step_name(1)
    shutil.copytree(tiny_ar_run, run)
    shutil.copytree(tiny_ar_run / "checkpoints" / step_name(1), backup)
    for step in (1, 2):
        flip_a_byte(run / "checkpoints" / step_name(step) / "model.safetensors")
    args = ar_args(run, tiny_data, "train.steps=2", f"train.resume_from={backup}")
    resumed, relaunched = in_one_process(args, args)

    assert resumed["code"] == 0, resumed["err"][-3000:]
    assert f"resumed from {backup} at step 1" in resumed["err"]
    [moved] = aside(run / "checkpoints" / step_name(2))                    # the damaged later one, kept aside
    assert verify_checkpoint(run / "checkpoints" / step_name(2))["step"] == 2
    assert metrics(run) == metrics(tiny_ar_run)[:1] + metrics(run)[1:] and len(metrics(run)) == 2
    assert metrics(run)[1]["loss"] == metrics(tiny_ar_run)[1]["loss"]       # step 2 redone from the backup, exactly
    assert relaunched["code"] == 0, relaunched["err"][-3000:]
    assert f"{run}/checkpoints/{step_name(2)} descends from it" in relaunched["err"]
    assert aside(run / "checkpoints" / step_name(2)) == [moved] and len(metrics(run)) == 2


def test_resume_from_a_checkpoint_that_keep_last_then_prunes_keeps_the_requeue_going(tiny_ar_run, tiny_data, tmp_path):
    """The same command, requeued (train.max_wallclock: each launch trains one step, saves, exits 75): once the
    run saved its own checkpoint, train.resume_from=PATH is satisfied and PATH, pruned meanwhile, is not needed."""
    run = tmp_path / "ar"
    shutil.copytree(tiny_ar_run, run)
    named = run / "checkpoints" / step_name(1)
    args = ar_args(run, tiny_data, "train.steps=4", "train.keep_last=1", "train.max_wallclock=0.001",
                   f"train.resume_from={named}")
    first, requeued = in_one_process(args, args)

    assert first["code"] == 75, first["err"][-3000:]
    assert f"resumed from {named} at step 1" in first["err"]
    assert "checkpoint saved at step 2; exit 75" in first["err"]
    assert requeued["code"] == 75, requeued["err"][-3000:]
    assert f"train.resume_from={named}: {run}/checkpoints/{step_name(2)} descends from it" in requeued["err"]
    assert f"resumed from {run}/checkpoints/{step_name(2)} at step 2" in requeued["err"]
    assert [p.name for p in (run / "checkpoints").glob("step_????????")] == [step_name(3)]   # keep_last=1 pruned PATH
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]
    assert [r["loss"] for r in metrics(run)[:2]] == [r["loss"] for r in metrics(tiny_ar_run)]


def test_a_finished_run_relaunched_says_so_and_writes_nothing(tiny_ar_run, tiny_data, tmp_path):
    run = tmp_path / "ar"
    shutil.copytree(tiny_ar_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    [again] = in_one_process(ar_args(run, tiny_data, "train.steps=2"))
    assert again["code"] == 0, again["err"][-3000:]
    assert (f"{run} is finished: {run}/checkpoints/{step_name(2)} is at step 2 of train.steps=2 and evaluated; "
            "nothing to do (raise train.steps to train on)") in again["err"]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before     # no second eval row
