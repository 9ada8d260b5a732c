"""benchmarks/gpu_run.sh --dry-run: the GPU run's parts 2 (gpu_check.py) and 3 (learning_gpu.py) with tiny sizes
on CPU, through the same script, data preparation (gpu_data.py) and carried-wheel join as on the GPU machine.
The result files are checked for what the README's GPU tables and the learning table are made of."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_carry  # noqa: E402

SIDE_BY_SIDE = {"model", "variant", "micro", "attention", "step_ms", "tokens_per_s", "mfu_spec", "mfu_gemm",
                "peak_gib", "loss1", "loss_diff", "error"}
STEP_ROW = {"params", "seq_len", "micro_batch", "accumulation", "step_s", "tokens_per_s", "mfu_vs_spec",
            "mfu_vs_gemm_large", "peak_memory_gib", "losses", "first_steps_s", "engine"}
LEARNING_TABLE = {"point", "flops", "ae_recon", "calm_energy_position", "calm_real_chunk_fraction", "calm_brier1",
                  "calm_brierlm", "calm_brierlm_se", "ar_brierlm", "ar_brierlm_se", "ratio"}
QUARTER = {"ar": {"step", "flops", "brierlm", "brierlm_se", "brier1"}}
QUARTER["calm"] = QUARTER["ar"] | {"energy_position", "real_chunk_fraction"}


@pytest.fixture(scope="module")
def carry_root(tiny_corpus, shared_data, tmp_path_factory) -> pathlib.Path:
    """What the GPU run carries, at tiny sizes: .gpu/data from gpu_data.py (the tiny corpus for the Debian docs,
    the shared wikitext file held out), and a small wheel in two parts in .gpu/call-1 and .gpu/call-2."""
    import gpu_data
    root = tmp_path_factory.mktemp("carry")
    assert gpu_data.main(["--out", str(root / ".gpu" / "data"), "--vocab", "512", "--seq-len", "32",
                          "--corpus", str(tiny_corpus),
                          "--wikitext", str(shared_data / "wikitext" / "wikitext_document_level-test.json")]) == 0
    wheel = make_wheel(tmp_path_factory.mktemp("wheel"))
    size = wheel.stat().st_size
    gpu_carry.split(wheel, [root / ".gpu" / "call-1", root / ".gpu" / "call-2"], [size // 2, size - size // 2])
    return root


def make_wheel(folder: pathlib.Path) -> pathlib.Path:
    """A pure-Python wheel of one module, gpu_run_probe (what a carried wheel is, at its smallest)."""
    import zipfile
    path = folder / "gpu_run_probe-1.0-py3-none-any.whl"
    info = "gpu_run_probe-1.0.dist-info"
    files = {"gpu_run_probe.py": "CARRIED = True\n" + "# padding\n" * 2000,
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: gpu-run-probe\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
             f"{info}/top_level.txt": "gpu_run_probe\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


def gpu_run(root: pathlib.Path, tmp: pathlib.Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO), OUT=str(tmp / "out"),
                   GPU_CARRY_ROOT=str(root), GPU_SITE=str(tmp / "site"), GPU_STASH=str(tmp / "stash"),
                   GPU_WORK=str(tmp / "work"), **env)
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_run.sh"), *args], env=environ, capture_output=True,
                          text=True, timeout=600)


def test_dry_run_writes_what_the_readme_tables_need(carry_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(carry_root, root)
    # transfer 1 carries call-1 and keeps it (--stash); transfer 2 carries call-2 and runs
    (root / ".gpu" / "call-2").rename(root / ".gpu" / "later")
    assert gpu_run(root, tmp_path, "--stash").returncode == 0
    assert sorted(p.name.split(".whl.")[1] for p in (tmp_path / "stash").iterdir()) == ["part-00", "parts.json"]
    shutil.rmtree(root / ".gpu" / "call-1")
    (root / ".gpu" / "later").rename(root / ".gpu" / "call-2")
    proc = gpu_run(root, tmp_path, "--dry-run", LEARNING_BUDGET="1")
    out = tmp_path / "out"
    log = (out / "gpu_run_cpu.log").read_text()
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "gpu_carry: joined" in log and "gpu_run_probe-1.0-py3-none-any.whl" in log and "... ok)" in log, log[:3000]
    assert (tmp_path / "site" / "gpu_run_probe.py").is_file()
    assert log.count("wrote ") > 8          # the JSON files are rewritten as the parts go, not only at the end
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu_check_cpu.json", "gpu_check_cpu.log", "gpu_run_cpu.log", "learning_gpu_cpu.json", "learning_gpu_cpu.log",
        "learning_gpu_cpu.png"]

    check = json.loads((out / "gpu_check_cpu.json").read_text())
    assert check["kind"] == "cpu" and check["machine"]["device"].startswith("cpu")
    assert check["env"]["peak_gemm_large"] > 0 and check["loss_tolerance"] > 0
    backends = check["attention"]["backends"]
    assert "flash cannot run here" in backends["flash-attn-4"]["error"]
    assert all(backends["sdpa-default"][k]["rel"] < 1e-5 for k in ("out", "dq", "dk", "dv"))
    assert {"decode", "gqa"} <= set(check["attention"]["cases"])
    rows = check["side_by_side"]
    assert [(r["model"], r["variant"]) for r in rows] == [
        ("CALM-M", "baseline"), ("CALM-M", "optimised"), ("Transformer-M", "baseline"), ("Transformer-M", "optimised")]
    assert all(set(r) == SIDE_BY_SIDE and r["error"] is None and r["tokens_per_s"] > 0 for r in rows), rows
    for model in ("calm_m", "transformer_m"):
        base, opt = check["steps"][model]["baseline"], check["steps"][model]["optimised"]
        assert STEP_ROW <= set(base) and STEP_ROW <= set(opt)
        assert opt["loss_within_tolerance"] and opt["micro_batch"] > base["micro_batch"]
    assert check["steps"]["calm_m"]["optimised"]["profile"]
    assert check["energy"]["loss_vs_naive"]["rel"] < 1e-5
    assert "max rel dloss" in check["table"]

    learning = json.loads((out / "learning_gpu_cpu.json").read_text())
    assert learning["kind"] == "cpu" and learning["machine"]["device"].startswith("cpu")
    row, = learning["table"]
    assert set(row) >= LEARNING_TABLE and row["point"] == "docs_wikitext", row
    study, = learning["results"]
    assert {"calibration", "plan", "autoencoder", "calm_run", "ar_run", "in_domain", "curves"} <= set(study)
    at_calm_flops = study["calm_run"]["flops"] / study["calibration"]["ar"]["flops_per_step"]
    assert abs(study["ar_run"]["steps"] - at_calm_flops) <= 2, study     # equal FLOPs, to half a quarter's steps
    for key in ("calm", "ar"):
        assert len(study[key]) == 4 and all(QUARTER[key] <= set(q) for q in study[key]), study[key]
    assert (out / "learning_gpu_cpu.png").stat().st_size > 10_000


def test_each_part_has_its_own_timeout_and_a_failed_part_does_not_stop_the_next(carry_root, tmp_path):
    proc = gpu_run(carry_root, tmp_path, "--dry-run", CHECK_TIMEOUT="1", LEARNING_TIMEOUT="1")
    log = (tmp_path / "out" / "gpu_run_cpu.log").read_text()
    assert proc.returncode == 124, log[-3000:]
    for part in ("gpu_check", "learning_gpu"):
        assert f"== part {part}: exit 124 after" in log and "timed out" in log, log[-3000:]


def test_unknown_part_is_refused_before_anything_runs(tmp_path):
    proc = gpu_run(tmp_path, tmp_path, "--parts", "check,lerning")
    assert proc.returncode == 2 and proc.stderr.strip() == "gpu_run.sh: error: unknown part 'lerning' (check, learning)"
    assert not (tmp_path / "out").exists()
