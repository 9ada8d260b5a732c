"""`calm-train eval` and `calm-train generate`: one process, any checkpoint form, no training state.

A checkpoint is self-contained: config.yaml, tokenizer/, model.safetensors (the full model whatever
layout trained it) and, for CALM, autoencoder.safetensors + autoencoder.yaml (the frozen AE).
"""
from __future__ import annotations

import dataclasses
import pathlib

import torch

from calm_train.config import Config, config_from_tree
from calm_train.errors import UserError


@dataclasses.dataclass
class Loaded:
    cfg: Config
    model: torch.nn.Module
    autoencoder: torch.nn.Module | None
    tokenizer: object
    checkpoint: pathlib.Path


def load_for_inference(spec: str, device) -> Loaded:
    """Inside runtime.single_process(): resolve, verify and load a checkpoint for evaluation or generation."""
    from calm_train.convert.native import (CheckpointError, load_autoencoder_file, load_safetensors, read_yaml,
                                           resolve_checkpoint, verify_checkpoint)
    from calm_train.data.tokenizer import load_dataset_tokenizer
    ckpt = resolve_checkpoint(spec)
    verify_checkpoint(ckpt)
    tree = read_yaml(ckpt / "config.yaml")
    if not isinstance(tree, dict):
        raise CheckpointError(f"{ckpt}/config.yaml holds no config mapping. Fix: restore the file from a copy")
    cfg = config_from_tree(tree)
    try:
        tokenizer = load_dataset_tokenizer(ckpt / "tokenizer")
    except (ValueError, OSError, KeyError) as err:      # what the tokenizer libraries raise on foreign bytes
        raise CheckpointError(f"{ckpt}/tokenizer holds no readable tokenizer ({type(err).__name__}: "
                              f"{str(err)[:200]}). Fix: restore the files from a copy") from err
    from calm_train.train.tasks import task_for
    autoencoder = load_autoencoder_file(ckpt, device) if cfg.model.kind == "calm" else None
    model = task_for(cfg, autoencoder).build_model(cfg)
    state = load_safetensors(ckpt / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise UserError(f"{ckpt}/model.safetensors does not fit the model in {ckpt}/config.yaml (missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}). Fix: use the config it was saved with")
    model = model.to(device).eval()
    return Loaded(cfg, model, autoencoder, tokenizer, ckpt)


def evaluate_checkpoint(spec: str, data: str | None = None, max_tokens: int | None = None, seed: int = 0) -> dict:
    from calm_train.data.loader import TokenLoader
    from calm_train.parallel import runtime
    from calm_train.train.evaluate import accumulate, batch_metric_sums, finish, validation_source
    from calm_train.train.identity import check_eval_data
    with runtime.single_process(seed) as world:
        loaded = load_for_inference(spec, world.device)
        cfg = loaded.cfg
        if data:
            cfg.data.val = data
        data_dir, split = validation_source(cfg)
        check_eval_data(loaded.checkpoint, data_dir)
        loader = TokenLoader(data_dir, split, batch_size=cfg.train.micro_batch, dp_rank=0, dp_size=1, seed=seed,
                             shuffle=False, verify=True)
        totals: dict = {}
        tokens_seen, limit = 0, max_tokens or loader.num_samples * cfg.data.seq_len
        for batch in loader:
            tokens = batch["tokens"].to(world.device)
            accumulate(totals, batch_metric_sums(cfg.model.kind, loaded.model, loaded.autoencoder, tokens,
                                                 batch["sample_ids"], seed, cfg.model.patch_size))
            tokens_seen += tokens.numel()
            if tokens_seen >= limit:
                break
        return {"checkpoint": str(loaded.checkpoint), "kind": cfg.model.kind, "tokens": tokens_seen,
                **finish(totals)}


def generate_text(spec: str, prompt: str, temperature: float = 1.0, max_new_tokens: int = 64, seed: int = 0) -> str:
    from calm_train.parallel import runtime
    if not 0 <= temperature <= 1:
        raise UserError(f"--temperature {temperature} is outside [0, 1]. Fix: use 0 (greedy) up to 1")
    with runtime.single_process(seed) as world:
        loaded = load_for_inference(spec, world.device)
        ids = loaded.tokenizer.encode(prompt)
        kind = loaded.cfg.model.kind
        if kind == "autoencoder":
            raise UserError(f"{loaded.checkpoint} is an autoencoder: it reconstructs chunks, it does not continue "
                            "text. Fix: generate with a CALM or AR checkpoint")
        from calm_train.models.generate import generate_ar, generate_calm
        if kind == "calm":
            out = generate_calm(loaded.model, loaded.autoencoder, ids, max_new_tokens, temperature, seed,
                                pad_id=loaded.tokenizer.pad_id)
        else:
            out = generate_ar(loaded.model, ids, max_new_tokens, temperature, seed)
        return loaded.tokenizer.decode(out)
