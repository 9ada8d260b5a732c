"""slurm/train.sbatch and slurm/prepare.sbatch on a real Slurm cluster of emulated nodes (see conftest.py)."""
from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TRAIN_SBATCH = REPO / "slurm" / "train.sbatch"
PREPARE_SBATCH = REPO / "slurm" / "prepare.sbatch"
CALM_TRAIN = (sys.executable, "-m", "calm_train")


def node_ranks(log: str) -> dict[int, str]:
    """Global rank -> node, from launch.sh's line per node (`node n1: node rank 0 of 2, global ranks 0-0`)."""
    found = re.findall(r"^\[launch\.sh\] node (n\d): node rank \d of \d, global ranks (\d+)-(\d+)$", log, re.M)
    return {rank: node for node, first, last in found for rank in range(int(first), int(last) + 1)}


def test_launcher_runs_one_rank_per_node_and_all_reduces(slurm_cluster, tmp_path):
    job = slurm_cluster.sbatch("--nodes=2", "-o", "out-%j.log", TRAIN_SBATCH, cwd=tmp_path,
                               CALM_TRAIN_PROGRAM=str(REPO / "tests" / "slurm" / "allreduce.py"))
    assert slurm_cluster.wait(job, timeout=120) == "COMPLETED"
    log = (tmp_path / f"out-{job}.log").read_text()
    printed = {int(r): node for r, node in re.findall(r"^rank (\d)/2 node (n\d) sum 3$", log, re.M)}
    assert printed == node_ranks(log) and len(set(printed.values())) == 2, log
    assert slurm_cluster.field(job, "ExitCode") == "0:0"


# ------------------------------------------------------------------------------------------------
# data preparation as an array job + dependent merge


@pytest.fixture(scope="module")
def array_prepared(slurm_cluster, shared_data, tmp_path_factory):
    """wikitext prepared by a 2-task array job and a dependent merge job, and by one local process."""
    work = tmp_path_factory.mktemp("prepare")
    text = shared_data / "wikitext" / "wikitext_document_level-test.json"   # 1.3 MB: two 1 MiB input chunks
    out, ref = work / "array", work / "single"
    slurm_cluster.run(*CALM_TRAIN, "prepare", "--input", str(text), "--tokenizer", "train:512", "--out", str(out),
                      "--tokenizer-only")
    args = ["--input", str(text), "--tokenizer", str(out / "tokenizer.json"), "--seq-len", "64",
            "--patch-size", "4", "--val-fraction", "0.1", "--samples-per-shard", "1000"]
    single = subprocess.Popen([*CALM_TRAIN, "prepare", *args, "--out", str(ref)], env=slurm_cluster.env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tasks = slurm_cluster.sbatch("--array=0-1", "-o", "prep-%A_%a.log", PREPARE_SBATCH, *args, "--out", out, cwd=work)
    merge = slurm_cluster.sbatch(f"--dependency=afterok:{tasks}", "-o", "merge-%j.log", PREPARE_SBATCH,
                                 "--merge", "--out", out, cwd=work)
    assert single.wait(timeout=240) == 0, single.stdout.read()
    return {"out": out, "ref": ref, "work": work, "tasks": tasks,
            "merge": merge, "merge_state": slurm_cluster.wait(merge, timeout=240)}


def tree(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_array_prepare_equals_single_process_and_verifies(slurm_cluster, array_prepared):
    work, out, ref = array_prepared["work"], array_prepared["out"], array_prepared["ref"]
    assert array_prepared["merge_state"] == "COMPLETED", [p.read_text() for p in sorted(work.glob("*.log"))]
    logs = {i: (work / f"prep-{array_prepared['tasks']}_{i}.log").read_text() for i in (0, 1)}
    for i, log in logs.items():
        assert f"--shard-index {i} --num-shards 2" in log and f'"task": {i}, "num_shards": 2' in log, log
    got, want = tree(out), tree(ref)
    assert sorted(got) == sorted(want) and len([p for p in got if p.endswith(".mds.zstd")]) >= 10
    assert [p for p in got if got[p] != want[p]] == []
    info = json.loads((out / "dataset.json").read_text())
    assert set(info["splits"]) == {"train", "val"} and info["splits"]["train"]["samples"] > 5000
    check = subprocess.run([*CALM_TRAIN, "verify-data", str(out)], env=slurm_cluster.env, capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.startswith(f"ok: {out}"), check.stdout + check.stderr


# ------------------------------------------------------------------------------------------------
# tiny CALM on 2 nodes: preempted with SIGUSR1, checkpoint, requeue, resume == uninterrupted


def metrics(run_dir: pathlib.Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.fixture(scope="module")
def tiny_autoencoder(slurm_cluster, array_prepared, tmp_path_factory) -> pathlib.Path:
    run_dir = tmp_path_factory.mktemp("autoencoder") / "run"
    done = subprocess.run([*CALM_TRAIN, "train", "tiny_autoencoder", f"run_dir={run_dir}",
                           f"data.train={array_prepared['out']}", "train.steps=4", "train.eval_batches=1",
                           "logging.progress=false"], env=slurm_cluster.env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_calm_on_two_nodes_survives_preemption_with_identical_losses(slurm_cluster, array_prepared,
                                                                     tiny_autoencoder, tmp_path):
    steps = 60
    args = ["tiny_calm", f"data.train={array_prepared['out']}", f"model.autoencoder={tiny_autoencoder}",
            f"train.steps={steps}", "train.eval_batches=1", "logging.progress=false"]
    ref = slurm_cluster.sbatch("--nodes=2", "-o", "ref-%j.log", TRAIN_SBATCH, *args, "run_dir=ref", cwd=tmp_path)
    job = slurm_cluster.sbatch("--nodes=2", "-o", "pre-%j.log", TRAIN_SBATCH, *args, "run_dir=pre", cwd=tmp_path)
    slurm_cluster.poll(lambda: len(metrics(tmp_path / "pre")) >= 3 or slurm_cluster.done(job),
                       timeout=300, what=f"job {job} logging step 3")
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    states = slurm_cluster.wait(job, timeout=300), slurm_cluster.wait(ref, timeout=300)
    log = (tmp_path / f"pre-{job}.log").read_text()
    assert states == ("COMPLETED", "COMPLETED"), log[-5000:] + (tmp_path / f"ref-{ref}.log").read_text()[-3000:]
    saved = re.search(r"SIGUSR1: checkpoint saved at step (\d+); exit 75", log)
    assert saved, log[-5000:]
    step = int(saved.group(1))
    assert 3 <= step < steps
    assert f"job {job} restart 1:" in log and f"resumed from pre/checkpoints/step_{step:08d} at step {step}" in log
    assert "requeued; the restart resumes from the latest checkpoint" in log
    assert slurm_cluster.field(job, "Restarts") == "1" and slurm_cluster.field(job, "ExitCode") == "0:0"
    for run_log in (log, (tmp_path / f"ref-{ref}.log").read_text()):
        ranks = node_ranks(run_log)
        assert set(ranks) == {0, 1} and ranks[0] != ranks[1], run_log[-3000:]

    got, want = metrics(tmp_path / "pre"), metrics(tmp_path / "ref")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, steps + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert want[-1]["loss"] < want[0]["loss"]
