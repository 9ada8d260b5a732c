"""What differs between the three trainers: the model a stage builds and its loss.

    autoencoder: Autoencoder(tokens, rng).loss                         (data-parallel only)
    calm       : CALM; loss = energy score against the frozen autoencoder's posterior samples
    ar         : ARModel; loss = next-token cross entropy

Under pipeline parallelism a stage runs `stage_forward` (embed on the first stage, then its
backbone layers) and the last stage `loss_from_hidden`.  The frozen autoencoder is held here,
in eval mode without gradients; the engine never sees it as part of the trained module.
A new model starts from weights drawn per parameter from (train.seed, its global name), the same in
every layout (parallel/init.py); `init_state` (a full fp32 state dict of a tp = pp = 1 model, e.g. an
export) replaces them, sharded to this rank's TP slice and pipeline stage.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from calm_train.config import Config, ModelConfig
from calm_train.models.autoencoder import Autoencoder
from calm_train.models.rng import SampleRNG
from calm_train.parallel.export import load_full_state_dict
from calm_train.parallel.init import initialise


@dataclass
class Task:
    kind: str
    model_cfg: ModelConfig
    autoencoder: Autoencoder | None = None
    init_state: dict[str, torch.Tensor] | None = None

    def build_model(self, cfg: Config, pre_process: bool = True, post_process: bool = True,
                    params_dtype: torch.dtype = torch.float32) -> nn.Module:
        m = self.model_cfg
        if m.vocab_size is None:
            raise ValueError("model.vocab_size is unset. Fix: take it from the prepared data's dataset.json "
                             "(the training loop does) or set model.vocab_size")
        if self.kind == "autoencoder":
            model = Autoencoder(m.ae, m.vocab_size, m.patch_size, m.init_std).to(params_dtype)
        else:
            from calm_train.models.ar import ARModel
            from calm_train.models.calm import CALM
            model = (CALM if self.kind == "calm" else ARModel)(
                m, pre_process=pre_process, post_process=post_process,
                sequence_parallel=cfg.parallel.sequence_parallel, params_dtype=params_dtype,
                recompute=cfg.perf.recompute)
        if self.init_state is not None:
            load_full_state_dict(model, self.init_state)
        else:
            initialise(model, m, cfg.train.seed)
        return model

    def loss(self, model: nn.Module, tokens_BL: torch.Tensor, rng: SampleRNG) -> torch.Tensor:
        """Scalar mean loss of the whole model (no pipeline)."""
        if self.kind == "autoencoder":
            return model(tokens_BL, rng).loss
        return self.loss_from_hidden(model, model.backbone(model.embed(tokens_BL)), tokens_BL, rng)

    def stage_forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] (first stage) or the previous stage's hidden -> this stage's hidden [S, B, H]."""
        if model.pre_process:
            return model.backbone(model.embed(x))
        model.set_input_tensor(x)
        return model.backbone()

    def loss_from_hidden(self, model: nn.Module, hidden_SBH: torch.Tensor, tokens_BL: torch.Tensor,
                         rng: SampleRNG) -> torch.Tensor:
        if self.kind == "calm":
            return model.loss_from_hidden(hidden_SBH, tokens_BL, rng, self.autoencoder)
        return model.loss_from_hidden(hidden_SBH, tokens_BL)

    def positions(self, seq_len: int) -> int:
        """Backbone positions of one sequence: one per K-token chunk for CALM, one per token for AR."""
        return seq_len // self.model_cfg.patch_size if self.kind == "calm" else seq_len

    @property
    def hidden_size(self) -> int:
        return self.model_cfg.backbone.hidden_size


def task_for(cfg: Config, autoencoder: Autoencoder | None = None) -> Task:
    """The task of cfg.model.kind; CALM needs its frozen autoencoder (frozen here: eval, no grad)."""
    kind = cfg.model.kind
    if kind == "calm":
        if autoencoder is None:
            raise ValueError("task_for: a CALM run needs its frozen autoencoder. Fix: load model.autoencoder "
                             "and pass it as task_for(cfg, autoencoder)")
        autoencoder.eval().requires_grad_(False)
    return Task(kind=kind, model_cfg=cfg.model, autoencoder=autoencoder)
