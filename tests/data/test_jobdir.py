"""Stale job cleanup removes a dead job's directory and exactly its shared-memory segments."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from calm_train.data import jobdir


def _register(prefix: int, local) -> list:
    """Segments as streaming names them: NNNNNN_locals (int32 size + NUL-joined dirs + prefix) and one more."""
    text = f"{local}\0{prefix}".encode()
    paths = [jobdir.SHM_DIR / f"{prefix:06}_locals", jobdir.SHM_DIR / f"{prefix:06}_barrier"]
    paths[0].write_bytes(np.int32(4 + len(text)).tobytes() + text)
    paths[1].write_bytes(b"\0" * 8)
    return paths


@pytest.mark.skipif(not jobdir.SHM_DIR.is_dir(), reason="no /dev/shm on this platform")
def test_clean_stale_jobs_removes_only_dead_jobs(tmp_path):
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
    host = socket.gethostname()
    dead, live = tmp_path / f"job-dead-{host}", tmp_path / f"job-live-{host}"
    for root, pid in ((dead, int(dead_pid)), (live, os.getpid())):
        (root / "local").mkdir(parents=True)
        (root / "owner.json").write_text(json.dumps({"pid": pid}))
    dead_segments, live_segments = _register(987651, dead / "local" / "0"), _register(987652, live / "local" / "0")
    try:
        assert jobdir.clean_stale_jobs(tmp_path) == 1
        assert not dead.exists() and not any(p.exists() for p in dead_segments)
        assert live.exists() and all(p.exists() for p in live_segments)
    finally:
        for p in dead_segments + live_segments:
            p.unlink(missing_ok=True)


def test_open_job_makes_private_dirs(tmp_path):
    job = jobdir.open_job(tmp_path, "k1", leader=True)
    assert job.tmp.is_dir() and json.loads((job.root / "owner.json").read_text())["pid"] == os.getpid()
    job.close()
    assert not job.root.exists()
