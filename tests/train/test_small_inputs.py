"""Small inputs never hang: a too-small train split is refused with its numbers, a 1-sample validation
split is evaluated (once, under DP) and the run finishes, a run without validation data finishes, and
`calm-train eval` scores every sample of a split exactly once."""
import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from runs import Job, calm_train, error_line, metrics, prepare_texts, samples  # noqa: E402

SEQ = 32


@pytest.fixture(scope="module")
def one_sample(tiny_data, tmp_path_factory) -> pathlib.Path:
    return prepare_texts(tiny_data, tmp_path_factory.mktemp("small") / "one", ["A short document."])


@pytest.fixture(scope="module")
def no_val(tiny_corpus, tiny_data, tmp_path_factory) -> pathlib.Path:
    docs = [json.loads(line)["text"][:500] for line in tiny_corpus.read_text().splitlines()]
    return prepare_texts(tiny_data, tmp_path_factory.mktemp("small") / "no_val", docs[1:3])


def test_a_train_split_smaller_than_one_batch_is_refused_with_its_numbers(one_sample, tmp_path):
    assert samples(one_sample) == 1
    proc = calm_train("train", "tiny_ar", f"run_dir={tmp_path / 'run'}", f"data.train={one_sample}", check=False)
    line = error_line(proc, "train")
    assert str(one_sample / "train") in line
    assert "1 samples" in line and "train.global_batch=8" in line and "at most 1" in line
    assert not (tmp_path / "run").exists()


def test_one_sample_validation_under_dp_and_no_validation_split_both_finish(tiny_data, one_sample, no_val, tmp_path):
    """dp=2 over a 1-sample validation split: rank 1 reads only streaming's repeat, which is not counted, and
    still runs as many forwards as rank 0 (ZeRO-3 gathers the weights in each)."""
    run = tmp_path / "dp2"
    job = Job(2, ["train", "tiny_ar", f"run_dir={run}", f"data.train={tiny_data}", f"data.val={one_sample}",
                  "train.steps=2", "train.eval_every=1", "parallel.zero_stage=3", "logging.progress=false"],
              tmp_path / "dp2.log")
    assert job.wait(timeout=600) == 0, job.output()[-3000:]
    evals = metrics(run, "eval.jsonl")
    assert [(e["step"], e["samples"]) for e in evals] == [(1, 1), (2, 1)]
    assert all(e["loss"] > 0 and 0 <= e["brierlm"] <= 100 for e in evals)

    run = tmp_path / "no_val"
    proc = calm_train("train", "tiny_ar", f"run_dir={run}", f"data.train={no_val}", "train.steps=2",
                      "train.eval_every=1", "logging.progress=false")
    assert [r["step"] for r in metrics(run)] == [1, 2] and metrics(run, "eval.jsonl") == []
    assert proc.stderr.count("evaluations are skipped") == 1
    assert (run / "checkpoints" / "step_00000002").is_dir()

    # `calm-train eval` on a split of S samples, S not a multiple of the batch (4): exactly S, then a prefix
    s = samples(no_val)
    assert s > 4 and s % 4, s
    result = json.loads(calm_train("eval", str(run), "--data", str(no_val)).stdout)
    assert (result["samples"], result["tokens"]) == (s, s * SEQ)
    limited = json.loads(calm_train("eval", str(run), "--data", str(no_val), "--max-tokens", str(3 * SEQ + 5)).stdout)
    assert (limited["samples"], limited["tokens"]) == (3, 3 * SEQ)
