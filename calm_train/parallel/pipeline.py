"""Pipeline parallelism: torch.distributed.pipelining's Schedule1F1B around DeepSpeed-wrapped stages.

Stage s runs `engine(x)` (TrainModule.forward: tokens -> embed + its layers on the first stage,
the previous stage's hidden -> its layers on the others); the stage shapes are static
(meta tensors), which keeps the schedule from probing DeepSpeed's hooks with dry runs:

    first stage in : tokens [micro_batch, L]                   (int64)
    between stages : hidden [positions / tp if SP else positions, micro_batch, hidden]
    last stage out : hidden [positions, micro_batch, hidden]   (Backbone gathers SP on the last stage)

Targets: the last stage needs each micro-batch's tokens (CALM's targets come from the frozen
autoencoder's encoder on the fly, AR's are the next tokens) and sample ids (its RNG).  They
travel as the schedule's `target`: int64 [B, L + 1] = tokens with the sample id appended as a
last column, split into micro-batches by the schedule exactly as the first stage's inputs are.
The loss function divides by the number of micro-batches (scale_grads=False), so one
`engine.step()` afterwards applies the mean gradient of the batch (ZeRO-1 reduces it over DP).
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B

from calm_train.models.rng import SampleRNG, sample_seeds


def poisoned(loss: torch.Tensor) -> torch.Tensor:
    """loss, or NaN-scaled when non-finite, so every gradient (and the global norm) is NaN and the step skips.
    Decided on the device (a finite loss is multiplied by exactly 1): the host does not wait for the GPU."""
    return loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan")).to(loss.dtype)


class _EngineStage(nn.Module):
    def __init__(self, engine):
        super().__init__()
        self.engine = engine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.engine(x)


class Pipeline:
    def __init__(self, engine, task, world, cfg, dtype: torch.dtype):
        self.engine, self.task, self.world, self.cfg, self.dtype = engine, task, world, cfg, dtype
        self.stage_module = _EngineStage(engine)
        self._schedules: dict[tuple[int, int], Schedule1F1B] = {}
        self._step = 0
        self._losses: list[float] = []
        self._n_micro = 1

    def _schedule(self, n_micro: int, seq_len: int) -> Schedule1F1B:
        key = (n_micro, seq_len)
        if key not in self._schedules:
            w, micro = self.world, self.cfg.train.micro_batch
            positions = self.task.positions(seq_len)
            between = positions // w.tp_size if self.cfg.parallel.sequence_parallel else positions
            hidden = self.task.hidden_size
            if w.is_first_stage:
                inputs = torch.empty(micro, seq_len, dtype=torch.long, device="meta")
            else:
                inputs = torch.empty(between, micro, hidden, dtype=self.dtype, device="meta", requires_grad=True)
            out_len = positions if w.is_last_stage else between
            outputs = torch.empty(out_len, micro, hidden, dtype=self.dtype, device="meta", requires_grad=True)
            stage = PipelineStage(self.stage_module, w.pp_rank, w.pp_size, w.device, input_args=(inputs,),
                                  output_args=(outputs,), group=ps.get_pipeline_model_parallel_group())
            self._schedules[key] = Schedule1F1B(stage, n_micro, loss_fn=self._loss, scale_grads=False)
        return self._schedules[key]

    def _loss(self, hidden_SBH: torch.Tensor, target_BX: torch.Tensor) -> torch.Tensor:
        tokens_BL, ids = target_BX[:, :-1], target_BX[:, -1]
        rng = SampleRNG(sample_seeds(self.cfg.train.seed, self._step, ids.cpu()), self.world.device)
        loss = self.task.loss_from_hidden(self.engine.module.model, hidden_SBH, tokens_BL, rng)
        self._losses.append(float(loss.detach()))
        return poisoned(loss) / self._n_micro

    def run(self, tokens_BL: torch.Tensor, sample_ids: torch.Tensor, step: int, train: bool) -> float:
        """One pass over this replica's batch; returns the sum of micro-batch losses (last stage, else 0)."""
        n_micro = tokens_BL.shape[0] // self.cfg.train.micro_batch
        schedule = self._schedule(n_micro, tokens_BL.shape[1])
        self._step, self._n_micro, self._losses = step, n_micro, []
        device = self.world.device
        args = (tokens_BL.to(device),) if self.world.is_first_stage else ()
        target = (torch.cat([tokens_BL, sample_ids.reshape(-1, 1).to(tokens_BL.dtype)], dim=1).to(device)
                  if self.world.is_last_stage else None)
        if train:
            schedule.step(*args, target=target, losses=[] if target is not None else None, return_outputs=False)
        else:
            schedule.eval(*args, target=target, losses=[] if target is not None else None)
        return sum(self._losses)

    def micro_losses(self) -> list[float]:
        """The last stage's mean loss of each micro-batch of the latest `run`, in order."""
        return list(self._losses)
