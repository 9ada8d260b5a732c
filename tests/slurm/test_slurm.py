"""slurm/train.sbatch and slurm/prepare.sbatch on a real 2-node Slurm cluster (see conftest.py)."""
from __future__ import annotations

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[2]
TRAIN_SBATCH = REPO / "slurm" / "train.sbatch"


def test_launcher_runs_one_rank_per_node_and_all_reduces(slurm_cluster, tmp_path):
    job = slurm_cluster.sbatch("--nodes=2", "-o", "out-%j.log", TRAIN_SBATCH, cwd=tmp_path,
                               CALM_TRAIN_PROGRAM=str(REPO / "tests" / "slurm" / "allreduce.py"))
    assert slurm_cluster.wait(job, timeout=120) == "COMPLETED"
    log = (tmp_path / f"out-{job}.log").read_text()
    ranks = dict(re.findall(r"^rank (\d)/2 node (n\d) sum 3$", log, re.M))
    assert ranks == {"0": "n1", "1": "n2"}, log
    assert "node n1: node rank 0 of 2, global ranks 0-0" in log
    assert "node n2: node rank 1 of 2, global ranks 1-1" in log
    assert slurm_cluster.field(job, "ExitCode") == "0:0"
