"""`calm-train eval` and `calm-train generate`: one process, any checkpoint form, no training state.

A checkpoint is self-contained: config.yaml, tokenizer/, model.safetensors (the full model whatever
layout trained it) and, for CALM, autoencoder.safetensors + autoencoder.yaml (the frozen AE).
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys

import torch
import yaml

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
    from safetensors.torch import load_file
    from calm_train.convert.native import load_autoencoder_file, resolve_checkpoint, verify_checkpoint
    from calm_train.data.tokenizer import load_dataset_tokenizer
    ckpt = resolve_checkpoint(spec)
    verify_checkpoint(ckpt)
    cfg = config_from_tree(yaml.safe_load((ckpt / "config.yaml").read_text()))
    from calm_train.train.tasks import task_for
    autoencoder = load_autoencoder_file(ckpt, device) if cfg.model.kind == "calm" else None
    model = task_for(cfg, autoencoder).build_model(cfg)
    state = load_file(str(ckpt / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise UserError(f"{ckpt}/model.safetensors does not fit the model in {ckpt}/config.yaml (missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}). Fix: use the config it was saved with")
    model = model.to(device).eval()
    return Loaded(cfg, model, autoencoder, load_dataset_tokenizer(ckpt / "tokenizer"), ckpt)


def evaluate_checkpoint(spec: str, data: str | None = None, max_tokens: int | None = None, seed: int = 0,
                        samples: int | None = None, train_data: str | None = None) -> dict:
    """Metrics of a checkpoint on held-out data (see train/evaluate.py; CALM adds train/calm_diagnostics.py).

    samples: CALM head samples per position for the Brier estimates (default 2); train_data: the prepared
    directory whose training split is CALM's chunk reference (default: the run's data.train).
    """
    from calm_train.data.loader import TokenLoader
    from calm_train.parallel import runtime
    from calm_train.train.evaluate import accumulate, batch_metric_sums, finish, reference_pool, validation_source
    with runtime.single_process(seed) as world:
        loaded = load_for_inference(spec, world.device)
        cfg = loaded.cfg
        kind = cfg.model.kind
        if samples is not None and kind != "calm":
            raise UserError(f"--samples applies to CALM checkpoints; {loaded.checkpoint} is {kind}. Fix: drop "
                            "--samples (the AR estimate is Rao-Blackwellised, the autoencoder has no Brier score)")
        if samples is not None and samples < 2:
            raise UserError(f"--samples {samples}: the Brier estimates need >= 2 samples per position. Fix: use 2 or more")
        samples = samples or 2
        if data:
            cfg.data.val = data
        data_dir, split = validation_source(cfg)
        pool = None
        if kind == "calm":
            if train_data:
                check_same_tokenizer(train_data, loaded.checkpoint)
            pool = reference_pool(cfg, train_data)
            if pool is None:
                print(f"calm-train eval: note: no training data at {train_data or cfg.data.train}: the marginal energy "
                      "and real-chunk fractions are left out (pass --train-data DIR)", file=sys.stderr)
        loader = TokenLoader(data_dir, split, batch_size=cfg.train.micro_batch, dp_rank=0, dp_size=1, seed=seed,
                             shuffle=False, verify=True)
        totals: dict = {}
        tokens_seen, limit = 0, max_tokens or loader.num_samples * cfg.data.seq_len
        for batch in loader:
            tokens = batch["tokens"].to(world.device)
            accumulate(totals, batch_metric_sums(kind, loaded.model, loaded.autoencoder, tokens,
                                                 batch["sample_ids"], seed, cfg.model.patch_size, samples, pool))
            tokens_seen += tokens.numel()
            if tokens_seen >= limit:
                break
        return {"checkpoint": str(loaded.checkpoint), "kind": kind, "tokens": tokens_seen,
                **finish(totals, kind, samples)}


def check_same_tokenizer(data_dir: str, checkpoint: pathlib.Path) -> None:
    """The reference data must be tokenized like the checkpoint's training data (same tokenizer sha256)."""
    from calm_train.data.dataset_info import read_dataset_info
    ours = read_dataset_info(checkpoint / "tokenizer").tokenizer_sha256
    theirs = read_dataset_info(data_dir).tokenizer_sha256
    if ours != theirs:
        raise UserError(f"--train-data {data_dir}: its tokenizer (sha256 {theirs[:16]}) is not the checkpoint's "
                        f"({checkpoint}/tokenizer, sha256 {ours[:16]}). Fix: pass the data the run was trained on")


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
