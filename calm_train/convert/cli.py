"""`calm-train convert SRC DST --to hf|native [--tp N --pp N]`.

--to hf      SRC: a run directory (its latest checkpoint) or a checkpoint directory.
             AR -> a `LlamaForCausalLM` directory (config.json + model.safetensors);
             CALM and autoencoder -> the CALM paper's reference release layout (`reference.py`).
             The tokenizer is written beside, loadable with `AutoTokenizer.from_pretrained(DST)`.
--to native  SRC: such a directory (ours, the reference release's, or any Llama checkpoint in
             safetensors or pytorch_model.bin, sharded or not).  DST becomes a checkpoint
             directory (config.yaml, tokenizer/, model.safetensors, for CALM also
             autoencoder.safetensors + autoencoder.yaml, manifest.json last) that `eval`,
             `generate` and `convert --to hf` accept.

`--tp/--pp` (only with --to native) are recorded as the layout to train the checkpoint with
(config.yaml's parallel.tp/pp and the manifest) and checked against the model's sizes.  They do
not shard anything: model.safetensors holds the full, layout-free fp32 state dict, and a run
splits it over its own TP x PP ranks when it loads it.

Every weight is float32; no weight changes value, only names and the QKV / gate-up fusion.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil

import yaml

from calm_train.config import Config, DataConfig, ModelConfig, ParallelConfig, config_from_tree, to_yaml, validate
from calm_train.convert import hf_llama, reference
from calm_train.convert.tokenizer_io import export_tokenizer, import_tokenizer
from calm_train.convert.weights import ConvertError, check_shapes, find_weights, read_weights, save_weights
from calm_train.convert.native import (load_autoencoder_file, resolve_checkpoint, save_autoencoder_file,
                                       verify_checkpoint, write_manifest)

DEFAULT_SEQ_LEN = 2048


@contextlib.contextmanager
def _staged(dst: pathlib.Path):
    """Write into DST's sibling `.partial-NAME` and rename it to DST at the end: DST is complete or absent."""
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConvertError(f"{dst} exists and is not empty. Fix: choose a new destination directory")
    partial = dst.parent / f".partial-{dst.name}"
    if partial.exists():
        shutil.rmtree(partial)                  # our own leftover of an interrupted conversion
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if dst.exists():
        dst.rmdir()
    os.replace(partial, dst)


# ---------------------------------------------------------------------------------------------
# native -> Hugging Face


def export_hf(src, dst) -> pathlib.Path:
    from safetensors.torch import load_file
    from calm_train.data.dataset_info import read_dataset_info
    ckpt = resolve_checkpoint(src)
    verify_checkpoint(ckpt)
    cfg = config_from_tree(yaml.safe_load((ckpt / "config.yaml").read_text()))
    m, native = cfg.model, load_file(str(ckpt / "model.safetensors"))
    seq_len = read_dataset_info(ckpt / "tokenizer").seq_len
    try:
        if m.kind == "ar":
            weights = hf_llama.ar_to_hf(native, m.backbone)
            config = hf_llama.llama_config(m.backbone, m.vocab_size, seq_len)
        elif m.kind == "calm":
            ae = load_autoencoder_file(ckpt, "cpu")
            weights = reference.calm_to_reference(native, ae.state_dict(), m)
            config = {**reference.calm_fields(m, ae.vocab_size), "max_position_embeddings": seq_len // m.patch_size}
        else:
            weights = dict(native)
            config = reference.autoencoder_fields(m.ae, m.vocab_size, m.patch_size)
    except KeyError as err:
        raise ConvertError(f"{ckpt}/model.safetensors: key {err} is missing for a {m.kind} model of "
                           f"{ckpt}/config.yaml. Fix: use the config the checkpoint was saved with") from err
    dst = pathlib.Path(dst)
    with _staged(dst) as out:
        special = export_tokenizer(ckpt / "tokenizer", out)
        save_weights(weights, out / "model.safetensors")
        (out / "config.json").write_text(json.dumps({**config, **special, "seq_len": seq_len}, indent=1) + "\n")
    return dst


# ---------------------------------------------------------------------------------------------
# Hugging Face -> native


def _is_llama(config: dict) -> bool:
    return config.get("model_type") == "llama" or "LlamaForCausalLM" in config.get("architectures", [])


def read_llama(src: pathlib.Path, config: dict) -> tuple[ModelConfig, dict]:
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        reference.config_field(config, src, key)
    arch, vocab = hf_llama.arch_from_fields(config), config["vocab_size"]
    head_dim = arch.hidden_size // arch.num_heads
    unsupported = {"attention_bias": config.get("attention_bias"), "mlp_bias": config.get("mlp_bias"),
                   "rope_scaling": config.get("rope_scaling"), "head_dim": config.get("head_dim", head_dim) != head_dim}
    named = [key for key, value in unsupported.items() if value]
    if named:
        raise ConvertError(f"{src}/config.json: {', '.join(named)} set; the backbone has no biases, plain RoPE and "
                           "head_dim = hidden_size / num_attention_heads. Fix: convert a Llama model without these")
    weights = reference.drop_ignored(read_weights(find_weights(src)))
    tied = config.get("tie_word_embeddings") and "lm_head.weight" not in weights
    if tied and "model.embed_tokens.weight" in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]   # untied from here on
    check_shapes(weights, hf_llama.ar_hf_shapes(arch, vocab), reference.FIX)
    return ModelConfig(kind="ar", vocab_size=vocab, backbone=arch), hf_llama.hf_to_ar(weights, arch)


def _seq_len(config: dict, tokens_per_position: int, patch_size: int) -> int:
    """Tokens per training sample: our exports record `seq_len`; else the positions times tokens per position."""
    tokens = config.get("seq_len")
    if tokens is None:
        positions = config.get("max_position_embeddings")
        tokens = positions * tokens_per_position if positions else DEFAULT_SEQ_LEN
    return max(patch_size, tokens - tokens % patch_size)


def import_native(src, dst, tp: int = 1, pp: int = 1) -> pathlib.Path:
    from safetensors.torch import save_file
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    config = reference.read_config(src)
    ae_state = None
    if _is_llama(config):
        model, native = read_llama(src, config)
        seq_len = _seq_len(config, 1, model.patch_size)
    elif reference.is_calm_config(config):
        model, native, ae_state, _ = reference.read_reference_calm(src)
        model.autoencoder = str(src.resolve())
        seq_len = _seq_len(config, model.patch_size, model.patch_size)
    elif reference.is_autoencoder_config(config):
        model, native, _ = reference.read_reference_autoencoder(src)
        seq_len = _seq_len(config, 1, model.patch_size)
    else:
        raise ConvertError(f"{src}/config.json is neither a Llama model (model_type llama), a CALM model "
                           "(num_mlp_layers) nor an autoencoder (num_encoder_layers). Fix: point at one of those")
    cfg = Config(run_dir=f"runs/{dst.name}", model=model, parallel=ParallelConfig(tp=tp, pp=pp),
                 data=DataConfig(seq_len=seq_len))
    validate(cfg)
    with _staged(dst) as out:
        import_tokenizer(src, out / "tokenizer", model.vocab_size, model.patch_size, seq_len)
        (out / "config.yaml").write_text(to_yaml(cfg))
        save_file({k: v.float().contiguous() for k, v in native.items()}, str(out / "model.safetensors"))
        if ae_state is not None:
            from calm_train.models.autoencoder import Autoencoder
            ae = Autoencoder(model.ae, ae_state["encoder.embed_tokens.weight"].shape[0], model.patch_size)
            ae.load_state_dict(ae_state, strict=True)
            save_autoencoder_file(ae, out)
        write_manifest(out, 0, {"kind": model.kind, "converted_from": str(src), "layout": {"tp": tp, "pp": pp}})
    return dst


def run_convert(src, dst, to: str, tp: int = 1, pp: int = 1) -> int:
    """The `convert` command; returns the exit status (UserErrors propagate to the CLI)."""
    if to == "hf":
        if (tp, pp) != (1, 1):
            raise ConvertError(f"--tp {tp} --pp {pp} with --to hf: an exported directory has no parallel layout. "
                               "Fix: drop --tp/--pp (they record the layout for --to native)")
        out = export_hf(src, dst)
    elif to == "native":
        out = import_native(src, dst, tp, pp)
    else:
        raise ConvertError(f"--to {to!r} is unknown. Fix: use --to hf or --to native")
    print(f"converted {src} -> {out} ({'Hugging Face layout' if to == 'hf' else 'native checkpoint'})")
    return 0

