"""Run identity by content (calm_train/train/identity.py), with real runs, real data and real files.

(a) an autoencoder retrained at the same path is refused on resume, (b) the same autoencoder under another path
is accepted, (c) an autoencoder trained with another tokenizer of the same vocabulary size is refused at the start
of a CALM run, (d) data re-prepared with another tokenizer (same vocabulary size) is refused on resume and by
`eval --data`, and the run's tokenizer/ is not overwritten.  Each refusal is one line naming both hashes, the
file each came from and the fix.  A checkpoint of the previous format (no identity, DeepSpeed's engine/ and
rng/*.pt pickles) resumes with a one-line warning and nothing of it is unpickled.
"""
import json
import pathlib
import shutil
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from runs import calm_train, in_one_process, metrics, payload, rehash  # noqa: E402

from calm_train.convert.native import step_name  # noqa: E402

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def other_data(tiny_corpus, tmp_path_factory) -> pathlib.Path:
    """Other documents, tokenized by a BPE trained on them: another tokenizer with the same vocabulary size (512)."""
    from pydoc_data import topics
    corpus = tmp_path_factory.mktemp("other") / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": topics.topics[name]}) + "\n" for name in sorted(topics.topics)[60:]))
    out = corpus.parent / "data"
    calm_train("prepare", "--input", str(corpus), "--tokenizer", "train:512", "--out", str(out), "--seq-len", "32",
               "--patch-size", "4", "--val-fraction", "0.1")
    return out


def sha(data: pathlib.Path) -> str:
    return json.loads((data / "dataset.json").read_text())["tokenizer_sha256"]


def error_line(result: dict) -> str:
    assert result["code"] == 1, result["err"][-3000:]
    lines = [line for line in result["err"].splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in result["err"], result["err"][-3000:]
    return lines[0]


def ae_weights_sha(run: pathlib.Path) -> str:
    from calm_train.files import sha256_file
    return sha256_file(run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip() / "model.safetensors")


def test_calm_resume_compares_the_autoencoder_by_content(tiny_calm_run, tiny_ae, tiny_data, other_data, tmp_path):
    ae, calm = tmp_path / "ae", tmp_path / "calm"
    shutil.copytree(tiny_ae, ae)
    shutil.copytree(tiny_calm_run, calm)
    other_ae = tmp_path / "other_ae"
    recorded = ae_weights_sha(ae)

    def calm_args(run: str, data: pathlib.Path, autoencoder: str, steps: int) -> list[str]:
        return ["train", "tiny_calm", f"run_dir={run}", f"data.train={data}", f"model.autoencoder={autoencoder}",
                f"train.steps={steps}", "logging.progress=false"]

    results = in_one_process(
        calm_args(str(calm), tiny_data, "ae", 3),                      # (b) the same weights by another path
        ["train", "tiny_autoencoder", "run_dir=ae", f"data.train={tiny_data}", "train.steps=3",   # retrain in place
         "logging.progress=false"],
        calm_args(str(calm), tiny_data, "ae", 4),                      # (a)
        ["train", "tiny_autoencoder", f"run_dir={other_ae}", f"data.train={other_data}", "train.steps=1",
         "logging.progress=false"],
        calm_args(str(tmp_path / "fresh"), tiny_data, str(other_ae), 1),   # (c)
        cwd=tmp_path)
    assert [r["code"] for r in results[1::2]] == [0, 0], [r["err"][-2000:] for r in results[1::2]]
    same_path, retrained, other_tokenizer = results[0::2]
    assert same_path["code"] == 0, same_path["err"][-3000:]
    assert f"resumed from {calm}/checkpoints/{step_name(2)} at step 2" in same_path["err"]
    assert [r["step"] for r in metrics(calm)] == [1, 2, 3]

    line = error_line(retrained)
    assert f"{calm}/checkpoints/{step_name(3)} was trained against the autoencoder with weights sha256 {recorded}" \
        in line and ae_weights_sha(ae) in line and ae_weights_sha(ae) != recorded, line
    assert f"{calm}/checkpoints/{step_name(3)}/state.json" in line and "Fix:" in line, line
    assert [r["step"] for r in metrics(calm)] == [1, 2, 3]            # nothing written

    line = error_line(other_tokenizer)
    assert f"the autoencoder {other_ae}/checkpoints/{step_name(1)} was trained with tokenizer sha256 " \
           f"{sha(other_data)}" in line and f"has {sha(tiny_data)} ({tiny_data}/dataset.json)" in line, line
    assert "Fix:" in line and not (tmp_path / "fresh" / "config.yaml").exists()


def test_data_of_another_tokenizer_is_refused_on_resume_and_by_eval(tiny_ar_run, tiny_data, other_data, tmp_path):
    run = tmp_path / "ar"
    shutil.copytree(tiny_ar_run, run)
    tokenizer_files = {p.name: p.read_bytes() for p in (run / "tokenizer").iterdir()}
    config = (run / "config.yaml").read_text()
    ckpt = run / "checkpoints" / step_name(2)
    resume, evaluate, same = in_one_process(
        ["train", "tiny_ar", f"run_dir={run}", f"data.train={other_data}", "train.steps=3", "logging.progress=false"],
        ["eval", str(run), "--data", str(other_data), "--max-tokens", "64"],
        ["eval", str(run), "--data", str(tiny_data), "--max-tokens", "64"])
    line = error_line(resume)
    assert f"{ckpt} was trained on data with tokenizer sha256 {sha(tiny_data)} ({ckpt}/state.json)" in line, line
    assert f"has tokenizer sha256 {sha(other_data)} ({other_data}/dataset.json)" in line and "Fix:" in line, line
    assert {p.name: p.read_bytes() for p in (run / "tokenizer").iterdir()} == tokenizer_files   # not overwritten
    assert (run / "config.yaml").read_text() == config and len(metrics(run)) == 2

    line = error_line(evaluate)
    assert f"{other_data} has tokenizer sha256 {sha(other_data)} ({other_data}/dataset.json) but {ckpt} was " \
           f"trained with {sha(tiny_data)} ({ckpt}/tokenizer/dataset.json)" in line and "Fix:" in line, line
    assert same["code"] == 0 and json.loads(same["out"])["checkpoint"] == str(ckpt)


def test_every_model_source_goes_through_one_tokenizer_check(tiny_ar_run, tiny_calm_run, tiny_ae, tiny_data,
                                                            other_data, tmp_path):
    """`eval --data` of a Hugging Face export (AR) and of a reference-layout CALM export is refused on data of
    another tokenizer, as for a run; native -> hf -> native keeps the tokenizer's identity although the export
    re-serialises tokenizer.json, so eval on the training data is accepted; an autoencoder given as an export
    holding another tokenizer is refused at the start of a CALM run."""
    from calm_train.train.frozen_autoencoder import find_autoencoder
    ar_hf, ar_back, calm_hf, ae_hf = (tmp_path / name for name in ("ar_hf", "ar_native", "calm_hf", "ae_hf"))
    results = in_one_process(
        ["convert", str(tiny_ar_run), str(ar_hf), "--to", "hf"],
        ["convert", str(ar_hf), str(ar_back), "--to", "native"],
        ["convert", str(tiny_calm_run), str(calm_hf), "--to", "hf"],
        ["convert", str(tiny_ae), str(ae_hf), "--to", "hf"],
        ["eval", str(ar_hf), "--data", str(other_data), "--max-tokens", "64"],
        ["eval", str(calm_hf), "--data", str(other_data), "--max-tokens", "64"],
        ["eval", str(ar_back), "--data", str(tiny_data), "--max-tokens", "64"],
        ["eval", str(ar_hf), "--data", str(tiny_data), "--max-tokens", "64"])
    assert [r["code"] for r in results[:4]] == [0] * 4, [r["err"][-2000:] for r in results[:4]]
    assert (ar_hf / "tokenizer.json").read_bytes() != (tiny_data / "tokenizer.json").read_bytes()   # re-serialised
    for model, result in ((ar_hf, results[4]), (calm_hf, results[5])):
        line = error_line(result)
        assert f"{other_data} has tokenizer sha256 {sha(other_data)}" in line and f"but {model} was trained with " \
               f"{sha(tiny_data)}" in line and "Fix:" in line, line
    for result in results[6:]:
        assert result["code"] == 0 and json.loads(result["out"])["samples"] == 2, result["err"][-3000:]

    assert find_autoencoder(str(ae_hf)).tokenizer_sha256 == sha(tiny_data)
    shutil.copy(other_data / "tokenizer.json", ae_hf / "tokenizer.json")        # an export of another tokenizer
    other, = in_one_process(["train", "tiny_calm", f"run_dir={tmp_path / 'calm'}", f"data.train={tiny_data}",
                             f"model.autoencoder={ae_hf}", "train.steps=1", "logging.progress=false"])
    line = error_line(other)
    assert f"the autoencoder {ae_hf} was trained with tokenizer sha256 {sha(other_data)}" in line, line
    assert not (tmp_path / "calm" / "checkpoints").exists()


def test_a_previous_format_checkpoint_resumes_with_a_warning_and_no_pickle(tiny_ar_run, tiny_data, tmp_path):
    """Format 1: state.json without identity, DeepSpeed's engine/ and rng/rank_N.pt (pickles, here each a payload).
    Its safetensors and JSON carry the run on; a torn last line in metrics.jsonl is dropped with a warning."""
    run = tmp_path / "ar"
    shutil.copytree(tiny_ar_run, run)
    ckpt, marker = run / "checkpoints" / step_name(2), tmp_path / "unpickled"
    state = json.loads((ckpt / "state.json").read_text())
    autoencoder = state["identity"]["autoencoder"]
    del state["identity"], state["engine"], state["resume_from"]
    state.update({"config_hash": "0123456789abcdef", "autoencoder": autoencoder})
    (ckpt / "state.json").write_text(json.dumps(state))
    (ckpt / "rng" / "rank_00000.safetensors").unlink()
    for rel in ("rng/rank_00000.pt", "engine/state/mp_rank_00_model_states.pt",
                "engine/state/zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        (ckpt / rel).parent.mkdir(parents=True, exist_ok=True)
        (ckpt / rel).write_bytes(payload(marker))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    del manifest["files"]["rng/rank_00000.safetensors"]
    manifest["format"] = 1
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    for rel in ("state.json", "rng/rank_00000.pt", "engine/state/mp_rank_00_model_states.pt",
                "engine/state/zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        rehash(ckpt, rel)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 6.2')                  # a write cut short by a power loss
    proc = calm_train("train", "tiny_ar", f"run_dir={run}", f"data.train={tiny_data}", "train.steps=3",
                      "logging.progress=false")
    assert not marker.exists()
    assert f"{ckpt} has no identity record (an older calm-train wrote it)" in proc.stderr
    assert f"warning: dropped the torn last line of {run}/metrics.jsonl" in proc.stderr
    assert f"resumed from {ckpt} at step 2 (per-rank RNG states not carried" in proc.stderr
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]
    resumed = json.loads((run / "checkpoints" / step_name(3) / "state.json").read_text())
    assert resumed["identity"]["tokenizer_sha256"] == sha(tiny_data) and resumed["engine"]["global_steps"] == 3


def test_a_changed_mixture_is_refused_on_resume_unless_allowed_and_a_dropped_dataset_keeps_its_count(
        tiny_ar_run, tiny_data, tiny_corpus, tmp_path):
    run, second = tmp_path / "ar", tmp_path / "second"
    shutil.copytree(tiny_ar_run, run)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(tiny_corpus.read_text().splitlines(keepends=True)[-20:]))
    args = ["train", "tiny_ar", f"run_dir={run}", "logging.progress=false"]
    mixed = [*args, f"data.train={tiny_data}@0.5,{second}@0.5", "train.steps=3"]
    prepared, refused, allowed, dropped = in_one_process(
        ["prepare", "--input", str(docs), "--tokenizer", str(tiny_data / "tokenizer.json"), "--out", str(second),
         "--seq-len", "32", "--patch-size", "4", "--val-fraction", "0.1"],
        mixed, [*mixed, "train.allow_mixture_change=true"],
        [*args, f"data.train={tiny_data}", "train.steps=4", "train.allow_mixture_change=true"])

    assert prepared["code"] == 0, prepared["err"][-3000:]
    assert refused["code"] == 1, refused["err"][-3000:]
    line = refused["err"].strip().splitlines()[-1]
    latest = run / "checkpoints" / step_name(2)
    assert line == (f"calm-train train: error: {latest} was trained on the mixture tiny@1 ({latest}/state.json) but "
                    "data.train is tiny@0.5, second@0.5: the run would go on with other data shares. Fix: restore "
                    "data.train, or set train.allow_mixture_change=true to go on with the new mixture from here"), line
    assert allowed["code"] == 0, allowed["err"][-3000:]
    assert dropped["code"] == 0, dropped["err"][-3000:]
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["tokens/tiny"] + rows[2]["tokens/second"] == rows[2]["tokens"]
    assert rows[3]["tokens/second"] == rows[2]["tokens/second"] > 0                 # dropped: read no more
    assert rows[3]["tokens/tiny"] == rows[3]["tokens"] - rows[3]["tokens/second"] < rows[3]["tokens"]
