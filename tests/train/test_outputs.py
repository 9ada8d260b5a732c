"""What a run shows and writes, from one 2-process run on a weighted mixture of two datasets, launched as a
user would (stderr not a TTY, DS_ACCELERATOR unset): stdout carries only results, library notes appear
once, one progress line per train.log_every steps, peak memory, MFU with its peak and per-dataset token
counts in metrics.jsonl, the profiler trace of train.profile, TensorBoard events; then eval's stdout is
JSON and generate echoes the prompt and warns past the trained context."""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

STEPS, LOG_EVERY = 6, 2
WARNING = re.compile(r"warn", re.I)


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}


def _calm_train(*args, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    return subprocess.run([sys.executable, *launcher, "-m", "calm_train", *map(str, args)], capture_output=True,
                          text=True, timeout=900, env=_env())


@pytest.fixture(scope="module")
def second_data(tiny_data, tiny_corpus, tmp_path_factory) -> pathlib.Path:
    """The last 20 documents of the corpus, with tiny_data's tokenizer, seq_len and K."""
    root = tmp_path_factory.mktemp("second")
    (root / "docs.jsonl").write_text("".join(tiny_corpus.read_text().splitlines(keepends=True)[-20:]))
    proc = _calm_train("prepare", "--input", root / "docs.jsonl", "--tokenizer", tiny_data / "tokenizer.json",
                       "--out", root / "code", "--seq-len", 32, "--patch-size", 4, "--val-fraction", 0.1)
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)                                    # prepare's result: one JSON object
    return root / "code"


@pytest.fixture(scope="module")
def mixed_run(tiny_data, second_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "mixed"
    proc = _calm_train("train", "tiny_ar", f"run_dir={run}", f"data.train={tiny_data}@0.75,{second_data}@0.25",
                       f"train.steps={STEPS}", f"train.log_every={LOG_EVERY}", "train.profile=2:3",
                       "logging.tensorboard=true", nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run, proc


def test_train_stdout_is_empty_and_library_notes_appear_once(mixed_run):
    _, proc = mixed_run
    assert proc.stdout == ""
    assert proc.stderr.count("Setting accelerator to CPU") <= 1 and "Apex is not installed" not in proc.stderr
    notes = [line for line in proc.stderr.splitlines() if WARNING.search(line) and "OMP_NUM_THREADS" not in line]
    assert len(notes) <= 3, notes                              # was ~29 for two ranks


def test_non_tty_progress_is_one_plain_line_per_log_every_steps(mixed_run):
    _, proc = mixed_run
    assert "\r" not in proc.stderr
    steps = [int(m) for m in re.findall(r"^\[calm-train\] step (\d+)/6 loss [0-9.]+ \| [0-9,]+ tok/s \| eta [0-9:]+ "
                                        r"mem [0-9.]+ GiB$", proc.stderr, re.M)]
    assert steps == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))


def test_metrics_rows_carry_peak_memory_mfu_and_tokens_per_dataset(mixed_run, tiny_data, second_data):
    run, _ = mixed_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for r in rows:
        assert 0.05 < r["peak_mem_gib"] < 64
        assert r["mfu_peak_source"] == "measured GEMM" and 0 < r["mfu"] == r["mfu_measured"] <= 1
        by_dataset = r[f"tokens/{tiny_data.name}"], r[f"tokens/{second_data.name}"]
        assert sum(by_dataset) == r["tokens"] == r["step"] * 8 * 32 and all(t % 32 == 0 for t in by_dataset)
    assert rows[-1][f"tokens/{tiny_data.name}"] > rows[-1][f"tokens/{second_data.name}"]


def test_profile_trace_covers_the_asked_steps(mixed_run):
    run, _ = mixed_run
    trace = json.loads((run / "profile" / "trace_steps_2-3.json").read_text())
    steps = sorted(e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("train_step"))
    assert steps == ["train_step 2", "train_step 3"]
    assert len(trace["traceEvents"]) > 100 and any(e.get("name") == "aten::mm" for e in trace["traceEvents"])


def test_tensorboard_events_are_readable(mixed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run, _ = mixed_run
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("train/loss")] == [
        (r["step"], round(r["loss"], 4)) for r in rows]
    assert [e.step for e in events.Scalars("eval/brierlm")] == [STEPS]


def test_eval_stdout_is_json_without_ds_accelerator(mixed_run):
    run, _ = mixed_run
    proc = _calm_train("eval", run, "--max-tokens", 256)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)                           # what `calm-train eval RUN | jq` reads
    assert result["kind"] == "ar" and 0 <= result["brierlm"] <= 100
    assert len([line for line in proc.stderr.splitlines() if WARNING.search(line)]) <= 1, proc.stderr


def test_generate_echoes_the_prompt_and_warns_past_the_trained_context(mixed_run):
    run, _ = mixed_run
    proc = _calm_train("generate", run, "--prompt", "The module", "--temperature", 0, "--max-new-tokens", 40, "--echo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("The module") and len(proc.stdout) > len("The module\n")
    assert "exceed the 32 tokens the model was trained on" in proc.stderr


def test_a_mixture_of_different_tokenizers_is_refused_before_training(tiny_data, tiny_corpus, tmp_path):
    other = tmp_path / "other"
    assert _calm_train("prepare", "--input", tiny_corpus, "--tokenizer", "train:300", "--out", other,
                       "--seq-len", 32, "--patch-size", 4).returncode == 0
    proc = _calm_train("train", "tiny_ar", f"run_dir={tmp_path / 'run'}", f"data.train={tiny_data}@0.5,{other}@0.5")
    assert proc.returncode == 1 and not (tmp_path / "run").exists()
    error, = [line for line in proc.stderr.splitlines() if "error" in line]
    assert "tokenizer sha256" in error and str(tiny_data) in error and str(other) in error and "Fix:" in error
