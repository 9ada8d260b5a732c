"""CALM and its autoencoder <-> the layout of the CALM paper's reference release (Hugging Face style).

What the reference's training scripts write (`save_pretrained(..., safe_serialization=False)`):

Autoencoder directory: config.json (AutoencoderConfig: patch_size, latent_size, hidden_size,
intermediate_size, num_encoder_layers, num_decoder_layers, ae_dropout, kl_clamp, kl_weight,
vocab_size, rms_norm_eps, architectures ["Autoencoder"], no model_type) and pytorch_model.bin with
the native keys (encoder.*, decoder.*) plus `decoder.lm_head_weight`: the decoder's output layer
is the encoder's embedding, registered a second time, so the file holds it under both names.

CALM directory: config.json (CALMConfig: ae_path, patch_size, latent_size, num_mlp_layers,
num_samples, beta, noise_size and the backbone's Llama fields; no model_type, which reads back as
"energy") and weights under these prefixes:
    transformer.      the backbone as a Llama model (embed_tokens, layers.{i}.*, norm)  <-> embed_tokens, backbone.*
    embed_proj.       Linear, SiLU, Linear, LayerNorm (same names)
    mlp_generator.    the energy head; `generative_head.` is the same module under a second name,
                      so a .bin holds every head tensor twice                          <-> generative_head.*
    ae_model.         the frozen autoencoder, including `ae_model.decoder.lm_head_weight`
                                                                                        <-> autoencoder.safetensors
Import accepts each alias (`generative_head.*`, `*decoder.lm_head_weight`) present or absent, after
checking it equals the tensor it names.  Export writes every key the reference model's state dict
has (aliases as cloned tensors: `from_pretrained` would leave an absent `decoder.lm_head_weight`
uninitialised without a warning), and for CALM the autoencoder as its own reference directory
`autoencoder/` named by an absolute `ae_path` (what `EnergyTransformer.__init__` loads).  Our
exports add `ae_config` (the autoencoder's config), `num_target_samples` and `seq_len`;
without `ae_config` the autoencoder's sizes are read off its weights.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import torch

from calm_train.config import AutoencoderArch, EnergyHeadArch, ModelConfig
from calm_train.convert.hf_llama import (arch_from_fields, backbone_fields, backbone_to_llama, llama_shapes,
                                         llama_to_backbone)
from calm_train.convert.weights import (ConvertError, Weights, check_shapes, find_weights, read_weights,
                                        resolve_aliases)

AE_PREFIX, HEAD_PREFIX, BACKBONE_PREFIX = "ae_model.", "mlp_generator.", "transformer."
HEAD_ALIAS = "generative_head."
AE_ALIASES = {"decoder.lm_head_weight": "encoder.embed_tokens.weight"}
AUTOENCODER_DIR = "autoencoder"       # where a CALM export puts its autoencoder (config.json's ae_path)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)    # buffers older transformers versions saved
FIX = "use the config.json that was saved with these weights, or re-export with `calm-train convert --to hf`"


def read_config(directory: pathlib.Path) -> dict:
    path = pathlib.Path(directory) / "config.json"
    if not path.is_file():
        raise ConvertError(f"{path} is missing: {directory} is not a Hugging Face-layout directory. Fix: pass a "
                           "directory with config.json and its weights")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConvertError(f"{path}: not valid JSON ({err}). Fix: {FIX}") from err
    if not isinstance(config, dict):
        raise ConvertError(f"{path} holds a {type(config).__name__}, not a JSON object. Fix: {FIX}")
    return config


def config_field(config: dict, path: pathlib.Path, key: str) -> int:
    """A size of config.json (every field read through here is a count or a width): a positive integer."""
    if key not in config:
        raise ConvertError(f"{path}/config.json: key '{key}' is missing. Fix: add it (the value the model was "
                           "trained with)")
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConvertError(f"{path}/config.json: '{key}' is {value!r}, not a positive integer. Fix: {FIX}")
    return value


def checked_heads(config: dict, path: pathlib.Path) -> dict:
    """config.json's attention heads fit its width: num_attention_heads (and num_key_value_heads, when given)
    positive integers, the heads dividing hidden_size, the key/value heads dividing the heads."""
    heads = config_field(config, path, "num_attention_heads")
    kv = config_field(config, path, "num_key_value_heads") if config.get("num_key_value_heads") is not None else heads
    if config_field(config, path, "hidden_size") % heads or heads % kv:
        raise ConvertError(f"{path}/config.json: hidden_size {config['hidden_size']}, num_attention_heads {heads} "
                           f"and num_key_value_heads {kv} do not divide (hidden_size by the heads, the heads by the "
                           f"key/value heads). Fix: {FIX}")
    return config


def check_layers_against_weights(counts: dict[str, int], path: pathlib.Path, weights_path: pathlib.Path) -> None:
    """Each layer count of config.json at most the number of tensors in the weights' header: a crafted
    `num_hidden_layers: 1000000` is refused before a million layers' shapes (or modules) are built."""
    from calm_train.convert.weights import weight_names
    tensors = len(weight_names(weights_path))
    for key, count in counts.items():
        if count > tensors:
            raise ConvertError(f"{path}/config.json: {key} = {count}, but {weights_path} holds {tensors} tensors in "
                               f"all: the config does not describe these weights. Fix: {FIX}")


def is_calm_config(config: dict) -> bool:
    return "num_mlp_layers" in config or "noise_size" in config


def is_autoencoder_config(config: dict) -> bool:
    return "num_encoder_layers" in config and not is_calm_config(config)


# ---------------------------------------------------------------------------------------------
# the autoencoder


def autoencoder_fields(arch: AutoencoderArch, vocab_size: int, patch_size: int) -> dict:
    return {"architectures": ["Autoencoder"], "patch_size": patch_size,
            "latent_size": arch.latent_size, "hidden_size": arch.hidden_size,
            "intermediate_size": arch.intermediate_size, "num_encoder_layers": arch.num_encoder_layers,
            "num_decoder_layers": arch.num_decoder_layers, "ae_dropout": arch.ae_dropout, "kl_clamp": arch.kl_clamp,
            "kl_weight": arch.kl_weight, "vocab_size": vocab_size, "rms_norm_eps": arch.norm_eps,
            "mask_prob": arch.mask_prob, "torch_dtype": "float32"}


def autoencoder_from_fields(config: dict, path: pathlib.Path) -> tuple[AutoencoderArch, int, int]:
    """(arch, vocab_size, patch_size); mask_prob, absent from the reference config, keeps our default."""
    get = functools.partial(config_field, config, path)
    arch = AutoencoderArch(hidden_size=get("hidden_size"), intermediate_size=get("intermediate_size"),
                           num_encoder_layers=get("num_encoder_layers"), num_decoder_layers=get("num_decoder_layers"),
                           latent_size=get("latent_size"), ae_dropout=float(config.get("ae_dropout", 0.15)),
                           mask_prob=float(config.get("mask_prob", AutoencoderArch.mask_prob)),
                           kl_clamp=float(config.get("kl_clamp", 0.5)), kl_weight=float(config.get("kl_weight", 1e-3)),
                           norm_eps=float(config.get("rms_norm_eps", 1e-6)))
    return arch, get("vocab_size"), get("patch_size")


def _autoencoder_from_weights(ae: dict[str, torch.Tensor]) -> tuple[AutoencoderArch, int, int]:
    """Sizes read off an autoencoder's weights (for a CALM release whose config.json omits them)."""
    vocab, hidden = ae["encoder.embed_tokens.weight"].shape

    def count(part: str) -> int:
        return sum(1 for k in ae if k.startswith(f"{part}.{part}_layers.") and k.endswith(".layernorm.weight"))

    arch = AutoencoderArch(hidden_size=hidden,
                           intermediate_size=ae["encoder.encoder_layers.0.mlp.gate_proj.weight"].shape[0],
                           num_encoder_layers=count("encoder"), num_decoder_layers=count("decoder"),
                           latent_size=ae["decoder.latent_to_hidden.weight"].shape[1])
    return arch, vocab, ae["encoder.squeeze_layer.weight"].shape[1] // hidden


def autoencoder_shapes(arch: AutoencoderArch, vocab_size: int, patch_size: int) -> dict[str, tuple[int, ...]]:
    from calm_train.models.autoencoder import Autoencoder
    with torch.device("meta"):
        model = Autoencoder(arch, vocab_size, patch_size)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def drop_ignored(weights: Weights) -> Weights:
    for key in [k for k in weights if k.endswith(IGNORED_SUFFIXES)]:
        del weights[key]
    return weights


def read_reference_autoencoder_config(directory) -> tuple[AutoencoderArch, int, int, pathlib.Path]:
    """(arch, vocab_size, patch_size, weights path) of an autoencoder directory, or of a CALM directory's `ae_model`."""
    directory = pathlib.Path(directory)
    config = read_config(directory)
    weights_path = find_weights(directory)
    if is_autoencoder_config(config) or (is_calm_config(config) and "ae_config" in config):
        arch, vocab, K = autoencoder_from_fields(config if is_autoencoder_config(config) else config["ae_config"],
                                                 directory)
        check_layers_against_weights({"num_encoder_layers": arch.num_encoder_layers,
                                      "num_decoder_layers": arch.num_decoder_layers}, directory, weights_path)
        return arch, vocab, K, weights_path
    if is_calm_config(config):
        ae = _strip(read_weights(weights_path), AE_PREFIX)
        if not ae:
            raise ConvertError(f"{weights_path} holds no {AE_PREFIX}* weights and {directory}/config.json no "
                               "ae_config. Fix: point at the autoencoder's own directory")
        return (*_autoencoder_from_weights(ae), weights_path)
    raise ConvertError(f"{directory}/config.json describes neither an autoencoder (num_encoder_layers) nor a CALM "
                       "model (num_mlp_layers). Fix: point model.autoencoder at the autoencoder's directory")


def _strip(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def load_reference_autoencoder_weights(weights_path) -> dict[str, torch.Tensor]:
    """The native Autoencoder's state dict from a reference weight file (an autoencoder's, or a CALM's `ae_model.`),
    checked against the config.json beside it."""
    weights_path = pathlib.Path(weights_path)
    arch, vocab, K, _ = read_reference_autoencoder_config(weights_path.parent)
    weights = drop_ignored(read_weights(weights_path))
    if any(k.startswith(AE_PREFIX) for k in weights):
        weights = Weights(_strip(weights, AE_PREFIX), {k[len(AE_PREFIX):]: f for k, f in weights.origin.items()},
                          weights.source)
    resolve_aliases(weights, AE_ALIASES)
    check_shapes(weights, autoencoder_shapes(arch, vocab, K), FIX)
    return dict(weights)


def autoencoder_to_reference(ae: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The autoencoder's keys as the reference model's state dict has them: with the tied alias, cloned."""
    return {**ae, **{alias: ae[target].clone() for alias, target in AE_ALIASES.items()}}


# ---------------------------------------------------------------------------------------------
# CALM


def calm_fields(model: ModelConfig, ae_vocab: int) -> dict:
    head = model.head
    if head.hidden_in_stream:
        raise ConvertError("model.head.hidden_in_stream=true: the reference release's energy head starts its stream "
                           "with the noise embedding alone, so it would run these weights as another model. Fix: "
                           "export to the native or Hugging Face layout (the reference layout holds heads trained "
                           "with hidden_in_stream=false)")
    return {"architectures": ["EnergyTransformer"], "patch_size": model.patch_size,
            "latent_size": model.ae.latent_size, "num_mlp_layers": head.num_blocks, "num_samples": head.num_samples,
            "beta": head.beta, "noise_size": head.noise_size, "num_target_samples": head.num_target_samples,
            **backbone_fields(model.backbone, model.vocab_size), "torch_dtype": "float32",
            "ae_config": autoencoder_fields(model.ae, ae_vocab, model.patch_size)}


def calm_model_config(config: dict, ae: AutoencoderArch, directory: pathlib.Path) -> ModelConfig:
    get = functools.partial(config_field, config, directory)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        get(key)
    head = EnergyHeadArch(num_blocks=get("num_mlp_layers"), noise_size=get("noise_size"),
                          num_samples=config.get("num_samples", EnergyHeadArch.num_samples),
                          num_target_samples=config.get("num_target_samples", EnergyHeadArch.num_target_samples),
                          beta=float(config.get("beta", 1.0)))
    if get("latent_size") != ae.latent_size:
        raise ConvertError(f"{directory}/config.json: latent_size {config['latent_size']} differs from its "
                           f"autoencoder's {ae.latent_size}. Fix: {FIX}")
    return ModelConfig(kind="calm", vocab_size=get("vocab_size"), patch_size=get("patch_size"),
                       backbone=arch_from_fields(checked_heads(config, directory)), head=head,
                       ae=dataclasses.replace(ae))


def calm_reference_shapes(model: ModelConfig, ae_vocab: int) -> dict[str, tuple[int, ...]]:
    from calm_train.models.energy import EnergyHead
    H, K = model.backbone.hidden_size, model.patch_size
    with torch.device("meta"):
        head = EnergyHead(H, model.ae.latent_size, model.head)
    return {**llama_shapes(model.backbone, model.vocab_size, BACKBONE_PREFIX),
            "embed_proj.0.weight": (2 * H, K * H), "embed_proj.0.bias": (2 * H,), "embed_proj.2.weight": (H, 2 * H),
            "embed_proj.2.bias": (H,), "embed_proj.3.weight": (H,), "embed_proj.3.bias": (H,),
            **{HEAD_PREFIX + k: tuple(v.shape) for k, v in head.state_dict().items()},
            **{AE_PREFIX + k: s for k, s in autoencoder_shapes(model.ae, ae_vocab, K).items()}}


def calm_to_reference(native: dict[str, torch.Tensor], ae: dict[str, torch.Tensor], model: ModelConfig) -> dict:
    out = {BACKBONE_PREFIX + "embed_tokens.weight": native["embed_tokens.weight"],
           **backbone_to_llama(native, model.backbone, BACKBONE_PREFIX)}
    out.update({k: v for k, v in native.items() if k.startswith("embed_proj.")})
    head = _strip(native, "generative_head.")
    out.update({HEAD_PREFIX + k: v for k, v in head.items()})
    out.update({HEAD_ALIAS + k: v.clone() for k, v in head.items()})
    out.update({AE_PREFIX + k: v for k, v in autoencoder_to_reference(ae).items()})
    return out


def reference_to_calm(ref: dict[str, torch.Tensor], model: ModelConfig) -> tuple[dict, dict]:
    """(CALM state dict, autoencoder state dict) in native names."""
    native = {"embed_tokens.weight": ref[BACKBONE_PREFIX + "embed_tokens.weight"],
              **llama_to_backbone(ref, model.backbone, BACKBONE_PREFIX)}
    native.update({k: v for k, v in ref.items() if k.startswith("embed_proj.")})
    native.update({"generative_head." + k: v for k, v in _strip(ref, HEAD_PREFIX).items()})
    return native, _strip(ref, AE_PREFIX)


def calm_aliases(keys) -> dict[str, str]:
    """alias -> target of a CALM file: `generative_head.*` -> `mlp_generator.*`, the autoencoder's tied output layer."""
    return {**{k: HEAD_PREFIX + k[len(HEAD_ALIAS):] for k in keys if k.startswith(HEAD_ALIAS)},
            **{AE_PREFIX + alias: AE_PREFIX + target for alias, target in AE_ALIASES.items()}}


def read_reference_calm(directory: pathlib.Path) -> tuple[ModelConfig, dict, dict, dict]:
    """(model config, CALM state dict, autoencoder state dict, config.json) of a CALM release directory."""
    config = read_config(directory)
    ae_arch, ae_vocab, ae_k, weights_path = read_reference_autoencoder_config(directory)
    model = calm_model_config(config, ae_arch, directory)
    if ae_k != model.patch_size:
        raise ConvertError(f"{directory}/config.json: patch_size {model.patch_size} differs from its autoencoder's "
                           f"{ae_k}. Fix: {FIX}")
    weights = drop_ignored(read_weights(weights_path))
    resolve_aliases(weights, calm_aliases(list(weights)))
    check_shapes(weights, calm_reference_shapes(model, ae_vocab), FIX)
    native, ae = reference_to_calm(weights, model)
    return model, native, ae, config


def read_reference_autoencoder(directory: pathlib.Path) -> tuple[ModelConfig, dict, dict]:
    """(model config, autoencoder state dict, config.json) of an autoencoder release directory."""
    config = read_config(directory)
    arch, vocab, K, weights_path = read_reference_autoencoder_config(directory)
    model = ModelConfig(kind="autoencoder", vocab_size=vocab, patch_size=K, ae=arch)
    return model, load_reference_autoencoder_weights(weights_path), config
