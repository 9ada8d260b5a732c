"""From the command line, tp=2 x pp=2 (torchrun, 4 processes) and the 1-process run of the same config and
seed start from the same weights (parallel/init.py) and take the same 3 steps: losses equal within 1e-5 at
every step, for the AR model and CALM; the final evaluation (a pipeline over a validation split smaller than
one batch, so repeated and padding micro-batches) gives the same loss and counts every sample once."""
import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from runs import Job, calm_train, final_weights, metrics, prepare_texts, samples  # noqa: E402

LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-5


@pytest.fixture(scope="module")
def val(tiny_corpus, tiny_data, tmp_path_factory) -> pathlib.Path:
    text = json.loads(tiny_corpus.read_text().splitlines()[1])["text"][:200]
    return prepare_texts(tiny_data, tmp_path_factory.mktemp("layouts") / "val", [text])


@pytest.mark.parametrize("kind", ["ar", "calm"])
def test_tp2_pp2_equals_one_process_from_the_cli(kind, tiny_data, val, request, tmp_path):
    assert 1 < samples(val) < 4                      # fewer than one micro-batch: repeats and padding under pp=2
    args = ["train", f"tiny_{kind}", f"data.train={tiny_data}", f"data.val={val}", "train.steps=3", "train.seed=77",
            "train.warmup_steps=1", "logging.progress=false"]
    if kind == "calm":
        args.append(f"model.autoencoder={request.getfixturevalue('tiny_ae')}")
    one, four = tmp_path / "tp1_pp1", tmp_path / "tp2_pp2"
    calm_train(*args, f"run_dir={one}")
    job = Job(4, [*args, f"run_dir={four}", "parallel.tp=2", "parallel.pp=2"], tmp_path / "tp2_pp2.log")
    assert job.wait(timeout=600) == 0, job.output()[-4000:]
    ref, got = metrics(one), metrics(four)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=LOSS_RTOL)
    (ref_eval,), (got_eval,) = metrics(one, "eval.jsonl"), metrics(four, "eval.jsonl")
    assert got_eval["samples"] == ref_eval["samples"] == samples(val)
    assert got_eval["loss"] == pytest.approx(ref_eval["loss"], rel=LOSS_RTOL)
    a, b = final_weights(one), final_weights(four)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= PARAM_ATOL
