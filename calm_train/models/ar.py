"""The autoregressive baseline: the same backbone predicting one token at a time.

    h = Backbone(E(x_0 .. x_{L-1}))          logits_t = W h_t  (untied output layer)
    loss = mean_{t < L-1} CE(logits_t, x_{t+1})

As in CALM all L positions go through the backbone and the last output is not in the loss.
`embed_tokens` is split over TP ranks by vocabulary rows and `lm_head` by output columns; the
loss is megatron's vocab-parallel cross entropy, so full-vocabulary logits exist only in
`logits()` (evaluation and generation).  Pipeline stages: the first stage holds `embed_tokens`
(`embed`), the last the output layer (`loss_from_hidden`).
"""
from __future__ import annotations

import dataclasses

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule

from calm_train.config import ModelConfig
from calm_train.models.attention import KVCache
from calm_train.models.backbone import Backbone, token_embedding, transformer_config


class ARModel(MegatronModule):
    def __init__(self, model_cfg: ModelConfig, *, pre_process: bool = True, post_process: bool = True,
                 sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                 recompute: str = "off"):
        if model_cfg.vocab_size is None:
            raise ValueError("ARModel: model.vocab_size is unset; take it from the prepared data's dataset.json "
                             "before building the model")
        arch = model_cfg.backbone
        config = transformer_config(arch, sequence_parallel=sequence_parallel, dtype=params_dtype,
                                    init_std=model_cfg.init_std)
        super().__init__(config=config)
        self.model_cfg = model_cfg
        self.pre_process, self.post_process = pre_process, post_process
        if pre_process:
            self.embed_tokens = token_embedding(model_cfg.vocab_size, config)
        self.backbone = Backbone(arch, attention=model_cfg.attention, pre_process=pre_process,
                                 post_process=post_process, sequence_parallel=sequence_parallel,
                                 params_dtype=params_dtype, init_std=model_cfg.init_std, recompute=recompute)
        if post_process:
            # the backbone hands every TP rank the whole sequence, so the output layer is not sequence-parallel
            head_config = dataclasses.replace(config, sequence_parallel=False)
            self.lm_head = tensor_parallel.ColumnParallelLinear(
                arch.hidden_size, model_cfg.vocab_size, config=head_config, init_method=config.init_method,
                bias=False, gather_output=False)

    def set_input_tensor(self, input_tensor) -> None:
        self.backbone.set_input_tensor(input_tensor)

    def embed(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """First stage: backbone input [L, B, H]."""
        return self.embed_tokens(tokens_BL).transpose(0, 1).contiguous()

    def loss_from_hidden(self, hidden_SBH: torch.Tensor, tokens_BL: torch.Tensor) -> torch.Tensor:
        """Last stage: mean cross entropy of x_{t+1} given outputs t = 0 .. L-2."""
        logits_SBV, _ = self.lm_head(hidden_SBH[:-1])                 # this rank's vocabulary slice
        targets_SB = tokens_BL.transpose(0, 1)[1:].contiguous()
        return tensor_parallel.vocab_parallel_cross_entropy(logits_SBV.float(), targets_SB).mean()

    def forward(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """All stages in one process: scalar training loss."""
        return self.loss_from_hidden(self.backbone(self.embed(tokens_BL)), tokens_BL)

    def logits(self, tokens_BL: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Full-vocabulary logits [B, L, V] (float32); logits[:, t] predicts token t+1."""
        hidden_SBH = self.backbone(self.embed(tokens_BL), kv_cache)
        logits_SBV, _ = self.lm_head(hidden_SBH)
        full_SBV = tensor_parallel.gather_from_tensor_model_parallel_region(logits_SBV)
        return full_SBV.transpose(0, 1).float()
