"""Fault tolerance of multi-process runs: real `torchrun --standalone --nproc-per-node 2 -m calm_train train`.

Two layouts of tiny CALM, each with one uninterrupted reference run: DP=2 with ZeRO-2, and PP=2 (ZeRO-1,
2 micro-batches per step).  Each layout is interrupted by kill -9 of torchrun and of every rank at random
steps (a seeded RNG) and relaunched with the same command; DP is then stopped by SIGUSR1 to every rank
(exit 75), PP by a tiny train.max_wallclock (exit 75).  The last launch finishes the run: its
metrics.jsonl loss lines, eval.jsonl and final model.safetensors equal the reference's bit for bit.
Plus: non-finite steps skipped, counted and stopped after train.max_bad_steps with the last good checkpoint
named and intact; damaged newest checkpoints (truncated model.safetensors, missing rank-1 RNG file) are named
and skipped by resume, which falls back to the previous complete one, and by `calm-train eval`; a resume with
another model config names the checkpoint and its config.yaml.
"""
import json
import pathlib
import random
import re
import shutil
import signal
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from runs import (Job, assert_same_weights, calm_train, final_weights, last_step, metrics, rehash,  # noqa: E402
                  trajectory)

from calm_train.convert.native import step_name, verify_checkpoint  # noqa: E402
from calm_train.train.checkpoint import CheckpointManager  # noqa: E402

pytestmark = pytest.mark.timeout(600)   # per test, fixtures included: a 2-process launch takes 15-45 s

STEPS, SAVE_EVERY = 18, 3
RNG = random.Random(2027)
DP_STOPS = sorted(RNG.sample(range(2, STEPS - 3), 3))        # kill -9, kill -9, SIGUSR1
PP_STOPS = sorted(RNG.sample(range(2, STEPS - 3), 2))        # kill -9, kill -9 (then the wall-clock limit)
LAYOUTS = {"dp2_zero2": ["parallel.zero_stage=2"], "pp2": ["parallel.pp=2", "parallel.zero_stage=1"]}
REQUEUE = 75


@pytest.fixture(scope="module")
def autoencoder(tiny_ae) -> pathlib.Path:
    """A frozen autoencoder for CALM: its quality does not matter here, only that it is fixed."""
    return tiny_ae


def layout_args(layout: str, run: pathlib.Path, data: pathlib.Path, ae: pathlib.Path, *extra: str) -> list[str]:
    return ["train", "tiny_calm", f"run_dir={run}", f"data.train={data}", f"model.autoencoder={ae}",
            f"train.steps={STEPS}", f"train.save_every={SAVE_EVERY}", "train.keep_last=3", "train.eval_every=0",
            "logging.progress=false", *LAYOUTS[layout], *extra]


def run_to_end(args: list[str], log: pathlib.Path) -> Job:
    job = Job(2, args, log)
    rc = job.wait()
    assert rc == 0, f"torchrun exited {rc}:\n{job.output()[-4000:]}"
    return job


def reference_run(layout, tiny_data, autoencoder, tmp_path_factory) -> pathlib.Path:
    run = tmp_path_factory.mktemp("ft") / f"reference_{layout}"
    run_to_end(layout_args(layout, run, tiny_data, autoencoder), run.with_suffix(".log"))
    assert [r["step"] for r in metrics(run)] == list(range(1, STEPS + 1))
    return run


@pytest.fixture(scope="module")
def dp_reference(tiny_data, autoencoder, tmp_path_factory) -> pathlib.Path:
    return reference_run("dp2_zero2", tiny_data, autoencoder, tmp_path_factory)


@pytest.fixture(scope="module")
def pp_reference(tiny_data, autoencoder, tmp_path_factory) -> pathlib.Path:
    return reference_run("pp2", tiny_data, autoencoder, tmp_path_factory)


def newest_step(run: pathlib.Path) -> int:
    latest = CheckpointManager(run, log=lambda m: None).latest()
    return int(latest.name.split("_")[1]) if latest else 0


def kill9_at(args: list[str], run: pathlib.Path, log: pathlib.Path, drawn: int) -> tuple[int, int]:
    """Launch, kill -9 every process at step >= drawn (after any stale metrics lines); (killed at, resumes from)."""
    target = max(drawn, last_step(run) + 1)     # rows of the previous launch are dropped only on resume
    assert target < STEPS, f"kill point {target} is past the run"
    job = Job(2, args, log)
    job.wait_for_step(run, target)
    job.kill_all()
    assert job.proc.returncode == -signal.SIGKILL
    return last_step(run), newest_step(run)


def rank_exit_codes(output: str) -> list[int]:
    """Every failed rank's exit code, by rank, from torchrun's report (torchrun exits 1 when a rank exits != 0)."""
    codes = {int(rank): int(code) for rank, code in re.findall(r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)",
                                                              output)}
    return [codes[rank] for rank in sorted(codes)]


def assert_requeued(job: Job) -> None:
    """Every rank exits 75, or is stopped by torchrun's SIGTERM after another rank exited; torchrun exits 1."""
    assert job.wait() == 1, job.output()[-4000:]
    codes = rank_exit_codes(job.output())
    assert len(codes) == 2 and REQUEUE in codes and set(codes) <= {REQUEUE, -signal.SIGTERM}, codes


def assert_equals_reference(run: pathlib.Path, reference: pathlib.Path) -> None:
    assert trajectory(run) == trajectory(reference)
    assert [r["skipped_steps"] for r in metrics(run)] == [0] * STEPS
    assert metrics(run, "eval.jsonl") == metrics(reference, "eval.jsonl")
    assert_same_weights(final_weights(run), final_weights(reference))


def test_dp_zero2_kill9_twice_then_sigusr1_resumes_bit_exactly(dp_reference, tiny_data, autoencoder, tmp_path):
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    args = layout_args("dp2_zero2", run, tiny_data, autoencoder)
    history = [kill9_at(args, run, log, drawn) for drawn in DP_STOPS[:2]]

    job = Job(2, args, log)
    job.wait_for_step(run, max(DP_STOPS[2], last_step(run) + 1))
    job.signal_ranks(signal.SIGUSR1)                            # every rank, as `scancel --signal=USR1` does
    assert_requeued(job)
    saved = re.findall(r"SIGUSR1: checkpoint saved at step (\d+); exit 75", job.output())
    assert saved and int(saved[-1]) == newest_step(run), saved
    assert newest_step(run) < STEPS

    run_to_end(args, log)
    resumed = [int(s) for s in re.findall(r"resumed from \S+step_(\d+) at step", log.read_text())]
    expected = [s for s in [resumed_from for _, resumed_from in history] + [int(saved[-1])] if s > 0]
    assert resumed == expected, (history, resumed)              # (a kill before step 3 leaves nothing to resume)
    assert_equals_reference(run, dp_reference)


def test_kill9_of_torchrun_alone_stops_both_ranks_with_a_checkpoint_then_resumes_bit_exactly(
        dp_reference, tiny_data, autoencoder, tmp_path):
    """The ranks run in sessions of their own, so nothing reaches them when torchrun is killed: each sees its
    parent change and stops as on SIGTERM (save, exit 75) within seconds; the same command then resumes."""
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    args = layout_args("dp2_zero2", run, tiny_data, autoencoder)
    job = Job(2, args, log)
    job.wait_for_step(run, 4)
    codes, seconds = job.kill_launcher()
    out = job.output()
    assert codes == [REQUEUE, REQUEUE], (codes, out[-3000:])
    assert seconds < 30, seconds
    # the kernel's parent-death signal usually comes first; the watch thread's line shows where it was missed
    assert "SIGTERM: checkpoint saved at step" in out, out[-3000:]
    saved = re.findall(r"SIGTERM: checkpoint saved at step (\d+); exit 75", out)
    assert saved and 4 <= int(saved[0]) == newest_step(run) < STEPS, (saved, out[-3000:])
    assert not (run / ".lock").exists()

    job = run_to_end(args, log)
    assert f"resumed from {run / 'checkpoints' / step_name(int(saved[0]))} at step" in job.output()
    assert_equals_reference(run, dp_reference)


def test_pp2_kill9_twice_then_wallclock_limit_resumes_bit_exactly(pp_reference, tiny_data, autoencoder, tmp_path):
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    args = layout_args("pp2", run, tiny_data, autoencoder)
    for drawn in PP_STOPS:
        kill9_at(args, run, log, drawn)

    # a limit shorter than any step: the first step of the launch is checkpointed, then exit 75
    before = newest_step(run)
    job = Job(2, args + ["train.max_wallclock=0.001"], log)
    assert_requeued(job)
    assert f"train.max_wallclock: checkpoint saved at step {before + 1}; exit 75" in job.output()
    assert newest_step(run) == before + 1

    # the limit is per launch: a checkpoint that already holds more training time than the limit still
    # trains on (else a requeued Slurm job would stop after one step, forever)
    ckpt = run / "checkpoints" / step_name(before + 1)
    state = json.loads((ckpt / "state.json").read_text())
    state["progress"]["elapsed_s"] += 1e6
    rewrite_file(ckpt, "state.json", json.dumps(state, indent=1))
    run_to_end(args + ["train.max_wallclock=600"], log)
    assert metrics(run)[-1]["elapsed_s"] > 1e6
    assert_equals_reference(run, pp_reference)


def rewrite_file(ckpt: pathlib.Path, rel: str, text: str) -> None:
    """Replace one file of a checkpoint and its manifest entry: a legitimately different checkpoint."""
    (ckpt / rel).write_text(text)
    rehash(ckpt, rel)


def test_nonfinite_steps_are_skipped_counted_and_stop_naming_the_last_good_checkpoint(dp_reference, tiny_data,
                                                                                        autoencoder, tmp_path):
    """lr=1e30: step 1 is finite and blows the weights up to ~1e30, so every later forward overflows."""
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    job = Job(2, layout_args("dp2_zero2", run, tiny_data, autoencoder, "train.lr=1e30", "train.warmup_steps=0",
                             "train.save_every=1", "train.keep_last=5", "train.max_bad_steps=3"), log)
    assert job.wait() == 1
    out = job.output()
    codes = rank_exit_codes(out)
    assert len(codes) == 2 and 1 in codes and set(codes) <= {1, -signal.SIGTERM}, codes
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]                 # the third bad step (4) stops before its line
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2]
    assert rows[0]["loss"] == metrics(dp_reference)[0]["loss"]    # step 1 is computed before any update
    assert [(r["loss"], r["grad_norm"]) for r in rows[1:]] == [(None, None)] * 2   # NaN/inf are logged as null
    good = run / "checkpoints" / step_name(3)
    message = (f"3 non-finite steps in a row (train.max_bad_steps=3); the last good checkpoint {good} is intact")
    assert out.count(message) >= max(1, codes.count(1)), out[-3000:]   # every rank that exits 1 names it
    assert verify_checkpoint(good)["step"] == 3                    # every file matches its size and sha256
    state = json.loads((good / "state.json").read_text())["progress"]
    assert (state["skipped_steps"], state["bad_in_a_row"]) == (2, 2)
    weights = [final_weights_of(run / "checkpoints" / step_name(s)) for s in (1, 2, 3)]
    assert_same_weights(weights[0], weights[1])                   # skipped updates leave the weights alone
    assert_same_weights(weights[0], weights[2])
    assert "step 4: non-finite loss or gradient, update skipped (3 in a row)" in out


def final_weights_of(ckpt: pathlib.Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(ckpt / "model.safetensors"))


def eval_error(spec: pathlib.Path, capsys) -> str:
    """`calm-train eval SPEC` in this process: its exit code must be 1; the one-line error it printed."""
    from calm_train.cli import main
    capsys.readouterr()
    assert main(["eval", str(spec), "--max-tokens", "64"]) == 1
    return capsys.readouterr().err


def test_damaged_newest_checkpoints_are_named_and_resume_falls_back(dp_reference, tmp_path, tiny_data,
                                                                    autoencoder, capsys):
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    shutil.copytree(dp_reference, run)
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert kept == [step_name(s) for s in (12, 15, 18)]
    newest, second, intact = (run / "checkpoints" / name for name in reversed(kept))
    truncated = newest / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    missing = second / "rng" / "rank_00001.safetensors"
    missing.unlink()

    err = eval_error(newest, capsys)
    assert f"{truncated} has 1000 bytes" in err and "Fix:" in err, err
    err = eval_error(second, capsys)
    assert f"{missing} is missing" in err and "Fix:" in err, err
    from calm_train.cli import main
    capsys.readouterr()
    assert main(["eval", str(run), "--max-tokens", "64"]) == 0   # a run directory: its newest complete checkpoint
    captured = capsys.readouterr()
    assert json.loads(captured.out)["checkpoint"] == str(intact)   # stdout: the result only
    assert f"skipping checkpoint: {truncated} has 1000 bytes" in captured.err

    # resume: both damaged checkpoints are named and skipped, the run redoes steps 13..18 from step 12
    args = layout_args("dp2_zero2", run, tiny_data, autoencoder)
    job = run_to_end(args, log)
    out = job.output()
    assert f"skipping checkpoint: {truncated} has 1000 bytes" in out
    assert f"skipping checkpoint: {missing} is missing" in out
    assert re.findall(r"resumed from (\S+) at step", out) == [str(intact)]
    assert_equals_reference(run, dp_reference)


def test_resume_with_another_model_config_names_the_checkpoint(dp_reference, tmp_path, tiny_data, autoencoder,
                                                               capsys):
    run = tmp_path / "run"
    shutil.copytree(dp_reference, run)
    latest = run / "checkpoints" / step_name(STEPS)
    proc = calm_train(*layout_args("dp2_zero2", run, tiny_data, autoencoder, "model.head.noise_size=8"), check=False)
    assert proc.returncode == 1
    assert f"{latest} was trained with another model config" in proc.stderr
    assert f"{latest}/config.yaml" in proc.stderr and "Fix:" in proc.stderr
    assert verify_checkpoint(latest)["step"] == STEPS              # untouched

    # an edited config.yaml inside a checkpoint: `calm-train eval` names it instead of loading it
    config = latest / "config.yaml"
    config.write_text(config.read_text().replace("noise_size: 16", "noise_size: 32"))
    err = eval_error(latest, capsys)
    assert f"{config} does not match its sha256" in err, err
