"""The frozen autoencoder a CALM run trains against: found, checked against the CALM config, loaded.

`model.autoencoder` may be a run directory (its latest complete checkpoint) or its URL, a checkpoint directory
(an autoencoder's, or a CALM checkpoint's frozen autoencoder), or a directory in the reference
release's Hugging Face layout (config.json + weights; an autoencoder's, or a CALM's `ae_model`).  Its latent
size, K and vocabulary must equal the CALM config's; the rest of its architecture is taken from it.
The loaded module has requires_grad False everywhere, stays in eval mode, and is never registered
in the CALM model (so never in an optimizer, a ZeRO partition or a checkpoint's trainable state).
"""
from __future__ import annotations

import dataclasses
import pathlib

import torch
import yaml

from calm_train.config import AutoencoderArch, Config
from calm_train.errors import UserError


@dataclasses.dataclass
class AutoencoderRef:
    path: pathlib.Path            # checkpoint directory or HF-layout directory
    weights: pathlib.Path         # the weights file
    arch: AutoencoderArch
    vocab_size: int
    patch_size: int
    sha256: str                   # of the weights file
    layout: str                   # native | hf
    tokenizer_sha256: str | None  # the tokenizer it was trained with (its dataset.json); None: not recorded


def find_autoencoder(spec: str) -> AutoencoderRef:
    from calm_train.convert.native import AUTOENCODER_SPEC, AUTOENCODER_WEIGHTS, resolve_checkpoint
    from calm_train.files import sha256_file
    from calm_train.convert.remote import fetch_checkpoint
    from calm_train.train.identity import recorded_tokenizer
    path = pathlib.Path(fetch_checkpoint(spec))
    if not path.exists():
        raise UserError(f"config key 'model.autoencoder': {path} does not exist. Fix: train one with "
                        "`calm-train train tiny_autoencoder run_dir=DIR` (or the `autoencoder` config) and pass DIR")
    if (path / "config.json").is_file() and not (path / "checkpoints").is_dir():
        from calm_train.convert.reference import read_reference_autoencoder_config
        arch, vocab, k, weights = read_reference_autoencoder_config(path)
        tokenizer = recorded_tokenizer(path / "tokenizer") or recorded_tokenizer(path)
        return AutoencoderRef(path, weights, arch, vocab, k, sha256_file(weights), "hf", tokenizer)
    ckpt = resolve_checkpoint(path)
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    if saved["model"]["kind"] == "calm" and (ckpt / AUTOENCODER_WEIGHTS).is_file():
        frozen = yaml.safe_load((ckpt / AUTOENCODER_SPEC).read_text())
        weights = ckpt / AUTOENCODER_WEIGHTS
        return AutoencoderRef(ckpt, weights, AutoencoderArch(**frozen["arch"]), frozen["vocab_size"],
                              frozen["patch_size"], sha256_file(weights), "native",
                              recorded_tokenizer(ckpt / "tokenizer"))
    if saved["model"]["kind"] != "autoencoder":
        raise UserError(f"config key 'model.autoencoder': {ckpt} holds a {saved['model']['kind']} model, not an "
                        "autoencoder. Fix: point it at the autoencoder's run directory")
    arch = AutoencoderArch(**saved["model"]["ae"])
    weights = ckpt / "model.safetensors"
    return AutoencoderRef(ckpt, weights, arch, saved["model"]["vocab_size"], saved["model"]["patch_size"],
                          sha256_file(weights), "native", recorded_tokenizer(ckpt / "tokenizer"))


def check_autoencoder(cfg: Config) -> AutoencoderRef:
    """Resolve model.autoencoder and make cfg.model.ae its architecture; mismatches name both values."""
    ref = find_autoencoder(cfg.model.autoencoder)
    m = cfg.model
    for key, ours, theirs in (("model.ae.latent_size", m.ae.latent_size, ref.arch.latent_size),
                              ("model.patch_size", m.patch_size, ref.patch_size),
                              ("model.vocab_size", m.vocab_size, ref.vocab_size)):
        if ours != theirs:
            raise UserError(f"config key '{key}' is {ours} but the autoencoder {ref.path} has {theirs}. Fix: set "
                            f"{key}={theirs}, or train an autoencoder with {ours}")
    m.ae = dataclasses.replace(ref.arch)
    return ref


def load_frozen_autoencoder(ref: AutoencoderRef, device: torch.device):
    from calm_train.models.autoencoder import Autoencoder
    model = Autoencoder(ref.arch, ref.vocab_size, ref.patch_size)
    if ref.layout == "hf":
        from calm_train.convert.reference import load_reference_autoencoder_weights
        state = load_reference_autoencoder_weights(ref.weights)
    else:
        from safetensors.torch import load_file
        state = load_file(str(ref.weights))
    model.load_state_dict(state, strict=True)
    model.requires_grad_(False)
    return model.eval().to(device)
