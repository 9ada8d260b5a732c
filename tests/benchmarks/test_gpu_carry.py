"""benchmarks/gpu_carry.py: the GPU run's files laid out over transfers under a size limit, joined with sha256 checks.

A scratch git checkout stands in for the repository: a tracked file (the tree every transfer sends), .whl/ and
.gpu/data/ (carried by the last transfer) and a large wheel in .gpu/big/ that no one transfer can carry.
"""
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_carry  # noqa: E402

KIB = 1024
BIG = "nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl"


@pytest.fixture
def checkout(tmp_path) -> pathlib.Path:
    repo = tmp_path / "repo"
    (repo / ".whl").mkdir(parents=True)
    (repo / ".gpu" / "data" / "docs").mkdir(parents=True)
    (repo / ".gpu" / "big").mkdir(parents=True)
    (repo / ".gitignore").write_text("/.whl/\n/.gpu/\n")
    (repo / "code.py").write_bytes(os.urandom(20 * KIB))
    (repo / ".whl" / "small-1.0-py3-none-any.whl").write_bytes(os.urandom(30 * KIB))
    (repo / ".gpu" / "data" / "docs" / "shard.mds").write_bytes(os.urandom(10 * KIB))
    (repo / ".gpu" / "big" / BIG).write_bytes(os.urandom(200 * KIB))
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "code.py", ".gitignore"], check=True)
    return repo


def test_plan_fits_every_transfer_and_join_restores_the_wheel(checkout, tmp_path):
    limit = 128 * KIB
    calls = gpu_carry.plan(checkout, limit, margin=0)
    big = (checkout / ".gpu" / "big" / BIG).read_bytes()
    tree = (checkout / "code.py").stat().st_size + (checkout / ".gitignore").stat().st_size
    # 20 KiB tree per transfer; 260 KiB carried in all: three transfers of at most 128 KiB
    assert len(calls) == 3, calls
    assert all(c["tree_bytes"] == tree and c["total_bytes"] <= limit for c in calls), calls
    assert [c["command"] for c in calls] == [gpu_carry.STASH, gpu_carry.STASH, gpu_carry.RUN]
    assert calls[-1]["carry"] == [".whl", ".gpu/data", ".gpu/call-3"]
    assert json.loads((checkout / ".gpu" / "calls.json").read_text()) == calls
    manifest = json.loads((checkout / ".gpu" / "call-1" / f"{BIG}.parts.json").read_text())
    assert manifest["sha256"] == hashlib.sha256(big).hexdigest() and sum(p["bytes"] for p in manifest["parts"]) == len(big)

    folders = sorted((checkout / ".gpu").glob("call-*"))
    written = gpu_carry.join(folders, tmp_path / "joined")
    assert [p.name for p in written] == [BIG] and written[0].read_bytes() == big


def test_join_names_a_damaged_or_missing_part_and_writes_nothing(checkout, tmp_path):
    gpu_carry.plan(checkout, 128 * KIB, margin=0)
    folders = sorted((checkout / ".gpu").glob("call-*"))
    part = next(folders[1].glob("*.part-*"))
    data = bytearray(part.read_bytes())
    data[0] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=rf"{part.name} of {BIG} is damaged"):
        gpu_carry.join(folders, tmp_path / "joined")
    part.unlink()
    with pytest.raises(SystemExit, match=rf"{part.name} of {BIG} is missing"):
        gpu_carry.join(folders, tmp_path / "joined")
    assert not (tmp_path / "joined").exists()


def test_plan_refuses_when_the_last_transfer_cannot_hold_wheels_and_data(checkout):
    with pytest.raises(SystemExit, match="exceed one transfer"):
        gpu_carry.plan(checkout, 50 * KIB, margin=0)
