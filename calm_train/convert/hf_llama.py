"""The backbone and the AR baseline <-> Hugging Face `LlamaForCausalLM` names (an adapter, as torchtitan's).

Native (megatron-core, TP=1 full state dict)          Llama
  backbone.decoder.layers.{i}.input_layernorm          model.layers.{i}.input_layernorm
  backbone.decoder.layers.{i}.self_attention.linear_qkv  model.layers.{i}.self_attn.{q,k,v}_proj
  backbone.decoder.layers.{i}.self_attention.linear_proj model.layers.{i}.self_attn.o_proj
  backbone.decoder.layers.{i}.pre_mlp_layernorm        model.layers.{i}.post_attention_layernorm
  backbone.decoder.layers.{i}.mlp.linear_fc1           model.layers.{i}.mlp.{gate,up}_proj
  backbone.decoder.layers.{i}.mlp.linear_fc2           model.layers.{i}.mlp.down_proj
  backbone.decoder.final_layernorm                     model.norm
  embed_tokens / lm_head                               model.embed_tokens / lm_head

megatron's fused QKV weight is interleaved per query group g (GQA: num_heads/num_kv_heads
queries share one key/value head):  rows = [q_g,0 .. q_g,n-1, k_g, v_g] for g = 0 .. groups-1,
each block head_dim rows.  Llama keeps q, k, v apart, heads in order; query head j uses key
head j // n in both.  SwiGLU's fc1 is [gate; up].  Both use rotate-half RoPE, so no permutation
of the head dimension is needed.

The AR baseline's output layer is its own parameter.  A tied Llama (tie_word_embeddings) imports
with lm_head = a copy of the embedding; an AR model whose lm_head equals its embedding exports as
a tied Llama, without `lm_head.weight` in the file, as transformers saves one.
"""
from __future__ import annotations

import torch

from calm_train.config import BackboneArch

NATIVE_LAYER = "backbone.decoder.layers.{}."
NATIVE_NORM = "backbone.decoder.final_layernorm.weight"
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _layer_pairs(i: int, prefix: str) -> list[tuple[str, str]]:
    """(native, llama) names that map one to one within layer i."""
    n, h = NATIVE_LAYER.format(i), f"{prefix}layers.{i}."
    return [(n + "input_layernorm.weight", h + "input_layernorm.weight"),
            (n + "self_attention.linear_proj.weight", h + "self_attn.o_proj.weight"),
            (n + "pre_mlp_layernorm.weight", h + "post_attention_layernorm.weight"),
            (n + "mlp.linear_fc2.weight", h + "mlp.down_proj.weight")]


def split_qkv(qkv: torch.Tensor, arch: BackboneArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's [groups * (n + 2) * head_dim, H] -> q [heads * head_dim, H], k, v [groups * head_dim, H]."""
    groups, head_dim = arch.kv_heads, arch.hidden_size // arch.num_heads
    n = arch.num_heads // groups
    qkv_GNDH = qkv.view(groups, n + 2, head_dim, qkv.shape[-1])
    q = qkv_GNDH[:, :n].reshape(-1, qkv.shape[-1])
    return q, qkv_GNDH[:, n].reshape(-1, qkv.shape[-1]), qkv_GNDH[:, n + 1].reshape(-1, qkv.shape[-1])


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: BackboneArch) -> torch.Tensor:
    groups, head_dim = arch.kv_heads, arch.hidden_size // arch.num_heads
    n = arch.num_heads // groups
    H = q.shape[-1]
    return torch.cat([q.view(groups, n, head_dim, H), k.view(groups, 1, head_dim, H), v.view(groups, 1, head_dim, H)],
                     dim=1).reshape(-1, H)


def backbone_to_llama(native: dict[str, torch.Tensor], arch: BackboneArch, prefix: str) -> dict[str, torch.Tensor]:
    """The backbone's layers and final norm under Llama's names (`prefix` e.g. "model.")."""
    out = {}
    for i in range(arch.num_layers):
        n, h = NATIVE_LAYER.format(i), f"{prefix}layers.{i}."
        out.update({dst: native[src] for src, dst in _layer_pairs(i, prefix)})
        q, k, v = split_qkv(native[n + "self_attention.linear_qkv.weight"], arch)
        out.update({h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k,
                    h + "self_attn.v_proj.weight": v})
        gate, up = native[n + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out.update({h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up})
    out[prefix + "norm.weight"] = native[NATIVE_NORM]
    return out


def llama_to_backbone(hf: dict[str, torch.Tensor], arch: BackboneArch, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(arch.num_layers):
        n, h = NATIVE_LAYER.format(i), f"{prefix}layers.{i}."
        out.update({src: hf[dst] for src, dst in _layer_pairs(i, prefix)})
        q, k, v = (hf[f"{h}self_attn.{x}_proj.weight"] for x in "qkv")
        out[n + "self_attention.linear_qkv.weight"] = fuse_qkv(q, k, v, arch)
        out[n + "mlp.linear_fc1.weight"] = torch.cat([hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]])
    out[NATIVE_NORM] = hf[prefix + "norm.weight"]
    return out


def llama_shapes(arch: BackboneArch, vocab_size: int, prefix: str) -> dict[str, tuple[int, ...]]:
    """Expected Llama weight shapes of the embedding, the layers and the final norm."""
    H, I, head_dim = arch.hidden_size, arch.intermediate_size, arch.hidden_size // arch.num_heads
    q, kv = arch.num_heads * head_dim, arch.kv_heads * head_dim
    shapes = {prefix + "embed_tokens.weight": (vocab_size, H), prefix + "norm.weight": (H,)}
    for i in range(arch.num_layers):
        h = f"{prefix}layers.{i}."
        shapes.update({h + "input_layernorm.weight": (H,), h + "post_attention_layernorm.weight": (H,),
                       h + "self_attn.q_proj.weight": (q, H), h + "self_attn.k_proj.weight": (kv, H),
                       h + "self_attn.v_proj.weight": (kv, H), h + "self_attn.o_proj.weight": (H, q),
                       h + "mlp.gate_proj.weight": (I, H), h + "mlp.up_proj.weight": (I, H),
                       h + "mlp.down_proj.weight": (H, I)})
    return shapes


def backbone_fields(arch: BackboneArch, vocab_size: int) -> dict:
    """The Llama config.json fields of the backbone (shared by the AR export and the CALM release)."""
    return {"hidden_size": arch.hidden_size, "intermediate_size": arch.intermediate_size,
            "num_hidden_layers": arch.num_layers, "num_attention_heads": arch.num_heads,
            "num_key_value_heads": arch.kv_heads, "rope_theta": arch.rope_theta, "rms_norm_eps": arch.norm_eps,
            "vocab_size": vocab_size}


def arch_from_fields(config: dict) -> BackboneArch:
    kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    return BackboneArch(hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
                        num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
                        num_kv_heads=None if kv == config["num_attention_heads"] else kv,
                        rope_theta=float(config.get("rope_theta", 10000.0)),
                        norm_eps=float(config.get("rms_norm_eps", 1e-6)))


# ---------------------------------------------------------------------------------------------
# the AR baseline as LlamaForCausalLM


def is_tied(native: dict[str, torch.Tensor]) -> bool:
    """The output layer equals the embedding (e.g. an imported tied Llama, not trained since)."""
    return torch.equal(native["lm_head.weight"], native["embed_tokens.weight"])


def ar_to_hf(native: dict[str, torch.Tensor], arch: BackboneArch, tied: bool = False) -> dict[str, torch.Tensor]:
    """Llama's weights; tied: without `lm_head.weight` (transformers ties it to the embedding, as it saves them)."""
    out = {EMBED: native["embed_tokens.weight"], **backbone_to_llama(native, arch, "model.")}
    if not tied:
        out[LM_HEAD] = native["lm_head.weight"]
    return out


def hf_to_ar(hf: dict[str, torch.Tensor], arch: BackboneArch) -> dict[str, torch.Tensor]:
    return {"embed_tokens.weight": hf[EMBED], "lm_head.weight": hf[LM_HEAD], **llama_to_backbone(hf, arch, "model.")}


def ar_hf_shapes(arch: BackboneArch, vocab_size: int) -> dict[str, tuple[int, ...]]:
    return {**llama_shapes(arch, vocab_size, "model."), "lm_head.weight": (vocab_size, arch.hidden_size)}


def llama_config(arch: BackboneArch, vocab_size: int, max_positions: int, tied: bool = False) -> dict:
    """config.json of `LlamaForCausalLM` (no biases, SwiGLU, fp32)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **backbone_fields(arch, vocab_size),
            "head_dim": arch.hidden_size // arch.num_heads, "hidden_act": "silu",
            "max_position_embeddings": max_positions, "tie_word_embeddings": tied, "attention_bias": False,
            "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
            "torch_dtype": "float32"}
