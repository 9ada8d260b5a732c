"""The native checkpoint format: what a checkpoint directory holds and how it is verified and found.

    manifest.json      format, step, files {relative path: [bytes, sha256]}, written last
    state.json         client state (progress, identity, layout)
    config.yaml        the run's resolved config
    tokenizer/         the run's tokenizer and its dataset.json
    model.safetensors  the full fp32 model (TP/PP-gathered, ZeRO-consolidated)
    optimizer.safetensors  Adam's moments under the same full names + the Adam step
    autoencoder.safetensors + autoencoder.yaml   (CALM) the frozen autoencoder it was trained against

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

import torch
import yaml

from calm_train.errors import UserError
from calm_train.files import fsync_tree, sha256_file, write_atomic

FORMAT = 1
MANIFEST = "manifest.json"
LATEST = "latest"
PARTIAL_PREFIX = ".partial-"
AUTOENCODER_WEIGHTS, AUTOENCODER_SPEC = "autoencoder.safetensors", "autoencoder.yaml"


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded; the message names the file and the fix."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


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
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest_path} is not valid JSON ({err}). Fix: delete this checkpoint") from err
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path} has format {manifest.get('format')}, this version reads {FORMAT}. "
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
    for path in sorted(pathlib.Path(root).glob("step_*")):
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
    if path.is_dir() and (path.name.startswith(PARTIAL_PREFIX) or (path / "engine").is_dir()):
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
    from safetensors.torch import load_file
    from calm_train.config import AutoencoderArch
    from calm_train.models.autoencoder import Autoencoder
    spec = yaml.safe_load((directory / AUTOENCODER_SPEC).read_text())
    ae = Autoencoder(AutoencoderArch(**spec["arch"]), spec["vocab_size"], spec["patch_size"])
    ae.load_state_dict(load_file(str(directory / AUTOENCODER_WEIGHTS)), strict=True)
    ae.requires_grad_(False)
    return ae.eval().to(device)
