"""End-to-end runs of `calm-train train` (real processes, real shards, real DeepSpeed engines):
the run-directory contract, CALM against a frozen autoencoder, exact resume after SIGUSR1 and
after kill -9 at several random steps, eval/generate on the checkpoints, and bad input."""
import json
import os
import pathlib
import random
import signal
import sys

import pytest
from safetensors.torch import load_file

from calm_train.cli import build_parser

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from runs import assert_same_weights, calm_train, final_weights, metrics, start, trajectory, wait_for_step  # noqa: E402

RESUME_STEPS = 10
KILL_STEPS = sorted(random.Random(2026).sample(range(2, RESUME_STEPS), 3))   # >= 3 random kill points


@pytest.fixture(scope="module")
def ae_run(tiny_data, tmp_path_factory) -> pathlib.Path:
    run = tmp_path_factory.mktemp("runs") / "ae"
    calm_train("train", "tiny_autoencoder", f"run_dir={run}", f"data.train={tiny_data}", "train.steps=30",
               "train.save_every=15", "train.eval_every=15", "logging.progress=false")
    return run


def calm_args(run: pathlib.Path, data: pathlib.Path, ae: pathlib.Path, *extra: str) -> list[str]:
    return ["train", "tiny_calm", f"run_dir={run}", f"data.train={data}", f"model.autoencoder={ae}",
            "logging.progress=false", *extra]


def test_autoencoder_run_follows_the_run_directory_contract(ae_run):
    rows = metrics(ae_run)
    assert [r["step"] for r in rows] == list(range(1, 31))
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "samples", "elapsed_s",
                "skipped_steps", "mfu", "flops"):
        assert key in rows[-1], key
    assert rows[-1]["tokens"] == 30 * 8 * 32 and rows[-1]["samples"] == 30 * 8
    assert rows[-1]["loss"] < rows[0]["loss"]
    evals = metrics(ae_run, "eval.jsonl")
    assert [e["step"] for e in evals] == [15, 30]
    assert 0 < evals[-1]["recon_acc"] <= 1 and evals[-1]["recon_acc"] > evals[0]["recon_acc"] - 0.05
    assert (ae_run / "config.yaml").is_file() and (ae_run / "tokenizer" / "dataset.json").is_file()
    assert (ae_run / "checkpoints" / "latest").read_text().strip() == "step_00000030"
    assert (ae_run / "checkpoints" / "step_00000015" / "manifest.json").is_file()


def test_calm_trains_against_a_frozen_autoencoder(ae_run, tiny_data, tmp_path):
    run = tmp_path / "calm"
    calm_train(*calm_args(run, tiny_data, ae_run, "train.steps=24", "train.eval_every=12"))
    losses = [r["loss"] for r in metrics(run)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    evals = metrics(run, "eval.jsonl")
    assert [e["step"] for e in evals] == [12, 24]
    for e in evals:
        assert all(key in e for key in ("loss", "brier1", "brier2", "brier3", "brier4", "brierlm"))
        assert e["brierlm"] >= 0 and -1 <= e["brier1"] <= 1
    ckpt = run / "checkpoints" / "step_00000024"
    frozen = load_file(str(ckpt / "autoencoder.safetensors"))
    assert_same_weights(frozen, final_weights(ae_run))                      # bit-identical after training
    assert not any(k.startswith(("ae_model.", "autoencoder.")) for k in load_file(str(ckpt / "model.safetensors")))
    state = json.loads((ckpt / "state.json").read_text())
    assert state["identity"]["autoencoder"]["weights_sha256"] and state["progress"]["step"] == 24

    for e in evals:                     # the diagnostics ride along in eval.jsonl
        assert e["energy_oracle"] < e["energy_marginal"] and 0 <= e["real_chunk_fraction"] <= 1
        assert e["brier_samples"] == 2 and e["brier_estimator"] == "u-statistic"

    many = json.loads(calm_train("eval", str(run), "--max-tokens", "512", "--samples", "6").stdout)
    assert many["kind"] == "calm" and 0 <= many["brierlm"] <= 100
    assert many["brier_samples"] == 6 and many["brier_positions"] == 16 * 7
    for key in ("brier1_se", "brier4_se", "brierlm_se", "energy_se", "energy_position_se"):
        assert many[key] >= 0, key
    assert all(many[f"brier{n}"] < 2 * many[f"brier{n}_se"] for n in many["brier_near_zero"])
    # references: the oracle far below the marginal; held-out chunks are mostly seen in training, samples less so
    assert many["energy_oracle"] + 5 * many["energy_oracle_se"] < many["energy_marginal"]
    assert 0.3 < many["heldout_real_chunk_fraction"] <= 1 and 0 <= many["real_chunk_fraction"] <= 1
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", str(run), "--samples", "1"])     # usage error: exit 2
    text = calm_train("generate", str(run), "--prompt", "The module", "--temperature", "0.5",
                      "--max-new-tokens", "8").stdout
    assert text.strip()


@pytest.fixture(scope="module")
def reference_calm(ae_run, tiny_data, tmp_path_factory) -> pathlib.Path:
    run = tmp_path_factory.mktemp("runs") / "calm_reference"
    calm_train(*calm_args(run, tiny_data, ae_run, f"train.steps={RESUME_STEPS}", "train.save_every=2"))
    return run


def test_sigusr1_saves_exits_75_and_resumes_exactly(reference_calm, ae_run, tiny_data, tmp_path):
    run = tmp_path / "calm_usr1"
    args = calm_args(run, tiny_data, ae_run, f"train.steps={RESUME_STEPS}", "train.save_every=2")
    proc = start(*args)
    wait_for_step(proc, run, 5)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == 75, proc.stderr.read()[-3000:]
    saved = (run / "checkpoints" / "latest").read_text().strip()
    assert int(saved.split("_")[1]) >= 5
    calm_train(*args)
    assert trajectory(run) == trajectory(reference_calm)
    assert_same_weights(final_weights(run), final_weights(reference_calm))


def test_kill9_at_random_steps_resumes_bit_exactly(reference_calm, ae_run, tiny_data, tmp_path):
    run = tmp_path / "calm_kill9"
    args = calm_args(run, tiny_data, ae_run, f"train.steps={RESUME_STEPS}", "train.save_every=2")
    for kill_step in KILL_STEPS:
        proc = start(*args)
        wait_for_step(proc, run, kill_step)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    calm_train(*args)
    assert trajectory(run) == trajectory(reference_calm)
    assert_same_weights(final_weights(run), final_weights(reference_calm))


def test_ar_run_eval_and_generate(tiny_data, tmp_path):
    run = tmp_path / "ar"
    calm_train("train", "tiny_ar", f"run_dir={run}", f"data.train={tiny_data}", "train.steps=12",
               "train.eval_every=6", "logging.progress=false")
    evals = metrics(run, "eval.jsonl")
    assert [e["step"] for e in evals] == [6, 12] and 0 <= evals[-1]["brierlm"] <= 100
    assert evals[-1]["brier_estimator"] == "rao-blackwell" and evals[-1]["brier1_se"] > 0
    assert "energy" not in evals[-1] and "real_chunk_fraction" not in evals[-1]
    assert calm_train("eval", str(run), "--samples", "4", check=False).returncode == 1   # CALM only
    greedy = [calm_train("generate", str(run), "--prompt", "The", "--temperature", "0", "--max-new-tokens", "6").stdout
              for _ in range(2)]
    assert greedy[0] == greedy[1] and len(greedy[0]) > 1      # deterministic, non-empty (may be whitespace)


def test_bad_inputs_fail_fast_naming_the_file(ae_run, tiny_data, tmp_path):
    missing = tmp_path / "no_data"
    proc = calm_train("train", "tiny_ar", f"run_dir={tmp_path / 'r1'}", f"data.train={missing}", check=False)
    assert proc.returncode == 1 and str(missing) in proc.stderr and "Fix" in proc.stderr
    proc = calm_train(*calm_args(tmp_path / "r2", tiny_data, tmp_path / "no_ae"), check=False)
    assert proc.returncode == 1 and "model.autoencoder" in proc.stderr
    proc = calm_train(*calm_args(tmp_path / "r3", tiny_data, ae_run, "model.ae.latent_size=8"), check=False)
    assert proc.returncode == 1 and "model.ae.latent_size" in proc.stderr
    proc = calm_train("eval", str(tmp_path / "nothing"), check=False)
    assert proc.returncode == 1 and "nothing" in proc.stderr
    # flash attention asked for where it cannot run (no CUDA here): one line, before anything is written
    proc = calm_train("train", "tiny_ar", f"run_dir={tmp_path / 'r4'}", f"data.train={tiny_data}",
                      "model.attention=flash", check=False)
    assert proc.returncode == 1 and "'model.attention': flash cannot run here: CUDA is not available" in proc.stderr
    assert not (tmp_path / "r4").exists()


def test_autoencoder_and_calm_on_the_wikitext_validation_file(shared_data, tmp_path):
    """The CALM paper's validation set, prepared and trained on: both runs write the run-directory contract and
    the CALM loss decreases."""
    data = tmp_path / "wikitext"
    calm_train("prepare", "--input", str(shared_data / "wikitext" / "wikitext_document_level-test.json"),
               "--tokenizer", "train:512", "--out", str(data), "--seq-len", "32", "--val-fraction", "0.05")
    ae, calm = tmp_path / "ae", tmp_path / "calm"
    calm_train("train", "tiny_autoencoder", f"run_dir={ae}", f"data.train={data}", "train.steps=20",
               "train.eval_every=10", "logging.progress=false")
    calm_train(*calm_args(calm, data, ae, "train.steps=20", "train.eval_every=10"))
    for run, field in ((ae, "recon_acc"), (calm, "brierlm")):
        assert (run / "config.yaml").is_file() and [r["step"] for r in metrics(run)] == list(range(1, 21))
        assert [e["step"] for e in metrics(run, "eval.jsonl")] == [10, 20]
        assert all(field in e and "loss" in e for e in metrics(run, "eval.jsonl"))
    losses = [r["loss"] for r in metrics(calm)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
