"""The DeepSpeed config of a run: a JSON preset from ds_configs/, filled from the train config.

The preset (`parallel.ds_config`: a name in the top-level ds_configs/ of the checkout, installed as
calm_train/ds_configs/ in the wheel, or a path; None picks `zero1_pp` under
pipeline parallelism, else `zero{parallel.zero_stage}`) holds what the train config does not:
optimizer implementation, offload, bucket sizes.  Batch sizes, AdamW hyper-parameters, clipping,
precision and the ZeRO stage always come from the train config.  The presets use torch's AdamW
(`torch_adam`): no JIT build, and a resume is bit-exact (DeepSpeed's fused CPU Adam is not).
The learning rate is set by the engine every step (`lr_at`), so the preset carries no scheduler.
`perf.fused_adamw` (auto: on CUDA) makes it torch's fused AdamW kernel (`fused=True`, one launch for
all tensors of a group); on CPU, and with offload (DeepSpeed's CPU Adam), it changes nothing.
"""
from __future__ import annotations

import copy
import json
import math
import pathlib

import torch

from calm_train.config import Config, ConfigError

PACKAGE = pathlib.Path(__file__).resolve().parents[1]
# the one copy is the checkout's top-level ds_configs/; the wheel installs it as calm_train/ds_configs/
# (pyproject.toml: package-dir)
DS_CONFIG_DIR = next((d for d in (PACKAGE / "ds_configs", PACKAGE.parent / "ds_configs") if d.is_dir()),
                     PACKAGE / "ds_configs")


def preset_path(cfg: Config) -> pathlib.Path:
    p = cfg.parallel
    name = p.ds_config or ("zero1_pp" if p.pp > 1 else f"zero{p.zero_stage}")
    path = pathlib.Path(name)
    if path.suffix != ".json":
        path = DS_CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        names = sorted(q.stem for q in DS_CONFIG_DIR.glob("*.json"))
        raise ConfigError("parallel.ds_config", f"no DeepSpeed config {path}", f"use one of {names} or a JSON path")
    return path


def train_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """train.dtype auto: bf16 on CUDA, fp32 on CPU."""
    name = cfg.train.dtype
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if name == "bf16" else torch.float32


def deepspeed_config(cfg: Config, dp_size: int, device: torch.device) -> dict:
    """The dict handed to deepspeed.initialize for this layout."""
    path = preset_path(cfg)
    ds = json.loads(path.read_text())
    p, t = cfg.parallel, cfg.train
    zero = ds.setdefault("zero_optimization", {})
    stage = zero.setdefault("stage", p.zero_stage)
    if stage != p.zero_stage and p.ds_config is not None:
        raise ConfigError("parallel.ds_config", f"{path} sets ZeRO stage {stage} but parallel.zero_stage="
                          f"{p.zero_stage}", "make the two agree (parallel.zero_stage decides the stage)")
    zero["stage"] = p.zero_stage
    if p.offload:
        zero.setdefault("offload_optimizer", {"device": "cpu", "pin_memory": False})
    offloaded = "offload_optimizer" in zero
    accumulation = t.global_batch // (t.micro_batch * dp_size)
    pipelined = p.pp > 1
    ds.update({
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.global_batch // dp_size if pipelined else t.micro_batch,
        # under PP the 1F1B schedule runs the micro-batches and one engine.step() follows
        "gradient_accumulation_steps": 1 if pipelined else accumulation,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": train_dtype(cfg, device) == torch.bfloat16},
    })
    if pipelined:
        ds["managed_gradient_accumulation"] = False
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    params.update({"lr": t.lr, "betas": [t.adam_beta1, t.adam_beta2], "eps": t.adam_eps,
                   "weight_decay": t.weight_decay})
    if offloaded:
        params.pop("torch_adam", None)          # offload runs DeepSpeedCPUAdam (a JIT-built op)
    elif params.get("torch_adam") and fused_adamw(cfg, device):
        params["fused"] = True                  # DeepSpeed passes it on to torch.optim.AdamW
    return copy.deepcopy(ds)


def fused_adamw(cfg: Config, device: torch.device) -> bool:
    """perf.fused_adamw: auto and on mean fused on CUDA; CPU steps keep torch's default (foreach) kernel."""
    return device.type == "cuda" and cfg.perf.fused_adamw in ("auto", "on")


def lr_at(cfg: Config, step: int) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup to train.lr over
    train.warmup_steps, then constant or cosine decay to train.min_lr at train.steps."""
    t = cfg.train
    if step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))
