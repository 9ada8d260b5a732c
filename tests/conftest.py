"""Test-wide environment: CPU DeepSpeed without JIT builds, no network, quiet logging."""
import os
import pathlib

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """../shared/data beside the checkout; tests that need it skip with the reason where it is absent."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip(f"shared data directory {path} is absent (it sits beside the checkout in CI)")
    return path
