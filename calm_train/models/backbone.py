"""Llama-style Transformer backbone from megatron-core parts (shared by CALM and the AR baseline).

    h = x
    for each layer:  h = h + Attn(RMSNorm(h), RoPE)          (causal, GQA when num_kv_heads < num_heads)
                     h = h + W2 (silu(W1 h') * W3 h')          (SwiGLU, h' = RMSNorm(h), no biases)
    y = RMSNorm(h)                                             (on the last pipeline stage)

megatron's TransformerBlock from the local layer spec provides tensor parallelism (column/row
parallel linears) and the pipeline split (this stage builds only its own layers, from
megatron's parallel_state).  Ours are the core attention (`attention.py`, chosen in the spec),
RoPE (`rope.py`) and RMSNorm (tagged for sequence parallelism).  Layout is megatron's:
hidden states [S, B, H].  Weights are initialised on CPU from torch's RNG and then split, so
they are identical for every TP size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import (TransformerBlock, TransformerBlockSubmodules,
                                                         get_num_layers_to_build)

from calm_train.config import BackboneArch
from calm_train.models.attention import KVCache, resolve_attention, use_kv_cache
from calm_train.models.rope import RotaryEmbedding


class RMSNorm(torch.nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w.  With sequence parallelism each TP rank sees a slice of
    the sequence, so w's gradient is partial: `w.sequence_parallel` tells the trainer to all-reduce it."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


RECOMPUTE = {"off": {},      # megatron's activation recomputation for perf.recompute
             "selective": dict(recompute_granularity="selective", recompute_modules=["mlp"]),
             "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)}


def transformer_config(arch: BackboneArch, *, tp: int | None = None, pp: int | None = None,
                       sequence_parallel: bool = False, dtype: torch.dtype = torch.float32,
                       init_std: float = 0.02, recompute: str = "off") -> TransformerConfig:
    """megatron TransformerConfig for the backbone: SwiGLU, RMSNorm, no biases, no dropout, no fusions
    (the fused kernels need apex/Transformer Engine, which the pinned stack does not install).
    tp/pp None: the sizes of megatron's initialised parallel_state.  recompute: keep only each layer's
    input ("full") or recompute its MLP ("selective") in backward; the gradients are the same."""
    tp = parallel_state.get_tensor_model_parallel_world_size() if tp is None else tp
    pp = parallel_state.get_pipeline_model_parallel_world_size() if pp is None else pp
    return TransformerConfig(**RECOMPUTE[recompute],
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_heads, num_query_groups=arch.kv_heads,
        kv_channels=arch.hidden_size // arch.num_heads,
        normalization="RMSNorm", layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=init_std,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sequence_parallel,
        use_cpu_initialization=True, params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False)


def token_embedding(vocab_size: int, config: TransformerConfig) -> tensor_parallel.VocabParallelEmbedding:
    """Token embedding split over TP ranks by vocabulary rows (output all-reduced: every rank sees all of it)."""
    tp = config.tensor_model_parallel_size
    if vocab_size % tp:
        raise ValueError(f"model.vocab_size={vocab_size} is not divisible by parallel.tp={tp}: the vocabulary "
                         "is split over tensor-parallel ranks; choose a tp dividing it (or a tokenizer "
                         "vocabulary that is a multiple of tp)")
    return tensor_parallel.VocabParallelEmbedding(vocab_size, config.hidden_size,
                                                  init_method=config.embedding_init_method, config=config)


def layer_spec(core_attention: type):
    """megatron's local GPT layer spec with our RMSNorm and core attention."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    spec.submodules.self_attention.submodules.core_attention = core_attention
    return spec


class Backbone(MegatronModule):
    """This pipeline stage's layers.  forward([S, B, H]) -> [S, B, H] (final RMSNorm when post_process).

    With sequence parallelism the first stage splits the sequence over the TP ranks and the last
    stage gathers it back, so callers always see the full sequence; stages exchange [S/tp, B, H].
    """

    def __init__(self, arch: BackboneArch, *, attention: str = "auto", pre_process: bool = True,
                 post_process: bool = True, sequence_parallel: bool = False,
                 params_dtype: torch.dtype = torch.float32, init_std: float = 0.02, recompute: str = "off"):
        config = transformer_config(arch, sequence_parallel=sequence_parallel, dtype=params_dtype, init_std=init_std,
                                    recompute=recompute)
        super().__init__(config=config)
        self.pre_process, self.post_process = pre_process, post_process
        num_layers = get_num_layers_to_build(config, pp_rank=parallel_state.get_pipeline_model_parallel_rank())
        core_attention, self.attention_backend = resolve_attention(attention, params_dtype, config.kv_channels)
        spec = layer_spec(core_attention)
        self.decoder = TransformerBlock(
            config=config, spec=TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=RMSNorm),
            pre_process=pre_process, post_process=post_process)
        self.rotary = RotaryEmbedding(config.kv_channels, arch.rope_theta)

    @property
    def sequence_multiple(self) -> int:
        """Input lengths must be multiples of this: the TP size under sequence parallelism (the sequence is
        split over the TP ranks), else 1."""
        return self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline stages after the first take their input from here instead of forward's argument."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def forward(self, hidden_SBH: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        sp = self.config.sequence_parallel
        if self.pre_process:
            if sp:
                hidden_SBH = tensor_parallel.scatter_to_sequence_parallel_region(hidden_SBH)
            local_SBH = hidden_SBH
        else:
            local_SBH = self.decoder.input_tensor
        seq_len = local_SBH.shape[0] * (self.config.tensor_model_parallel_size if sp else 1)
        offset = kv_cache.length if kv_cache is not None else 0
        freqs_S11D = self.rotary(seq_len, offset, local_SBH.device)
        with use_kv_cache(kv_cache):
            out_SBH = self.decoder(hidden_SBH, attention_mask=None, rotary_pos_emb=freqs_S11D)
        if kv_cache is not None:
            kv_cache.length += seq_len
        if self.post_process and sp:
            # every TP rank continues with the whole sequence, so the backward only keeps its slice
            out_SBH = tensor_parallel.gather_from_sequence_parallel_region(out_SBH, tensor_parallel_output_grad=False)
        return out_SBH
