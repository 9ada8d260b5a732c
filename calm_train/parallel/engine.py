"""TrainEngine: one optimizer step of any trainer in any layout (TP x PP x DP, ZeRO 0-3).

    tokens [global_batch / dp, L] of this data-parallel replica  ->  micro-batches of train.micro_batch
    no PP: DeepSpeed engine, forward + backward per micro-batch (gradient accumulation), step at the boundary
    PP   : Schedule1F1B over the micro-batches (parallel/pipeline.py), then one DeepSpeed step
    loss  = mean over the global batch (every micro-batch loss is a mean over its sequences)
    rng   = SampleRNG(sample_seeds(train.seed, step, sample ids of the micro-batch)): a sample's noise
            does not depend on its rank or micro-batch, so every layout reproduces the 1-process run.

Optimizer: AdamW(train.adam_beta1/2, eps, weight_decay) with decay on matrices only (no decay on
norm weights and biases: every parameter with fewer than 2 dimensions), global-norm clipping at
train.grad_clip, learning rate `lr_at(cfg, step)` (linear warmup, then constant or cosine).
A non-finite loss or gradient norm skips the update on every rank: the loss of that micro-batch is
turned into NaN before backward, so the gradient norm is NaN everywhere; DeepSpeed's ZeRO
optimizers then skip the step, and at ZeRO stage 0 in fp32 (where DeepSpeed never skips) a
pre-step hook on the optimizer clips and skips instead.  The frozen autoencoder of CALM is held
by the task, outside the DeepSpeed module: it is in no optimizer, ZeRO partition or checkpoint.

Host synchronisation: the step keeps its loss and gradient norm on the device (StepResult reads
them when asked, e.g. at a log step), so the host enqueues the next micro-batch while the GPU
still works.  What remains per step is DeepSpeed's own overflow check before the update, which
decides `skipped`.  Speed switches (`perf.*`): fused AdamW (ds_config), torch.compile of the hot
paths (parallel/compile.py), activation recomputation (the backbone's megatron config).
"""
from __future__ import annotations

import logging
import math
import os

import deepspeed
import deepspeed.ops
import torch
import torch.distributed as dist
from deepspeed.runtime.utils import is_model_parallel_parameter
from megatron.core import parallel_state as ps
from torch import nn
from torch.profiler import record_function

from calm_train.config import Config
from calm_train.models.rng import EVAL_STEP, SampleRNG, sample_seeds
from calm_train.parallel.compile import compile_hot_paths
from calm_train.parallel.ds_config import deepspeed_config, lr_at, train_dtype
from calm_train.parallel.export import full_state_dict
from calm_train.parallel.pipeline import Pipeline, poisoned
from calm_train.parallel.world import MegatronMPU, World, build_world

__all__ = ["TrainEngine", "StepResult", "World", "build_world"]



class StepResult:
    """One optimizer step.  `loss` (mean over the global batch, identical on every rank) and `grad_norm`
    (global L2 norm before clipping; inf/nan when skipped) stay on the device until first read."""

    def __init__(self, loss_total: torch.Tensor, loss_count: int, grad_norm, lr: float, skipped: bool):
        self._loss_total, self._loss_count, self._grad_norm = loss_total, loss_count, grad_norm
        self.lr, self.skipped = lr, skipped

    @property
    def loss(self) -> float:
        return float(self._loss_total) / self._loss_count

    @property
    def grad_norm(self) -> float:
        return math.nan if self._grad_norm is None else float(self._grad_norm)

    def _values(self) -> tuple:
        return self.loss, self.grad_norm, self.lr, self.skipped

    def __eq__(self, other) -> bool:
        return isinstance(other, StepResult) and self._values() == other._values()

    def __repr__(self) -> str:
        return "StepResult(loss={}, grad_norm={}, lr={}, skipped={})".format(*self._values())


class TrainModule(nn.Module):
    """What DeepSpeed wraps: the trainable model of this stage, run through the task.

    forward(tokens_BL, rng) -> scalar loss without PP; forward(x) -> this stage's hidden [S, B, H]
    under PP (x: tokens on the first stage, the previous stage's hidden otherwise).
    """

    def __init__(self, task, model: nn.Module, pipelined: bool):
        super().__init__()
        self.model = model
        self.task = task            # not a module: the frozen autoencoder inside it is not registered
        self.pipelined = pipelined

    def forward(self, *inputs):
        if self.pipelined:
            return self.task.stage_forward(self.model, *inputs)
        return self.task.loss(self.model, *inputs)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of these gradients over the TP x PP group; TP-replicated parameters count once."""
    tp_rank = ps.get_tensor_model_parallel_rank()
    squares = [p.grad.detach().float().pow(2).sum() for p in params
               if p.grad is not None and (tp_rank == 0 or is_model_parallel_parameter(p))]
    total = torch.stack(squares).sum() if squares else torch.zeros((), device=params[0].device)
    dist.all_reduce(total, group=ps.get_model_parallel_group())
    return total.sqrt()


class Stage0Guard:
    """ZeRO stage 0 in fp32: DeepSpeed would clip and step even on NaN gradients.  This pre-step hook
    (DeepSpeed's own clipping is turned off) measures the norm, clips, and on a non-finite norm drops
    every gradient, so torch's AdamW leaves parameters and state untouched."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float):
        self.max_norm = max_norm
        self.norm = 0.0
        self.skipped = False
        optimizer.register_step_pre_hook(self.before_step)

    def before_step(self, optimizer, args, kwargs) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = grad_norm(params)
        self.norm, self.skipped = float(norm), not bool(torch.isfinite(norm))
        for p in params:
            if self.skipped:
                p.grad = None
            elif p.grad is not None and self.max_norm > 0:
                p.grad.mul_(torch.clamp(self.max_norm / (norm + 1e-6), max=1.0))


def add_sequence_parallel_hooks(module: nn.Module) -> None:
    """Weights tagged `sequence_parallel` (norms) see only this TP rank's slice of the sequence:
    all-reduce their gradient over TP before it is accumulated (so it works under any ZeRO stage)."""
    group = ps.get_tensor_model_parallel_group()

    def all_reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    for p in module.parameters():
        if getattr(p, "sequence_parallel", False):
            p.register_hook(all_reduce)


def _prepare_deepspeed(world: World) -> None:
    if world.world_size == 1:
        os.environ.setdefault("LOCAL_RANK", "0")      # DeepSpeed insists; a launcher sets it otherwise
    if world.device.type == "cpu":
        # the shared-memory allreduce op is JIT-compiled on first use (~30-60 s); gloo is enough here
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


class TrainEngine:
    def __init__(self, cfg: Config, task, world: World):
        self.cfg, self.task, self.world = cfg, task, world
        self.dtype = train_dtype(cfg, world.device)
        model = task.build_model(cfg, pre_process=world.is_first_stage, post_process=world.is_last_stage,
                                 params_dtype=self.dtype).to(world.device)
        if cfg.parallel.sequence_parallel:
            add_sequence_parallel_hooks(model)
        self.compiled = compile_hot_paths(model) if cfg.perf.compile == "on" else []
        module = TrainModule(task, model, pipelined=world.pp_size > 1)
        ds_cfg = deepspeed_config(cfg, world.dp_size, world.device)
        # DeepSpeed's default 5e8-element buckets allocate ~2 GiB fp32 per step even for a tiny model: a bucket
        # never needs more elements than the model has trainable parameters (a preset's own value wins)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            ds_cfg["zero_optimization"].setdefault(key, int(min(5e8, max(1e6, trainable))))
        guarded = cfg.parallel.zero_stage == 0 and self.dtype == torch.float32
        if guarded:
            ds_cfg["gradient_clipping"] = 0.0
        _prepare_deepspeed(world)
        self.ds, _, _, _ = deepspeed.initialize(
            model=module, model_parameters=param_groups(module, cfg.train.weight_decay), config=ds_cfg,
            mpu=MegatronMPU())
        self.guard = Stage0Guard(self.ds.optimizer, cfg.train.grad_clip) if guarded else None
        self.pipeline = Pipeline(self.ds, task, world, cfg, self.dtype) if world.pp_size > 1 else None

    @property
    def model(self) -> nn.Module:
        """This rank's trainable module (this stage's part under PP), unwrapped."""
        return self.ds.module.model

    # ------------------------------------------------------------------------------------------
    def _micro_batches(self, tokens_BL: torch.Tensor, sample_ids: torch.Tensor):
        micro = self.cfg.train.micro_batch
        if tokens_BL.shape[0] % micro or tokens_BL.shape[0] != sample_ids.shape[0]:
            raise ValueError(f"TrainEngine: {tokens_BL.shape[0]} sequences with {sample_ids.shape[0]} sample ids "
                             f"do not split into micro-batches of train.micro_batch={micro}. Fix: feed "
                             "train.global_batch / dp sequences and one id per sequence")
        if self.world.device.type == "cuda" and tokens_BL.device.type == "cpu":
            tokens_BL = tokens_BL.pin_memory()      # a copy from pinned memory does not wait for the GPU to drain
        tokens_BL = tokens_BL.to(self.world.device, non_blocking=True)
        return list(zip(tokens_BL.split(micro), sample_ids.split(micro)))

    def _rng(self, step: int, ids: torch.Tensor) -> SampleRNG:
        return SampleRNG(sample_seeds(self.cfg.train.seed, step, ids), self.world.device)

    def _global_sum(self, loss_sum) -> torch.Tensor:
        """Sum over the global batch of the per-rank sums of micro-batch means (last stage only), float64 on the
        device: an all-reduce the host does not wait for.  Divide by n_micro x dp x tp for the mean."""
        total = torch.zeros(1, dtype=torch.float64, device=self.world.device)
        if self.world.is_last_stage:
            total += loss_sum
        dist.all_reduce(total)
        return total

    def train_step(self, tokens_BL: torch.Tensor, sample_ids: torch.Tensor, step: int) -> StepResult:
        lr = lr_at(self.cfg, step)
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr
        self.ds.train()
        micro_batches = self._micro_batches(tokens_BL, sample_ids)
        if self.pipeline is not None:
            loss_sum = self.pipeline.run(tokens_BL, sample_ids, step, train=True)
            with record_function("engine.optimizer_step"):
                self.ds.step()
        else:
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.world.device)
            for tokens, ids in micro_batches:
                with record_function("engine.forward"):
                    loss = self.ds(tokens, self._rng(step, ids))
                with record_function("engine.backward"):
                    self.ds.backward(poisoned(loss))
                with record_function("engine.optimizer_step"):
                    self.ds.step()
                loss_sum += loss.detach().double()
        if self.guard is not None:
            norm, skipped = self.guard.norm, self.guard.skipped
        else:
            norm, skipped = self.ds.get_global_grad_norm(), not self.ds.was_step_applied()
        return StepResult(self._global_sum(loss_sum), self._mean_count(len(micro_batches)), norm, lr, skipped)

    def _mean_count(self, n_micro: int) -> int:
        return n_micro * self.world.dp_size * self.world.tp_size

    @torch.no_grad()
    def eval_losses(self, tokens_BL: torch.Tensor, sample_ids: torch.Tensor) -> list[float] | None:
        """The mean loss of each micro-batch of this replica's batch, without gradients (model in eval mode,
        fixed noise), on the last pipeline stage (None on the others); no collective beyond the replica's."""
        self.ds.eval()
        micro_batches = self._micro_batches(tokens_BL, sample_ids)
        if self.pipeline is not None:
            self.pipeline.run(tokens_BL, sample_ids, EVAL_STEP, train=False)
            losses = self.pipeline.micro_losses() if self.world.is_last_stage else None
        else:
            losses = [float(self.ds(tokens, self._rng(EVAL_STEP, ids))) for tokens, ids in micro_batches]
        self.ds.train()
        return losses

    def eval_loss(self, tokens_BL: torch.Tensor, sample_ids: torch.Tensor) -> float:
        """Mean loss over the global batch without gradients (model in eval mode, fixed noise)."""
        losses = self.eval_losses(tokens_BL, sample_ids)
        n_micro = tokens_BL.shape[0] // self.cfg.train.micro_batch
        return float(self._global_sum(sum(losses) if losses is not None else 0.0)) / self._mean_count(n_micro)

    def describe(self) -> str:
        """One line: the attention backend that runs, precision, optimizer kernel, compile and recomputation."""
        backbone = getattr(self.model, "backbone", None)
        optimizer = getattr(self.ds.optimizer, "optimizer", self.ds.optimizer)      # inside DeepSpeed's wrapper
        master = " with fp32 master weights" if self.dtype == torch.bfloat16 else ""
        parts = [f"attention {backbone.attention_backend}" if backbone is not None else None,
                 f"{str(self.dtype)[6:]} weights{master}",
                 f"optimizer {type(optimizer).__name__} ({'fused' if optimizer.defaults.get('fused') else 'not fused'})",
                 f"compiled: {', '.join(self.compiled) or 'nothing'}", f"recompute {self.cfg.perf.recompute}"]
        return "; ".join(p for p in parts if p)

    # ------------------------------------------------------------------------------------------
    def save_checkpoint(self, directory, tag: str, client_state: dict) -> None:
        """DeepSpeed checkpoint (every rank calls): module shards, ZeRO optimizer partitions, client_state."""
        self.ds.save_checkpoint(str(directory), tag=tag, client_state=dict(client_state))

    def load_checkpoint(self, directory, tag: str) -> dict:
        """Restore what save_checkpoint wrote (same layout); returns its client_state."""
        path, client_state = self.ds.load_checkpoint(str(directory), tag=tag)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint '{tag}' in {directory}. Fix: point at a directory "
                                    "written by TrainEngine.save_checkpoint with the same tp/pp/dp layout")
        return client_state or {}

    def state_for_export(self) -> dict[str, torch.Tensor]:
        """Full fp32 state dict of the trainable model (TP/PP gathered, ZeRO consolidated) on rank 0."""
        return full_state_dict(self.ds.module.model, self.world)
