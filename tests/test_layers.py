"""The layers of ../DESIGN.md: calls go downward only, so no two packages import each other.

    cli, demo          commands (demo runs the pipeline through the layers below, not through cli)
    train              trainers, loop, checkpoints, identity and locking, evaluation
    parallel           engine, process groups, pipeline
    convert            file formats (native checkpoint, reference release, Hugging Face)
    models             the math
    data, data_prep    prepared data, tokenizers, preparation
    config, errors, files, storage   (storage: URLs and objects; what is stored lives with its format)
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE = {"calm_train.config", "calm_train.errors", "calm_train.files", "calm_train.storage"}
ALLOWED = {
    "calm_train.errors": set(),
    "calm_train.files": {"calm_train.errors"},
    "calm_train.storage": {"calm_train.errors", "calm_train.storage"},
    "calm_train.config": {"calm_train.errors", "calm_train.storage"},
    "calm_train.models": BASE | {"calm_train.models"},
    "calm_train.data": BASE | {"calm_train.data"},
    "data_prep": BASE | {"calm_train.data", "data_prep"},
    "calm_train.convert": BASE | {"calm_train.convert", "calm_train.models", "calm_train.data"},
    "calm_train.parallel": BASE | {"calm_train.parallel", "calm_train.models", "calm_train.data"},
    "calm_train.train": BASE | {"calm_train.train", "calm_train.parallel", "calm_train.convert",
                                "calm_train.models", "calm_train.data", "data_prep"},
    "calm_train.demo": BASE | {"calm_train.train", "calm_train.parallel", "calm_train.convert",
                               "calm_train.models", "calm_train.data", "data_prep"},
}


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "calm_train" and len(parts) > 1 else parts[0]


def _imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.split(".")[0] in ("calm_train", "data_prep")}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_go_downward(layer):
    parts = layer.split(".")
    base = ROOT.joinpath(*parts)
    files = sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]
    assert files
    wrong = {f"{path.relative_to(ROOT)} imports {module}" for path in files for module in _imports(path)
             if _package(module) not in ALLOWED[layer]}
    assert not wrong, sorted(wrong)
