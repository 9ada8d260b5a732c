"""Every model directory calm-train reads, opened one way: for `convert --to native`, for `eval` and
`generate` of an exported directory, and for `model.init_from` (warm start).

    open_source(PATH) -> Source       finds the layout, reads and checks its config (no weights yet)
    Source.read()     -> (state, ae)  the full tp = pp = 1 native state dict in float32, checked against the
                                      config, and for CALM the frozen autoencoder it comes with

Layouts:
  native     a run directory (its latest complete checkpoint) or a checkpoint directory, verified
             against its manifest (convert/native.py); or their URL (convert/remote.py)
  llama      a Hugging Face `LlamaForCausalLM` directory: safetensors or pytorch_model.bin (read with
             weights_only=True), sharded or not, any float dtype, GQA, tied or untied output layer
             (tied: `lm_head.weight` absent, or present and equal to the embedding; the native
             model's output layer starts as a copy of the embedding)
  reference  the CALM release's CALM or autoencoder directory (reference.py), ours or theirs
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import torch

from calm_train.config import Config, DataConfig, ModelConfig, config_from_tree
from calm_train.convert import hf_llama, reference
from calm_train.convert.native import (MANIFEST, CheckpointError, load_autoencoder_file, load_safetensors, read_yaml,
                                       resolve_checkpoint, verify_checkpoint)
from calm_train.convert.weights import ConvertError, check_shapes, find_weights, read_weights, resolve_aliases
from calm_train.files import sha256_file

DEFAULT_SEQ_LEN = 2048
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclasses.dataclass
class Source:
    path: pathlib.Path           # the directory read (a native run directory resolves to its checkpoint)
    layout: str                  # native | llama | reference
    config: Config               # the model and data.seq_len (native: the checkpoint's whole config.yaml)
    weights: pathlib.Path        # the weights file, or the index of its shards

    @property
    def model(self) -> ModelConfig:
        return self.config.model

    def read(self) -> tuple[dict[str, torch.Tensor], torch.nn.Module | None]:
        """(full native state dict, the frozen autoencoder for CALM else None)."""
        if self.layout == "native":
            ae = load_autoencoder_file(self.path, "cpu") if self.model.kind == "calm" else None
            return load_safetensors(self.weights), ae
        if self.layout == "llama":
            return _read_llama(self), None
        if self.model.kind == "autoencoder":
            return reference.load_reference_autoencoder_weights(self.weights), None
        _, state, ae_state, _ = reference.read_reference_calm(self.path)
        return state, _autoencoder_module(self.model, ae_state)

    def weight_files(self) -> list[pathlib.Path]:
        if self.weights.name.endswith(".index.json"):
            names = sorted(set(json.loads(self.weights.read_text())["weight_map"].values()))
            return [self.weights.parent / name for name in names]
        return [self.weights]

    def weights_sha256(self) -> str:
        """sha256 of the weights file; of a sharded checkpoint, of its `name sha256` lines (one per shard)."""
        if self.layout == "native":
            return json.loads((self.path / MANIFEST).read_text())["files"][self.weights.name][1]
        files = self.weight_files()
        if len(files) == 1:
            return sha256_file(files[0])
        lines = "".join(f"{f.name} {sha256_file(f)}\n" for f in files)
        return hashlib.sha256(lines.encode()).hexdigest()

    def tokenizer(self):
        """The tokenizer that comes with the model, or None when the directory has none."""
        from calm_train.data.tokenizer import load_dataset_tokenizer, load_tokenizer
        if self.layout == "native":
            try:
                return load_dataset_tokenizer(self.path / "tokenizer")
            except (ValueError, OSError, KeyError) as err:      # what the tokenizer libraries raise on foreign bytes
                raise CheckpointError(f"{self.path}/tokenizer holds no readable tokenizer ({type(err).__name__}: "
                                      f"{str(err)[:200]}). Fix: restore the files from a copy") from err
        main = next((self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()), None)
        if main is None:
            return None
        try:
            return load_tokenizer(main)
        except (ValueError, OSError) as err:
            raise ConvertError(f"{main}: cannot be read as a tokenizer ({err})") from err


def open_source(spec) -> Source:
    """A run or checkpoint directory, a Hugging Face Llama directory or a reference-release directory; or the URL
    of a run's or a checkpoint's prefix in a bucket (downloaded into the local cache and verified first)."""
    from calm_train.convert.remote import fetch_checkpoint
    path = pathlib.Path(fetch_checkpoint(spec))
    if not path.exists():
        raise ConvertError(f"{path} does not exist. Fix: pass a run directory, a checkpoint directory or an "
                           "exported (Hugging Face-layout) directory")
    if not (path / "config.json").is_file() or (path / MANIFEST).is_file():
        ckpt = resolve_checkpoint(path)
        verify_checkpoint(ckpt)
        tree = read_yaml(ckpt / "config.yaml")
        if not isinstance(tree, dict):
            raise CheckpointError(f"{ckpt}/config.yaml holds no config mapping. Fix: restore the file from a copy")
        cfg = config_from_tree(tree)
        return Source(ckpt, "native", cfg, ckpt / "model.safetensors")
    config = reference.read_config(path)
    if _is_llama(config):
        model, seq_len = _llama_model(path, config), _seq_len(config, 1, 1)
        layout = "llama"
    elif reference.is_calm_config(config):
        ae_arch, ae_vocab, ae_k, _ = reference.read_reference_autoencoder_config(path)
        model = reference.calm_model_config(config, ae_arch, path)
        if ae_k != model.patch_size:
            raise ConvertError(f"{path}/config.json: patch_size {model.patch_size} differs from its autoencoder's "
                               f"{ae_k}. Fix: {reference.FIX}")
        model.autoencoder = str(path.resolve())
        seq_len, layout = _seq_len(config, model.patch_size, model.patch_size), "reference"
    elif reference.is_autoencoder_config(config):
        arch, vocab, K = reference.autoencoder_from_fields(config, path)
        model = ModelConfig(kind="autoencoder", vocab_size=vocab, patch_size=K, ae=arch)
        seq_len, layout = _seq_len(config, 1, K), "reference"
    else:
        raise ConvertError(f"{path}/config.json is neither a Llama model (model_type llama), a CALM model "
                           "(num_mlp_layers) nor an autoencoder (num_encoder_layers). Fix: point at one of those")
    return Source(path, layout, Config(run_dir=f"runs/{path.name}", model=model, data=DataConfig(seq_len=seq_len)),
                  find_weights(path))


def _is_llama(config: dict) -> bool:
    return config.get("model_type") == "llama" or "LlamaForCausalLM" in config.get("architectures", [])


def _seq_len(config: dict, tokens_per_position: int, patch_size: int) -> int:
    """Tokens per training sample: our exports record `seq_len`; else the positions times tokens per position."""
    tokens = config.get("seq_len")
    if tokens is None:
        positions = config.get("max_position_embeddings")
        tokens = positions * tokens_per_position if positions else DEFAULT_SEQ_LEN
    return max(patch_size, tokens - tokens % patch_size)


def _llama_model(src: pathlib.Path, config: dict) -> ModelConfig:
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        reference.config_field(config, src, key)
    arch = hf_llama.arch_from_fields(config)
    head_dim = arch.hidden_size // arch.num_heads
    unsupported = {"attention_bias": config.get("attention_bias"), "mlp_bias": config.get("mlp_bias"),
                   "rope_scaling": config.get("rope_scaling"), "head_dim": config.get("head_dim", head_dim) != head_dim}
    named = [key for key, value in unsupported.items() if value]
    if named:
        raise ConvertError(f"{src}/config.json: {', '.join(named)} set; the backbone has no biases, plain RoPE and "
                           "head_dim = hidden_size / num_attention_heads. Fix: convert a Llama model without these")
    return ModelConfig(kind="ar", vocab_size=config["vocab_size"], backbone=arch)


def _read_llama(source: Source) -> dict[str, torch.Tensor]:
    config = reference.read_config(source.path)
    arch = source.model.backbone
    weights = reference.drop_ignored(read_weights(source.weights))
    tied = bool(config.get("tie_word_embeddings", False))
    if tied:
        resolve_aliases(weights, {hf_llama.LM_HEAD: hf_llama.EMBED})
        check_shapes(weights, hf_llama.llama_shapes(arch, source.model.vocab_size, "model."), reference.FIX)
        weights[hf_llama.LM_HEAD] = weights[hf_llama.EMBED].clone()     # the native output layer is its own
    else:
        check_shapes(weights, hf_llama.ar_hf_shapes(arch, source.model.vocab_size), reference.FIX)
    return hf_llama.hf_to_ar(weights, arch)


def _autoencoder_module(model: ModelConfig, ae_state: dict[str, torch.Tensor]) -> torch.nn.Module:
    from calm_train.models.autoencoder import Autoencoder
    ae = Autoencoder(model.ae, ae_state["encoder.embed_tokens.weight"].shape[0], model.patch_size)
    ae.load_state_dict(ae_state, strict=True)
    return ae.requires_grad_(False).eval()
