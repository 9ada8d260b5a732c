"""`calm-train eval` and `calm-train generate`: one process, any checkpoint form, no training state.

A checkpoint is self-contained: config.yaml, tokenizer/, model.safetensors (the full model whatever
layout trained it) and, for CALM, autoencoder.safetensors + autoencoder.yaml (the frozen AE).  An
exported or foreign directory (Hugging Face Llama, the reference CALM layout) is read through
convert/sources.py in memory; nothing is written.
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys

import torch

from calm_train.config import Config
from calm_train.errors import UserError


@dataclasses.dataclass
class Loaded:
    cfg: Config
    model: torch.nn.Module
    autoencoder: torch.nn.Module | None
    tokenizer: object
    checkpoint: pathlib.Path


def load_for_inference(spec: str, device) -> Loaded:
    """Inside runtime.single_process(): resolve, verify and load a checkpoint (or read an exported directory)
    for evaluation or generation."""
    from calm_train.convert.sources import open_source
    from calm_train.train.tasks import task_for
    source = open_source(spec)
    cfg = source.config
    tokenizer = source.tokenizer()
    if tokenizer is None:
        raise UserError(f"{source.path} holds no tokenizer.json or tokenizer.model. Fix: put the model's tokenizer "
                        "files beside its config.json")
    state, autoencoder = source.read()
    if autoencoder is not None:
        autoencoder = autoencoder.to(device)
    model = task_for(cfg, autoencoder).build_model(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise UserError(f"{source.weights} does not fit the model of {source.path} (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}). Fix: use the config it was saved with")
    model = model.to(device).eval()
    return Loaded(cfg, model, autoencoder, tokenizer, source.path)


def evaluate_checkpoint(spec: str, data: str | None = None, max_tokens: int | None = None, seed: int = 0,
                        samples: int | None = None, train_data: str | None = None) -> dict:
    """Score every sample of the validation split exactly once (or the first max_tokens // seq_len of them).

    See train/evaluate.py; CALM adds train/calm_diagnostics.py.  samples: CALM head samples per position
    for the Brier estimates (default 2); train_data: the prepared directory whose training split is CALM's
    chunk reference (default: the run's data.train).
    """
    from calm_train.data.loader import TokenLoader
    from calm_train.parallel import runtime
    from calm_train.train.evaluate import accumulate, batch_metric_sums, finish, reference_pool, validation_source
    from calm_train.train.identity import check_eval_data
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
        elif not cfg.data.train:
            raise UserError(f"{loaded.checkpoint} names no data (an exported or converted model). Fix: pass --data DIR "
                            "(a `calm-train prepare` output with the model's tokenizer)")
        source = validation_source(cfg)
        if source is None:
            raise UserError(f"{cfg.data.train} has no val split and the run set no data.val. Fix: pass "
                            "--data DIR of a prepared directory to evaluate on")
        check_eval_data(loaded.checkpoint, source[0])
        pool = None
        if kind == "calm":
            if train_data:
                check_eval_data(loaded.checkpoint, train_data)
            pool = reference_pool(cfg, train_data)
            if pool is None:
                print(f"calm-train eval: note: no single local training split at {train_data or cfg.data.train} (gone, "
                      "remote, or a mixture): the marginal energy and real-chunk fractions are left out (pass --train-data DIR)",
                      file=sys.stderr)
        loader = TokenLoader(*source, batch_size=cfg.train.micro_batch, dp_rank=0, dp_size=1, seed=seed,
                             shuffle=False, verify=True)
        seq_len = loader.info.seq_len
        limit = loader.num_samples if max_tokens is None else min(loader.num_samples, max_tokens // seq_len)
        if limit < 1:
            raise UserError(f"--max-tokens {max_tokens} is less than one sample of {seq_len} tokens. "
                            f"Fix: give --max-tokens {seq_len} or more")
        totals: dict = {}
        scored = 0
        for batch in loader.one_pass():
            tokens, ids = batch["tokens"][:limit - scored].to(world.device), batch["sample_ids"][:limit - scored]
            accumulate(totals, batch_metric_sums(kind, loaded.model, loaded.autoencoder, tokens, ids,
                                                 seed, cfg.model.patch_size, samples, pool))
            scored += len(ids)
            if scored == limit:
                break
        loader.close()
        return {"checkpoint": str(loaded.checkpoint), "kind": kind, "samples": scored,
                "tokens": scored * seq_len, **finish(totals, kind, samples)}


def generate_text(spec: str, prompt: str, temperature: float = 1.0, max_new_tokens: int = 64, seed: int = 0) -> str:
    from calm_train.parallel import runtime
    if not 0 <= temperature <= 1:
        raise UserError(f"--temperature {temperature} is outside [0, 1]. Fix: use 0 (greedy) up to 1")
    with runtime.single_process(seed) as world:
        loaded = load_for_inference(spec, world.device)
        ids = loaded.tokenizer.encode(prompt)
        kind = loaded.cfg.model.kind
        context = loaded.cfg.data.seq_len
        if context and len(ids) + max_new_tokens > context:
            print(f"calm-train generate: warning: the prompt's {len(ids)} tokens + --max-new-tokens {max_new_tokens} "
                  f"exceed the {context} tokens the model was trained on (data.seq_len); positions beyond them were "
                  "never trained and the text usually degrades there", file=sys.stderr)
        if kind == "autoencoder":
            raise UserError(f"{loaded.checkpoint} is an autoencoder: it reconstructs chunks, it does not continue "
                            "text. Fix: generate with a CALM or AR checkpoint")
        from calm_train.models.generate import generate_ar, generate_calm
        if kind == "ar" and not ids:
            raise UserError(f"--prompt {prompt!r} has no tokens, and the AR model {loaded.checkpoint} continues "
                            "at least one. Fix: give a non-empty --prompt")
        if kind == "calm":
            out = generate_calm(loaded.model, loaded.autoencoder, ids, max_new_tokens, temperature, seed,
                                pad_id=loaded.tokenizer.pad_id)
        else:
            out = generate_ar(loaded.model, ids, max_new_tokens, temperature, seed)
        return loaded.tokenizer.decode(out)
