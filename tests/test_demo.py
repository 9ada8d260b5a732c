"""CALM learns a known answer: the demo's known-answer stage (calm_train/demo.py) trains an autoencoder, CALM
and the AR baseline at matched FLOPs on the `cycle` language, whose optimal held-out BrierLM is exact.

Thresholds, from measurements of this stage (README, "Where CALM learns: a ladder of known answers"): CALM
reaches ~95 % of the optimum (BrierLM ~81 of ~85, ~88 % of decoded samples real chunks) and the AR baseline
~99 %; a CALM whose targets come from the wrong chunk (an off-by-one: each position is taught the chunk it
has just read) stays near 0.  The test asks for half the optimum, and shows that the broken CALM stays below it.
"""
import pytest
import torch

from calm_train import demo
from calm_train.models.calm import CALM
from calm_train.train.inference import evaluate_checkpoint

LEARNED = 0.5      # fraction of the optimum BrierLM that a CALM which learns exceeds (it reaches ~0.95)


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    out = tmp_path_factory.mktemp("known_answer")
    block, runs = demo.known_answer(out)
    return out, block, runs


def test_calm_and_ar_learn_the_known_answer(stage):
    _, block, _ = stage
    assert block["rung"] == "cycle" and block["optimum_brierlm"] > 50
    assert block["calm_fraction_of_optimum"] > LEARNED, block
    assert block["calm_brierlm"] > 2 * block["calm_brierlm_se"] and block["calm_real_chunk_fraction"] > 0.5, block
    assert block["ar_fraction_of_optimum"] > 0.8, block
    assert block["calm_learns"]


def test_a_broken_calm_stays_below_the_threshold(stage, monkeypatch):
    """Targets from the wrong chunk (the one each position has just read, not the next): the same training and
    evaluation, and the check above fails."""
    out, block, _ = stage
    head_loss = CALM.head_loss

    def off_by_one(self, hidden_BTH, noise_BTNZ, targets_BTMD):
        return head_loss(self, hidden_BTH, noise_BTNZ, torch.roll(targets_BTMD, 1, dims=1))

    monkeypatch.setattr(CALM, "head_loss", off_by_one)
    broken = demo.train_known_calm(out / "data", out / "autoencoder", out / "broken_calm")
    monkeypatch.undo()
    result = evaluate_checkpoint(str(broken), samples=demo.EVAL_SAMPLES)
    assert result["brierlm"] < LEARNED * block["optimum_brierlm"], result
    assert not demo.calm_learns(result), result
