"""The CALM reference release's files, written here from its modeling code's structure (not from its code):
fixtures, an independent forward with its semantics, and a strict loader modelled on its `from_pretrained`.

What the release's training scripts save (`Trainer.save_model` -> `save_pretrained(safe_serialization=False)`):
  * config.json: the config class's fields (AutoencoderConfig / CALMConfig) with `architectures`, `dtype`,
    `transformers_version`, and no `model_type` (CALMConfig's default "energy" applies on load);
  * pytorch_model.bin = torch.save(model.state_dict()): a module registered under two names is saved
    under both, as one storage: the autoencoder's `decoder.lm_head_weight` (= `encoder.embed_tokens.weight`)
    and the CALM's `generative_head.*` (= `mlp_generator.*`).
`EnergyTransformer.__init__` loads its autoencoder from `config.ae_path` (a path `from_pretrained` resolves
against the working directory), then `from_pretrained` loads every key of the CALM file over it.

The independent forward below follows that modeling code (encoder/decoder stages, MLPGenerator blocks,
embed_proj, the energy score) with torch.nn.functional and `transformers.LlamaModel` for the backbone;
it shares no code with calm_train.models.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil

import torch
import torch.nn.functional as F

VARIANTS = ("bin", "safetensors_cloned", "safetensors_without_aliases", "sharded")


@dataclasses.dataclass(frozen=True)
class Sizes:
    hidden: int = 32
    intermediate: int = 48
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_blocks: int = 2
    noise: int = 8
    latent: int = 8
    patch: int = 4
    ae_hidden: int = 32
    ae_intermediate: int = 48
    ae_layers: int = 2
    rope_theta: float = 500.0
    norm_eps: float = 1e-5
    ae_norm_eps: float = 1e-6


# ---------------------------------------------------------------------------------------------
# state dicts as the reference modules hold them (random weights, aliases sharing storage)


def _draw(g):
    r = lambda *shape: 0.1 * torch.randn(*shape, generator=g)            # noqa: E731
    one = lambda n: 1 + 0.1 * torch.randn(n, generator=g)                 # noqa: E731
    return r, one


def autoencoder_state(s: Sizes, vocab: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    r, one = _draw(g)
    H, I, D, K = s.ae_hidden, s.ae_intermediate, s.latent, s.patch
    st = {"encoder.embed_tokens.weight": r(vocab, H), "encoder.squeeze_layer.weight": r(H, K * H),
          "encoder.squeeze_layer.bias": r(H), "encoder.norm.weight": one(H),
          "encoder.hidden_to_latent.weight": r(2 * D, H), "encoder.hidden_to_latent.bias": r(2 * D),
          "decoder.latent_to_hidden.weight": r(H, D), "decoder.latent_to_hidden.bias": r(H),
          "decoder.expand_layer.weight": r(K * H, H), "decoder.expand_layer.bias": r(K * H),
          "decoder.norm.weight": one(H)}
    for part in ("encoder", "decoder"):
        for i in range(s.ae_layers):
            p = f"{part}.{part}_layers.{i}."
            st.update({p + "mlp.gate_proj.weight": r(I, H), p + "mlp.up_proj.weight": r(I, H),
                       p + "mlp.down_proj.weight": r(H, I), p + "layernorm.weight": one(H)})
    st["decoder.lm_head_weight"] = st["encoder.embed_tokens.weight"]      # Autoencoder.__init__ ties them
    return st


def calm_state(s: Sizes, vocab: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    r, one = _draw(g)
    H, I, hd = s.hidden, s.intermediate, s.hidden // s.heads
    st = {"transformer.embed_tokens.weight": r(vocab, H), "transformer.norm.weight": one(H),
          "embed_proj.0.weight": r(2 * H, s.patch * H), "embed_proj.0.bias": r(2 * H),
          "embed_proj.2.weight": r(H, 2 * H), "embed_proj.2.bias": r(H), "embed_proj.3.weight": one(H),
          "embed_proj.3.bias": r(H)}
    for i in range(s.layers):
        p = f"transformer.layers.{i}."
        st.update({p + "self_attn.q_proj.weight": r(H, H), p + "self_attn.k_proj.weight": r(s.kv_heads * hd, H),
                   p + "self_attn.v_proj.weight": r(s.kv_heads * hd, H), p + "self_attn.o_proj.weight": r(H, H),
                   p + "mlp.gate_proj.weight": r(I, H), p + "mlp.up_proj.weight": r(I, H),
                   p + "mlp.down_proj.weight": r(H, I), p + "input_layernorm.weight": one(H),
                   p + "post_attention_layernorm.weight": one(H)})
    head = {"noise_embd.weight": r(H, s.noise), "noise_embd.bias": r(H), "hidden_embd.weight": r(H, H),
            "hidden_embd.bias": r(H), "norm_hidden.weight": one(H), "norm_hidden.bias": r(H),
            "norm_noise.weight": one(H), "norm_noise.bias": r(H), "final_layer.in_ln.weight": one(H),
            "final_layer.in_ln.bias": r(H), "final_layer.linears.0.weight": r(H, H), "final_layer.linears.0.bias": r(H),
            "final_layer.linears.2.weight": r(s.latent, H), "final_layer.linears.2.bias": r(s.latent)}
    for i in range(s.head_blocks):
        p = f"mlp_blocks.{i}."
        head.update({p + "in_ln.weight": one(H), p + "in_ln.bias": r(H), p + "linears.0.weight": r(H, 2 * H),
                     p + "linears.0.bias": r(H), p + "linears.2.weight": r(H, H), p + "linears.2.bias": r(H),
                     p + "linears.4.weight": r(2 * H, H), p + "linears.4.bias": r(2 * H),
                     p + "down_proj.weight": r(H, H), p + "down_proj.bias": r(H)})
    st.update({"mlp_generator." + k: v for k, v in head.items()})
    st.update({"generative_head." + k: v for k, v in head.items()})    # self.generative_head = self.mlp_generator
    st.update({"ae_model." + k: v for k, v in autoencoder_state(s, vocab, g).items()})
    return st


def is_alias(key: str) -> bool:
    return key.startswith("generative_head.") or key.endswith("decoder.lm_head_weight")


# ---------------------------------------------------------------------------------------------
# config.json as the config classes save it


def autoencoder_config(s: Sizes, vocab: int) -> dict:
    return {"ae_dropout": 0.15, "architectures": ["Autoencoder"], "bos_token_id": 1, "dtype": "float32",
            "eos_token_id": 2, "hidden_act": "silu", "hidden_size": s.ae_hidden, "initializer_range": 0.02,
            "intermediate_size": s.ae_intermediate, "kl_clamp": 0.5, "kl_weight": 0.001, "latent_size": s.latent,
            "max_position_embeddings": 2048, "mlp_bias": False, "num_decoder_layers": s.ae_layers,
            "num_encoder_layers": s.ae_layers, "patch_size": s.patch, "pretraining_tp": 1,
            "rms_norm_eps": s.ae_norm_eps, "tie_word_embeddings": False, "transformers_version": "4.57.6",
            "vocab_size": vocab}


def calm_config(s: Sizes, vocab: int, ae_path: str) -> dict:
    return {"ae_path": ae_path, "architectures": ["EnergyTransformer"], "attention_bias": False,
            "attention_dropout": 0.0, "beta": 1.0, "bos_token_id": 1, "dtype": "float32", "eos_token_id": 2,
            "hidden_act": "silu", "hidden_size": s.hidden, "initializer_range": 0.02, "intermediate_size": s.intermediate,
            "latent_size": s.latent, "max_position_embeddings": 2048, "mlp_bias": False, "noise_size": s.noise,
            "num_attention_heads": s.heads, "num_hidden_layers": s.layers, "num_key_value_heads": s.kv_heads,
            "num_mlp_layers": s.head_blocks, "num_samples": 8, "patch_size": s.patch, "pretraining_tp": 1,
            "rms_norm_eps": s.norm_eps, "rope_scaling": None, "rope_theta": s.rope_theta, "tie_word_embeddings": False,
            "transformers_version": "4.57.6", "use_cache": True, "vocab_size": vocab}


def write_release(directory: pathlib.Path, config: dict, state: dict[str, torch.Tensor], tokenizer_file,
                  variant: str = "bin") -> pathlib.Path:
    """A release directory: config.json, the tokenizer, and the weights as `variant` stores them:
    bin                          torch.save of the state dict (aliases share one storage), as the scripts write
    safetensors_cloned           every key, aliases cloned
    safetensors_without_aliases  the aliases dropped (what a converter that removes duplicates writes)
    sharded                      two safetensors shards + index, aliases cloned"""
    from safetensors.torch import save_file
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(tokenizer_file, directory / "tokenizer.json")
    if variant == "bin":
        torch.save(state, directory / "pytorch_model.bin")
        return directory
    cloned = {k: v.clone() for k, v in state.items() if variant != "safetensors_without_aliases" or not is_alias(k)}
    if variant == "sharded":
        keys = sorted(cloned)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, part in shards.items():
            save_file({k: cloned[k] for k in part}, str(directory / name), metadata={"format": "pt"})
        (directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}))
    else:
        save_file(cloned, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------
# the reference semantics, functional


def _rms_norm(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


def _ae_layers(w, part, layers, x, eps):
    for i in layers:
        p = f"{part}.{part}_layers.{i}."
        h = _rms_norm(x, w[p + "layernorm.weight"], eps)
        x = x + F.linear(F.silu(F.linear(h, w[p + "mlp.gate_proj.weight"])) * F.linear(h, w[p + "mlp.up_proj.weight"]),
                         w[p + "mlp.down_proj.weight"])
    return x


def ae_encode(w: dict, s: Sizes, tokens_BTK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, log_std) [B, T, D]: layers 0..n/2-1 per token, squeeze the K tokens, the other layers, norm, project."""
    half = s.ae_layers // 2
    x = _ae_layers(w, "encoder", range(half), F.embedding(tokens_BTK, w["encoder.embed_tokens.weight"]), s.ae_norm_eps)
    x = F.linear(x.flatten(-2), w["encoder.squeeze_layer.weight"], w["encoder.squeeze_layer.bias"])
    x = _ae_layers(w, "encoder", range(half, s.ae_layers), x, s.ae_norm_eps)
    latent = F.linear(_rms_norm(x, w["encoder.norm.weight"], s.ae_norm_eps), w["encoder.hidden_to_latent.weight"],
                      w["encoder.hidden_to_latent.bias"])
    return latent.chunk(2, dim=-1)


def ae_decode_logits(w: dict, s: Sizes, z_BTD: torch.Tensor) -> torch.Tensor:
    """[B, T, K, V] with the decoder's own `lm_head_weight` (the reference's F.linear(h, self.lm_head_weight))."""
    half = s.ae_layers // 2
    x = F.linear(z_BTD, w["decoder.latent_to_hidden.weight"], w["decoder.latent_to_hidden.bias"])
    x = _ae_layers(w, "decoder", range(half), x, s.ae_norm_eps)
    x = F.linear(x, w["decoder.expand_layer.weight"], w["decoder.expand_layer.bias"]).unflatten(-1, (s.patch, -1))
    x = _ae_layers(w, "decoder", range(half, s.ae_layers), x, s.ae_norm_eps)
    return F.linear(_rms_norm(x, w["decoder.norm.weight"], s.ae_norm_eps), w["decoder.lm_head_weight"])


def head_sample(w: dict, hidden_BTH: torch.Tensor, noise_BTNZ: torch.Tensor) -> torch.Tensor:
    """MLPGenerator.sample with given noise: [B, T, N, D]."""
    H = hidden_BTH.shape[-1]
    ln = lambda x, p: F.layer_norm(x, (H,), w[p + ".weight"], w[p + ".bias"], eps=1e-6)      # noqa: E731
    lin = lambda x, p: F.linear(x, w[p + ".weight"], w[p + ".bias"])                          # noqa: E731
    y = ln(lin(hidden_BTH, "hidden_embd"), "norm_hidden").unsqueeze(-2).expand(*noise_BTNZ.shape[:-1], H)
    x = ln(lin(noise_BTNZ, "noise_embd"), "norm_noise")
    i = 0
    while f"mlp_blocks.{i}.in_ln.weight" in w:
        p = f"mlp_blocks.{i}."
        h = lin(F.silu(lin(F.silu(lin(torch.cat([ln(x, p + "in_ln"), y], -1), p + "linears.0")), p + "linears.2")),
                p + "linears.4")
        gate, up = h.chunk(2, dim=-1)
        x = x + lin(F.silu(gate) * up, p + "down_proj")
        i += 1
    return lin(F.silu(lin(ln(x, "final_layer.in_ln"), "final_layer.linears.0")), "final_layer.linears.2")


def calm_hidden(w: dict, s: Sizes, vocab: int, tokens_BL: torch.Tensor) -> torch.Tensor:
    """Backbone outputs [B, T, H]: embed_proj of each chunk's K embeddings, then transformers' LlamaModel."""
    from transformers import LlamaConfig, LlamaModel
    llama = LlamaModel(LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate,
                                   num_hidden_layers=s.layers, num_attention_heads=s.heads,
                                   num_key_value_heads=s.kv_heads, rope_theta=s.rope_theta, rms_norm_eps=s.norm_eps,
                                   vocab_size=vocab, max_position_embeddings=2048)).eval()
    llama.load_state_dict(strip(w, "transformer."), strict=True)
    B, L = tokens_BL.shape
    chunks = F.embedding(tokens_BL, w["transformer.embed_tokens.weight"]).reshape(B, L // s.patch, -1)
    x = F.linear(F.silu(F.linear(chunks, w["embed_proj.0.weight"], w["embed_proj.0.bias"])), w["embed_proj.2.weight"],
                 w["embed_proj.2.bias"])
    x = F.layer_norm(x, (s.hidden,), w["embed_proj.3.weight"], w["embed_proj.3.bias"], eps=1e-6)
    with torch.no_grad():
        return llama(inputs_embeds=x).last_hidden_state


def energy_loss(samples_BTND: torch.Tensor, targets_BTMD: torch.Tensor) -> torch.Tensor:
    """The reference's -energy_score (beta = 1), averaged: 2 mean_{n,m} |x_n - y_m| - sum_{n,k} |x_n - x_k| / (N(N-1))."""
    N = samples_BTND.shape[-2]
    spread = (samples_BTND[..., :, None, :] - samples_BTND[..., None, :, :]).norm(dim=-1).sum((-2, -1)) / (N * (N - 1))
    fit = (samples_BTND[..., :, None, :] - targets_BTMD[..., None, :, :]).norm(dim=-1).mean((-2, -1))
    return (2 * fit - spread).mean()


def calm_loss(w: dict, s: Sizes, vocab: int, tokens_BL: torch.Tensor, rng, num_samples: int,
              num_target_samples: int) -> torch.Tensor:
    """The CALM training loss with calm-train's draws from `rng` (a SampleRNG): M posterior noise vectors per
    predicted chunk, then N head noise vectors U[-0.5, 0.5]; chunks 1..T-1 predicted from outputs 0..T-2."""
    B, L = tokens_BL.shape
    T = L // s.patch
    eps = rng.normal(T - 1, num_target_samples, s.latent)
    noise = rng.uniform(T - 1, num_samples, s.noise) - 0.5
    mean, log_std = ae_encode(strip(w, "ae_model."), s, tokens_BL.view(B, T, s.patch)[:, 1:])
    targets = mean.unsqueeze(2) + torch.exp(log_std).unsqueeze(2) * eps
    hidden = calm_hidden(w, s, vocab, tokens_BL[:, :-s.patch])             # the reference feeds chunks 0..T-2
    samples = head_sample(strip(w, "mlp_generator."), hidden, noise)
    return energy_loss(samples, targets)


# ---------------------------------------------------------------------------------------------
# a strict loader with the reference's semantics


class ReferenceLoadError(Exception):
    pass


def expected_autoencoder_keys(c: dict) -> set[str]:
    keys = {"encoder.embed_tokens.weight", "encoder.squeeze_layer.weight", "encoder.squeeze_layer.bias",
            "encoder.norm.weight", "encoder.hidden_to_latent.weight", "encoder.hidden_to_latent.bias",
            "decoder.latent_to_hidden.weight", "decoder.latent_to_hidden.bias", "decoder.expand_layer.weight",
            "decoder.expand_layer.bias", "decoder.norm.weight", "decoder.lm_head_weight"}
    for part, n in (("encoder", c["num_encoder_layers"]), ("decoder", c["num_decoder_layers"])):
        for i in range(n):
            keys |= {f"{part}.{part}_layers.{i}.{k}" for k in ("mlp.gate_proj.weight", "mlp.up_proj.weight",
                                                               "mlp.down_proj.weight", "layernorm.weight")}
    return keys


def expected_calm_keys(c: dict, ae: dict) -> set[str]:
    keys = {"transformer.embed_tokens.weight", "transformer.norm.weight"}
    keys |= {f"embed_proj.{i}.{k}" for i in (0, 2, 3) for k in ("weight", "bias")}
    for i in range(c["num_hidden_layers"]):
        keys |= {f"transformer.layers.{i}.{k}" for k in (
            "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
            "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
            "post_attention_layernorm.weight")}
    head = {f"{m}.{k}" for m in ("noise_embd", "hidden_embd", "norm_hidden", "norm_noise", "final_layer.in_ln",
                                 "final_layer.linears.0", "final_layer.linears.2") for k in ("weight", "bias")}
    for i in range(c["num_mlp_layers"]):
        head |= {f"mlp_blocks.{i}.{m}.{k}" for m in ("in_ln", "linears.0", "linears.2", "linears.4", "down_proj")
                 for k in ("weight", "bias")}
    keys |= {p + k for p in ("mlp_generator.", "generative_head.") for k in head}
    return keys | {"ae_model." + k for k in expected_autoencoder_keys(ae)}


def load_checked(directory: pathlib.Path, expected: set[str]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    st, binary = directory / "model.safetensors", directory / "pytorch_model.bin"
    if st.is_file():
        weights = load_file(str(st))
    elif binary.is_file():
        weights = torch.load(binary, map_location="cpu", weights_only=True)
    else:
        raise ReferenceLoadError(f"{directory}: no model.safetensors or pytorch_model.bin")
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ReferenceLoadError(f"{directory}: missing keys {missing[:4]}, unexpected keys {unexpected[:4]}")
    return weights


def load_like_reference(directory) -> tuple[dict, dict, dict]:
    """EnergyTransformer.from_pretrained(directory), strictly: config.json's `ae_path` (None or absent fails,
    a relative path counts from the working directory) must hold the autoencoder's config.json and weights;
    each file must hold every key of the model's state dict and nothing else (the alias included, which
    from_pretrained would otherwise leave uninitialised).  Returns (CALM config, CALM weights, AE weights)."""
    directory = pathlib.Path(directory)
    config = json.loads((directory / "config.json").read_text())
    if not config.get("ae_path"):
        raise ReferenceLoadError(f"{directory}/config.json has no ae_path (AutoencoderConfig.from_pretrained(None))")
    ae_dir = pathlib.Path(os.path.abspath(config["ae_path"]))
    if not (ae_dir / "config.json").is_file():
        raise ReferenceLoadError(f"ae_path {config['ae_path']} holds no config.json (working directory {os.getcwd()})")
    ae_config = json.loads((ae_dir / "config.json").read_text())
    ae_weights = load_checked(ae_dir, expected_autoencoder_keys(ae_config))
    weights = load_checked(directory, expected_calm_keys(config, ae_config))
    return config, weights, ae_weights
