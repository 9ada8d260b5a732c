"""`pip install .` (not editable) trains: the wheel carries every package, the named configs and the DeepSpeed
presets (whose one copy is the checkout's top-level ds_configs/, installed as calm_train/ds_configs/).

The wheel is built (`pip wheel --no-deps`) from a copy of the package sources, since pip builds in place
and would leave build/ in the checkout.  It is installed with --no-deps into a fresh venv that reaches the
stack (~6 GB) through one .pth line naming the test interpreter's site-packages: such a line only extends
sys.path, the .pth files inside that directory (an editable install's finder) are not processed.  The run
starts outside the checkout with PYTHONPATH unset, and calm_train must come from the fresh venv.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(*args, **kwargs) -> str:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=900, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} exited {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_wheel_installed_in_a_fresh_venv_trains_tiny_ar(tiny_data, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for package in ("calm_train", "data_prep", "ds_configs"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    _run(sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "--no-index",
         "-w", tmp_path / "wheels")
    wheel, = (tmp_path / "wheels").glob("calm_train-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    presets = {f"calm_train/ds_configs/{p.name}" for p in (REPO / "ds_configs").glob("*.json")}
    packages = {str(p.relative_to(REPO)) for package in ("calm_train", "data_prep")
                for p in (REPO / package).rglob("__init__.py")}
    assert {"calm_train/ds_configs/zero1.json", "calm_train/configs/tiny_ar.yaml"} | presets | packages <= set(names), \
        sorted((presets | packages) - set(names))

    venv = tmp_path / "fresh"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = pathlib.Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip())
    shared = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])   # sys.prefix's
    (site / "shared_stack.pth").write_text("".join(f"{path}\n" for path in shared))
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = _run(python, "-c", "import calm_train; print(calm_train.__file__)", cwd=outside, env=env).strip()
    assert pathlib.Path(where).is_relative_to(site), where
    run = outside / "run"
    _run(venv / "bin" / "calm-train", "train", "tiny_ar", f"run_dir={run}", f"data.train={tiny_data}",
         "train.steps=2", "logging.progress=false", cwd=outside, env=env)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
