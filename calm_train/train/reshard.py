"""Resume a run from the layout-free files of a checkpoint, in any parallel layout: the one resume path.

A checkpoint holds the run, not the layout that wrote it, and no pickle.  A resume builds its engine as
usual (any tp, pp, dp, ZeRO stage) and then loads (calm_train/parallel/export.py does the slicing):

    weights       model.safetensors (fp32, tp = pp = 1 names) -> this rank's TP shard of its stage:
                  the module's tensors and ZeRO's fp32 masters
    Adam moments  optimizer.safetensors: exp_avg/<name>, exp_avg_sq/<name> -> the same shard, into
                  this rank's ZeRO partition (or torch's state at stage 0)
    Adam step     optimizer.safetensors metadata "adam_step": the bias correction continues
    engine        state.json "engine": DeepSpeed's global_steps, global_samples, skipped_steps (its
                  micro-step count follows: global_steps x gradient accumulation steps)
    LR            lr_at(cfg, step) is a pure function of the training step (no scheduler state)
    data          state.json's loader position, in global samples (elastic over dp sizes)
    progress      step, tokens, samples, skipped steps, elapsed time (state.json)
    RNG           rng/rank_NNNNN.safetensors of this rank, in the same layout only: in another one a
                  rank's number means another shard, and no training draw uses them (every draw is
                  seeded per sample, models/rng.py)
In fp32 the same layout resumes bit for bit.
"""
from __future__ import annotations

import pathlib
from collections.abc import Mapping

import torch
from safetensors.torch import save_file

from calm_train.config import Config, data_parallel_size
from calm_train.convert.native import open_safetensors
from calm_train.parallel.ds_config import lr_at
from calm_train.parallel.export import full_optimizer_state, load_full_optimizer_state, load_full_weights
from calm_train.train.checkpoint import set_rng_state

OPTIMIZER_FILE = "optimizer.safetensors"


def layout_of(cfg: Config, world_size: int) -> dict:
    """The parallel layout recorded in state.json; a resume compares it with its own."""
    return {"world_size": world_size, "tp": cfg.parallel.tp, "pp": cfg.parallel.pp,
            "dp": data_parallel_size(cfg, world_size), "zero_stage": cfg.parallel.zero_stage}


def describe(layout: dict) -> str:
    return (f"tp={layout['tp']} pp={layout['pp']} dp={layout['dp']} zero={layout['zero_stage']} "
            f"({layout['world_size']} process{'es' if layout['world_size'] > 1 else ''})")


def optimizer_export(engine) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every rank calls (collectives): the tensors and metadata of optimizer.safetensors on rank 0
    ({} on the others)."""
    moments, step = full_optimizer_state(engine.model, engine.ds.optimizer, engine.world)
    return moments, {"adam_step": str(step)}


def write_optimizer(directory: pathlib.Path, moments: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_file({k: v.contiguous() for k, v in moments.items()}, str(directory / OPTIMIZER_FILE), metadata)


class SafetensorsFile(Mapping):
    """A safetensors file read one tensor at a time: a rank reads only what its own shard needs."""

    def __init__(self, path: pathlib.Path):
        self._file = open_safetensors(path)
        self._keys = set(self._file.keys())
        self.metadata = self._file.metadata() or {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def engine_counters(engine) -> dict:
    """DeepSpeed's own step counters, for state.json "engine"."""
    ds = engine.ds
    return {"global_steps": ds.global_steps, "global_samples": ds.global_samples, "skipped_steps": ds.skipped_steps}


def restore(engine, checkpoint: pathlib.Path, saved: dict, layout: dict, cfg: Config, progress,
            rng: dict | None) -> str:
    """Load the layout-free state of `checkpoint` (state.json `saved`; `rng`: this rank's RNG states, read when
    the layout is the same) into `engine`, built in `layout`. Every rank calls. Returns the log line: in another
    layout the two layouts, what was carried and what was not."""
    load_full_weights(engine.model, SafetensorsFile(checkpoint / "model.safetensors"))
    carried, lost = ["weights"], []
    path = checkpoint / OPTIMIZER_FILE
    if path.is_file():
        moments = SafetensorsFile(path)
        step = int(moments.metadata["adam_step"])
        load_full_optimizer_state(engine.model, engine.ds.optimizer, moments, step)
        carried.append(f"Adam moments and Adam step {step}")
    else:
        lost.append(f"Adam moments ({OPTIMIZER_FILE} is missing: an older checkpoint; Adam restarts "
                    "from zero moments)")
    counters = saved.get("engine") or {"global_steps": progress.step, "global_samples": progress.samples,
                                       "skipped_steps": progress.skipped_steps}
    ds = engine.ds
    ds.global_steps, ds.global_samples, ds.skipped_steps = (counters[k] for k in ("global_steps", "global_samples",
                                                                                  "skipped_steps"))
    ds.micro_steps = ds.global_steps * ds.gradient_accumulation_steps()
    carried.append(f"step {progress.step} (lr {lr_at(cfg, progress.step + 1):.4g} next)")
    loader = progress.loader
    if loader is not None:
        carried.append(f"data position (epoch {loader['epoch']}, sample {loader['sample_in_epoch']} of the epoch)")
    else:
        lost.insert(0, "data position (state.json has no loader state: the data restarts at the epoch's start)")
    if rng is not None:
        set_rng_state(rng)
    if saved.get("layout", layout) == layout:
        note = "" if rng is not None else " (per-rank RNG states not carried: no rng/*.safetensors of this rank)"
        return f"resumed from {checkpoint} at step {progress.step}{note}" + (f"; not carried: {', '.join(lost)}"
                                                                            if lost else "")
    lost.append("per-rank RNG states (unused: training noise is seeded per sample)")
    return (f"layout changed from {describe(saved['layout'])} to {describe(layout)}: resharded {checkpoint}; "
            f"carried {', '.join(carried)}; not carried: {', '.join(lost)}")
