"""Resume a tiny CALM run (fp32, real torchrun processes) in another parallel layout.

Each source layout trains 6 steps and saves at step 3; its steps 4-6 are the reference. A copy of
its run directory that keeps only the step-3 checkpoint is resumed in the target layout, which
reshards (calm_train/train/reshard.py): the resumed steps 4-6 must match the reference in loss and
gradient norm within REL_TOL, with the same learning rates, token/sample counters and loader
position (so the same samples), and the step-6 weights and Adam moments must match too.
ZeRO stages change along the way (0, 1 and 3 are each saved from and loaded into; 2 shares
ZeRO-1's code): the 1-process source runs ZeRO-0, DP2 ZeRO-3, TP2 and PP2 ZeRO-1.
"""
import json
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

STEPS, SAVE_AT = 6, 3
REL_TOL = 1e-5          # fp32: layouts differ in reduction order only

# name: (processes, overrides); the 1-process source is the reference of the "back" direction
SOURCES = {"tp2": (2, ["parallel.tp=2"]), "pp2": (2, ["parallel.pp=2"]), "dp2": (2, ["parallel.zero_stage=3"]),
           "tp1": (1, ["parallel.zero_stage=0"])}
CASES = {  # id: (source, processes, overrides of the resumed run)
    "tp2z1-to-tp1z0": ("tp2", 1, ["parallel.zero_stage=0"]),
    "pp2-to-pp1": ("pp2", 1, []),
    "dp2z3-to-dp1z1": ("dp2", 1, []),
    "tp1z0-to-tp2z1": ("tp1", 2, ["parallel.tp=2"]),
    "pp1z0-to-pp2z1": ("tp1", 2, ["parallel.pp=2"]),
    "dp1z0-to-dp2z3": ("tp1", 2, ["parallel.zero_stage=3"]),
}
LAYOUT_WORDS = {"tp2": "tp=2 pp=1 dp=1 zero=1", "pp2": "tp=1 pp=2 dp=1 zero=1", "dp2": "tp=1 pp=1 dp=2 zero=3",
                "tp1": "tp=1 pp=1 dp=1 zero=0"}

pytestmark = pytest.mark.timeout(900)


def train(processes: int, *args: str) -> str:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command = [*(launcher if processes > 1 else [sys.executable]), "-m", "calm_train", "train", *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc.stderr


def rows(run: pathlib.Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


def checkpoint(run: pathlib.Path, step: int) -> pathlib.Path:
    return run / "checkpoints" / f"step_{step:08d}"


def relative_max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in a)


@pytest.fixture(scope="module")
def autoencoder(tiny_data, tmp_path_factory) -> pathlib.Path:
    run = tmp_path_factory.mktemp("reshard") / "ae"
    train(1, "tiny_autoencoder", f"run_dir={run}", f"data.train={tiny_data}", "train.steps=10",
          "train.save_every=0", "train.eval_every=0", "logging.progress=false")
    return run


@pytest.fixture(scope="module")
def calm_args(autoencoder, tiny_data):
    return ["tiny_calm", f"data.train={tiny_data}", f"model.autoencoder={autoencoder}", "logging.progress=false",
            f"train.steps={STEPS}", f"train.save_every={SAVE_AT}", "train.eval_every=0"]


@pytest.fixture(scope="module")
def source_run(calm_args, tmp_path_factory):
    """The uninterrupted run of one source layout, trained on first use."""
    runs = {}

    def get(name: str) -> pathlib.Path:
        if name not in runs:
            processes, overrides = SOURCES[name]
            run = tmp_path_factory.mktemp("sources") / name
            train(processes, *calm_args, f"run_dir={run}", *overrides)
            runs[name] = run
        return runs[name]
    return get


def cut_at_save(source: pathlib.Path, dest: pathlib.Path) -> None:
    """A copy of the run as it was right after the step-SAVE_AT checkpoint."""
    shutil.copytree(source, dest)
    shutil.rmtree(checkpoint(dest, STEPS))
    (dest / "checkpoints" / "latest").write_text(checkpoint(dest, SAVE_AT).name + "\n")
    for name in ("metrics.jsonl", "eval.jsonl"):
        kept = [r for r in rows(dest, name) if r["step"] <= SAVE_AT]
        (dest / name).write_text("".join(json.dumps(r) + "\n" for r in kept))


@pytest.mark.parametrize("case", CASES)
def test_resume_in_another_layout_matches_the_uninterrupted_run(case, source_run, calm_args, tmp_path):
    source_name, processes, overrides = CASES[case]
    source = source_run(source_name)
    run = tmp_path / case
    cut_at_save(source, run)
    log = train(processes, *calm_args, f"run_dir={run}", *overrides)

    line = next(x for x in log.splitlines() if "layout changed" in x)
    assert f"from {LAYOUT_WORDS[source_name]}" in line, line
    assert f"carried weights, Adam moments and Adam step {SAVE_AT}, step {SAVE_AT}" in line, line
    assert f"data position (epoch 0, sample {SAVE_AT * 8} of the epoch)" in line, line

    ours, ref = rows(run), rows(source)
    assert [r["step"] for r in ours] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    assert ours[:SAVE_AT] == ref[:SAVE_AT]                                     # the kept history
    for a, b in zip(ours[SAVE_AT:], ref[SAVE_AT:]):
        assert (a["tokens"], a["samples"], a["lr"], a["skipped_steps"]) == \
               (b["tokens"], b["samples"], b["lr"], b["skipped_steps"])
        assert a["loss"] == pytest.approx(b["loss"], rel=REL_TOL), (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=REL_TOL), (a["step"], a["grad_norm"], b["grad_norm"])

    ours_ckpt, ref_ckpt = checkpoint(run, STEPS), checkpoint(source, STEPS)
    state, ref_state = (json.loads((c / "state.json").read_text())["progress"] for c in (ours_ckpt, ref_ckpt))
    for key in ("step", "tokens", "samples", "skipped_steps"):
        assert state[key] == ref_state[key], key
    for key in ("epoch", "sample_in_epoch"):                                  # the next sample is the same
        assert state["loader"][key] == ref_state["loader"][key], key
    assert relative_max_diff(load_file(str(ours_ckpt / "model.safetensors")),
                             load_file(str(ref_ckpt / "model.safetensors"))) < REL_TOL
    moments, ref_moments = (load_file(str(c / "optimizer.safetensors")) for c in (ours_ckpt, ref_ckpt))
    assert relative_max_diff(moments, ref_moments) < REL_TOL
    with safe_open(str(ours_ckpt / "optimizer.safetensors"), "pt") as f:
        assert f.metadata()["adam_step"] == str(STEPS)


def test_optimizer_file_holds_every_trainable_parameter_under_its_full_name(source_run):
    """optimizer.safetensors of a TP2 run: exp_avg/exp_avg_sq of every key of model.safetensors, same shapes."""
    ckpt = checkpoint(source_run("tp2"), SAVE_AT)
    weights = load_file(str(ckpt / "model.safetensors"))
    moments = load_file(str(ckpt / "optimizer.safetensors"))
    assert set(moments) == {f"{m}/{k}" for k in weights for m in ("exp_avg", "exp_avg_sq")}
    for key, w in weights.items():
        assert moments[f"exp_avg/{key}"].shape == w.shape and moments[f"exp_avg/{key}"].dtype == torch.float32
        assert moments[f"exp_avg_sq/{key}"].min() >= 0 and moments[f"exp_avg_sq/{key}"].max() > 0, key


def test_without_adam_moments_the_log_says_so_and_the_run_drifts_beyond_the_tolerance(source_run, calm_args, tmp_path):
    """A checkpoint from before optimizer.safetensors: weights, step and data carry, the moments restart from
    zero, the log line says so, and step 5 (the first update after the resume) leaves REL_TOL far behind."""
    source = source_run("tp2")
    run = tmp_path / "no_moments"
    cut_at_save(source, run)
    ckpt = checkpoint(run, SAVE_AT)
    (ckpt / "optimizer.safetensors").unlink()
    manifest = json.loads((ckpt / "manifest.json").read_text())
    del manifest["files"]["optimizer.safetensors"]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    log = train(1, *calm_args, f"run_dir={run}")
    line = next(x for x in log.splitlines() if "layout changed" in x)
    assert "carried weights, step 3" in line and "not carried: Adam moments" in line, line
    ours, ref = rows(run), rows(source)
    assert ours[SAVE_AT]["loss"] == pytest.approx(ref[SAVE_AT]["loss"], rel=REL_TOL)      # same weights, same batch
    assert abs(ours[SAVE_AT + 1]["loss"] / ref[SAVE_AT + 1]["loss"] - 1) > 10 * REL_TOL
