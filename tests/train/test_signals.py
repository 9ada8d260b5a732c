"""SIGINT (Ctrl-C) behaves like SIGTERM: checkpoint, exit 75, and the relaunch resumes bit for bit with
DeepSpeed's own counters restored; a second SIGINT aborts at once with exit 130 and writes no checkpoint."""
import json
import pathlib
import signal
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from runs import assert_same_weights, calm_train, final_weights, start, trajectory, wait_for_step  # noqa: E402

pytestmark = pytest.mark.timeout(600)
STEPS = 8


def ar_args(run: pathlib.Path, data: pathlib.Path) -> list[str]:
    return ["train", "tiny_ar", f"run_dir={run}", f"data.train={data}", f"train.steps={STEPS}", "train.eval_every=0",
            "logging.progress=false"]


def final_state(run: pathlib.Path) -> dict:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return json.loads((run / "checkpoints" / latest / "state.json").read_text())


def test_sigint_saves_exits_75_and_resumes_exactly(tiny_data, tmp_path):
    reference, run = tmp_path / "reference", tmp_path / "interrupted"
    calm_train(*ar_args(reference, tiny_data))
    proc = start(*ar_args(run, tiny_data))
    wait_for_step(proc, run, 3)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 75, proc.stderr.read()[-3000:]
    err = proc.stderr.read()
    saved = int((run / "checkpoints" / "latest").read_text().split("_")[1])
    assert 3 <= saved < STEPS and f"SIGINT: checkpoint saved at step {saved}; exit 75" in err
    assert not (run / ".lock").exists()
    calm_train(*ar_args(run, tiny_data))
    assert trajectory(run) == trajectory(reference)
    assert_same_weights(final_weights(run), final_weights(reference))
    ours, theirs = final_state(run), final_state(reference)
    assert ours["engine"] == theirs["engine"] == {"global_steps": STEPS, "global_samples": STEPS * 8,
                                                  "skipped_steps": 0}
    assert ours["progress"]["loader"] == theirs["progress"]["loader"]


def test_a_second_sigint_aborts_with_130_without_a_checkpoint(tiny_data, tmp_path):
    run = tmp_path / "run"
    proc = start(*ar_args(run, tiny_data))
    wait_for_step(proc, run, 2)
    proc.send_signal(signal.SIGINT)
    err = []
    for line in proc.stderr:            # the second Ctrl-C once the first is being obeyed (two at once coalesce)
        err.append(line)
        if "SIGINT: saving a checkpoint at step" in line:
            proc.send_signal(signal.SIGINT)
            break
    assert proc.wait(timeout=300) == 130
    assert "second SIGINT: aborted without saving a checkpoint; exit 130" in "".join(err) + proc.stderr.read()
    assert not list(run.glob("checkpoints/step_*"))
    assert not (run / ".lock").exists()
