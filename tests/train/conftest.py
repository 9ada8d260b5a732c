"""Fixtures shared by the end-to-end runs of tests/train."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from runs import calm_train  # noqa: E402


@pytest.fixture(scope="session")
def autoencoder(tiny_data, tmp_path_factory) -> pathlib.Path:
    """A frozen autoencoder for CALM: its quality does not matter here, only that it is fixed."""
    run = tmp_path_factory.mktemp("frozen") / "ae"
    calm_train("train", "tiny_autoencoder", f"run_dir={run}", f"data.train={tiny_data}", "train.steps=2",
               "logging.progress=false")
    return run
