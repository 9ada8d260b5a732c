"""The native checkpoint format: what a checkpoint directory holds and how it is verified and found.

    manifest.json      format, step, files {relative path: [bytes, sha256]}, written last
    state.json         client state (progress, engine counters, identity, layout)
    config.yaml        the run's resolved config
    tokenizer/         the run's tokenizer and its dataset.json
    model.safetensors  the full fp32 model (TP/PP-gathered, ZeRO-consolidated)
    optimizer.safetensors  Adam's moments under the same full names + the Adam step
    rng/rank_NNNNN.safetensors  (training checkpoints) every rank's RNG states: tensors + JSON metadata
    autoencoder.safetensors + autoencoder.yaml   (CALM) the frozen autoencoder it was trained against

Format 2 holds no pickle: every file is safetensors, JSON, YAML or a tokenizer file, and every reader
below turns a file it cannot parse into one line naming it.  Format 1 checkpoints also held
DeepSpeed's engine/ directory and rng/rank_NNNNN.pt (pickles): their safetensors, JSON and YAML files
are read, the pickles never.

A directory without a manifest, or whose files disagree with it, is not a checkpoint: it is
reported and skipped, never loaded.  Writing checkpoints atomically (partial directory, rename,
`latest`, pruning) is the checkpoint manager's job (train/checkpoint.py); this module is the format
that `convert`, `eval` and `generate` read and write too.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re

import torch
import yaml

from calm_train.errors import UserError
from calm_train.files import fsync_tree, sha256_file, write_atomic

FORMAT = 2
READABLE_FORMATS = (1, 2)
MANIFEST = "manifest.json"
LATEST = "latest"
PARTIAL_PREFIX = ".partial-"
PRUNING_PREFIX = ".pruning-"
STEP_DIR = re.compile(r"^step_(\d{8})$")
AUTOENCODER_WEIGHTS, AUTOENCODER_SPEC = "autoencoder.safetensors", "autoencoder.yaml"


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded; the message names the file and the fix."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def step_dirs(root: pathlib.Path) -> list[pathlib.Path]:
    """The checkpoint directories step_NNNNNNNN under `root` (complete or not), oldest first."""
    root = pathlib.Path(root)
    return sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir()) if root.is_dir() else []


def step_of(path: pathlib.Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def kept_steps(steps: list[int], keep_last: int, keep_every: int) -> set[int]:
    """The keep policy (train.keep_last, train.keep_every) over complete checkpoints' steps, local or remote."""
    keep = set(sorted(steps)[-keep_last:])
    return keep | {s for s in steps if keep_every and s % keep_every == 0}


def _unreadable(path: pathlib.Path, what: str, err: Exception) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable {what} ({type(err).__name__}: {str(err)[:200]}). Fix: restore "
                           "the file from a copy, or use another checkpoint")


def read_json(path: pathlib.Path):
    try:
        return json.loads(pathlib.Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _unreadable(path, "JSON file", err) from err


def read_yaml(path: pathlib.Path):
    try:
        return yaml.safe_load(pathlib.Path(path).read_text())
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise _unreadable(path, "YAML file", err) from err


def open_safetensors(path: pathlib.Path):
    """safe_open of a checkpoint file (tensors read on demand); CheckpointError when it is not safetensors."""
    from safetensors import SafetensorError, safe_open
    try:
        return safe_open(str(path), "pt")
    except (SafetensorError, OSError, ValueError) as err:
        raise _unreadable(path, "safetensors file", err) from err


def load_safetensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise _unreadable(path, "safetensors file", err) from err


def write_manifest(directory: pathlib.Path, step: int, extra: dict) -> None:
    """Record every file's size and sha256, fsync, then write manifest.json last: the mark of a complete checkpoint."""
    files = {str(p.relative_to(directory)): [p.stat().st_size, sha256_file(p)]
             for p in sorted(directory.rglob("*")) if p.is_file()}
    fsync_tree(directory)
    write_atomic(directory / MANIFEST, json.dumps({"format": FORMAT, "step": step, "files": files, **extra},
                                                  indent=1))


def verify_checkpoint(ckpt: pathlib.Path, hashes: bool = True) -> dict:
    """The manifest of a complete checkpoint, or CheckpointError naming the missing or damaged file."""
    ckpt = pathlib.Path(ckpt)
    manifest_path = ckpt / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{ckpt} is incomplete: {MANIFEST} is missing (the save was interrupted). "
                              "Fix: resume from an earlier checkpoint (the run does this by itself) or delete it")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{manifest_path} is not valid JSON ({err}). Fix: delete this checkpoint") from err
    if not isinstance(manifest, dict) or manifest.get("format") not in READABLE_FORMATS:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{manifest_path} has format {found}, this version reads {list(READABLE_FORMATS)}. "
                              "Fix: convert it with a matching calm-train version")
    for rel, (size, digest) in manifest["files"].items():
        path = ckpt / rel
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from checkpoint {ckpt}. Fix: restore the file or use "
                                  "another checkpoint")
        if path.stat().st_size != size:
            raise CheckpointError(f"{path} has {path.stat().st_size} bytes, the manifest says {size} (truncated "
                                  "or overwritten). Fix: restore the file or use another checkpoint")
        if hashes and sha256_file(path) != digest:
            raise CheckpointError(f"{path} does not match its sha256 in {manifest_path} (corrupted). Fix: restore "
                                  "the file or use another checkpoint")
    return manifest


def complete_checkpoints(root: pathlib.Path, log) -> list[pathlib.Path]:
    """The complete checkpoints under `root` (RUN_DIR/checkpoints), oldest first (sizes checked, not
    hashes); incomplete ones are reported through `log` and skipped, never deleted."""
    found = []
    for path in step_dirs(root):
        try:
            verify_checkpoint(path, hashes=False)
            found.append(path)
        except CheckpointError as err:
            log(f"skipping checkpoint: {err}")
    for path in sorted(pathlib.Path(root).glob(PARTIAL_PREFIX + "*")):
        log(f"skipping interrupted save {path} (no manifest); it is left in place for inspection")
    return found


def _stderr(message: str) -> None:
    import sys
    print(message, file=sys.stderr)         # stdout carries results only


def resolve_checkpoint(spec: str | os.PathLike) -> pathlib.Path:
    """A run directory (its latest complete checkpoint) or a checkpoint directory -> the checkpoint directory."""
    path = pathlib.Path(spec)
    if (path / MANIFEST).is_file():
        return path
    if (path / "checkpoints").is_dir():
        found = complete_checkpoints(path / "checkpoints", _stderr)
        if not found:
            raise CheckpointError(f"{path}/checkpoints holds no complete checkpoint. Fix: train longer or point "
                                  "at a checkpoint directory")
        return found[-1]
    if path.is_dir() and (path.name.startswith(PARTIAL_PREFIX) or (path / "state.json").is_file()):
        verify_checkpoint(path)                 # raises, naming what is missing
    raise CheckpointError(f"{path} is neither a run directory nor a checkpoint (no {MANIFEST} or checkpoints/). "
                          "Fix: pass RUN_DIR, RUN_DIR/checkpoints/step_NNNNNNNN or an exported directory")


# ---------------------------------------------------------------------------------------------
# the frozen autoencoder a CALM checkpoint carries


def save_autoencoder_file(autoencoder, directory: pathlib.Path) -> None:
    from safetensors.torch import save_file
    save_file({k: v.detach().cpu().contiguous() for k, v in autoencoder.state_dict().items()},
              str(directory / AUTOENCODER_WEIGHTS))
    (directory / AUTOENCODER_SPEC).write_text(yaml.safe_dump({
        "arch": dataclasses.asdict(autoencoder.arch), "vocab_size": autoencoder.vocab_size,
        "patch_size": autoencoder.patch_size}))


def load_autoencoder_file(directory: pathlib.Path, device) -> torch.nn.Module:
    from calm_train.config import AutoencoderArch
    from calm_train.models.autoencoder import Autoencoder
    spec_path = directory / AUTOENCODER_SPEC
    spec = read_yaml(spec_path)
    try:
        ae = Autoencoder(AutoencoderArch(**spec["arch"]), spec["vocab_size"], spec["patch_size"])
    except (TypeError, KeyError) as err:
        raise _unreadable(spec_path, "autoencoder spec", err) from err
    ae.load_state_dict(load_safetensors(directory / AUTOENCODER_WEIGHTS), strict=True)
    ae.requires_grad_(False)
    return ae.eval().to(device)
