"""Finished tiny runs shared by the session: copy one (runs.copy_run) before changing it (tiny_ae: tests/conftest.py)."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from runs import calm_train  # noqa: E402


@pytest.fixture(scope="session")
def tiny_calm_run(tiny_data, tiny_ae, tmp_path_factory) -> pathlib.Path:
    """A finished 2-step CALM run with checkpoints at steps 1 and 2."""
    run = tmp_path_factory.mktemp("shared") / "calm"
    calm_train("train", "tiny_calm", f"run_dir={run}", f"data.train={tiny_data}", f"model.autoencoder={tiny_ae}",
               "train.steps=2", "train.save_every=1", "logging.progress=false")
    return run


@pytest.fixture(scope="session")
def tiny_ar_run(tiny_data, tmp_path_factory) -> pathlib.Path:
    """A finished 2-step AR run with checkpoints at steps 1 and 2."""
    run = tmp_path_factory.mktemp("shared") / "ar"
    calm_train("train", "tiny_ar", f"run_dir={run}", f"data.train={tiny_data}", "train.steps=2", "train.save_every=1",
               "logging.progress=false")
    return run
