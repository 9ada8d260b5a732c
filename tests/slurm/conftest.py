"""A real Slurm cluster on this machine for the tests in this directory (module-scoped).

cluster_up.sh installs slurm-wlm + munge when missing and starts slurmctld plus one slurmd per
emulated node n1..n4 (two 2-node jobs run side by side), with all state under a temporary directory; cluster_down.sh stops exactly
the daemons it started (by saved PIDs).  Needs root; skips with the reason when not root or when
the packages cannot be installed.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
VENV_BIN = pathlib.Path(sys.executable).parent
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
               "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
NODES = 4


class SlurmCluster:
    """Submit and watch jobs on the test cluster; jobs see this Python's venv first on PATH."""

    def __init__(self, base: pathlib.Path, nodes: int):
        self.base, self.nodes = base, nodes
        self.env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "CALM_TRAIN_PYTHON": sys.executable}

    def run(self, *args: str, **env: str) -> str:
        result = subprocess.run(args, env={**self.env, **env}, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout.strip()

    def sbatch(self, *args: str, cwd: pathlib.Path, **env: str) -> int:
        out = subprocess.run(["sbatch", "--parsable", *map(str, args)], cwd=cwd, env={**self.env, **env},
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(map(str, args))} failed: {out.stderr.strip()}")
        return int(out.stdout.strip().split(";")[0])

    def state(self, job: int) -> str:
        """JOBSTATE of one job (or array task), including finished ones (squeue --states=all)."""
        return self.run("squeue", "-h", "--states=all", "-j", str(job), "-o", "%T").splitlines()[0]

    def done(self, job: int) -> bool:
        return self.state(job) in DONE_STATES

    def field(self, job: int, name: str) -> str:
        for token in self.run("scontrol", "show", "job", str(job)).split():
            if token.startswith(f"{name}="):
                return token.split("=", 1)[1]
        raise KeyError(f"scontrol show job {job} has no {name}=")

    @staticmethod
    def poll(condition, timeout: float, what: str, period: float = 0.2):
        """Return condition()'s first truthy value; fail naming `what` after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(period)
        raise TimeoutError(f"{what}: not seen within {timeout:.0f} s")

    def wait(self, job: int, timeout: float) -> str:
        """Poll squeue until every task of the job is done; returns the (last) final state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.run("squeue", "-h", "--states=all", "-j", str(job), "-o", "%T").split()
            if states and all(s in DONE_STATES for s in states):
                return states[-1]
            time.sleep(0.3)
        raise TimeoutError(f"job {job} not done after {timeout:.0f} s (states {states}); "
                           f"logs under {self.base / 'log'}")


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory) -> SlurmCluster:
    if os.geteuid() != 0:
        pytest.skip("the Slurm tests need root: they install slurm-wlm/munge and run slurmctld and slurmd")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("slurm-wlm is not installed and there is no apt-get to install it")
    base = tmp_path_factory.mktemp("slurm_cluster")
    env = {**os.environ, "SLURM_CI_BASE": str(base), "SLURM_CI_NODES": str(NODES)}
    up = subprocess.run([str(HERE / "cluster_up.sh")], env=env, capture_output=True, text=True, timeout=300)
    if up.returncode != 0:
        subprocess.run([str(HERE / "cluster_down.sh")], env=env, capture_output=True, timeout=120)
        if shutil.which("slurmctld") is None or shutil.which("munged") is None:
            pytest.skip(f"could not install slurm-wlm + munge: {(up.stdout + up.stderr)[-800:]}")
        pytest.fail(f"cluster_up.sh failed ({up.returncode}):\n{up.stdout}\n{up.stderr}")
    print(up.stdout.strip())
    try:
        yield SlurmCluster(base, nodes=NODES)
    finally:
        down = subprocess.run([str(HERE / "cluster_down.sh")], env=env, capture_output=True, text=True,
                              timeout=120)
        print(down.stdout.strip(), down.stderr.strip())
