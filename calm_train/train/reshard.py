"""Resume a run in another parallel layout: tp, pp, dp or the ZeRO stage changed.

DeepSpeed's own files in a checkpoint (engine/) load only into the layout that wrote them. Beside
them every checkpoint holds the layout-free view of the run, and a resume in another layout builds
its engine as usual and then loads that view (calm_train/parallel/export.py does the slicing):

    weights       model.safetensors (fp32, tp = pp = 1 names) -> this rank's TP shard of its stage:
                  the module's tensors and ZeRO's fp32 masters
    Adam moments  optimizer.safetensors: exp_avg/<name>, exp_avg_sq/<name> -> the same shard, into
                  this rank's ZeRO partition (or torch's state at stage 0)
    Adam step     optimizer.safetensors metadata "adam_step": the bias correction continues
    LR            lr_at(cfg, step) is a pure function of the training step
    data          state.json's loader position, in global samples (elastic over dp sizes)
    progress      step, tokens, samples, skipped steps, elapsed time (state.json)

Not carried: the per-rank RNG states (rng/rank_N.pt): a rank's number means another shard in the
new layout, and no training draw uses them (every draw is seeded per sample, models/rng.py).
"""
from __future__ import annotations

import pathlib
from collections.abc import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from calm_train.config import Config, data_parallel_size
from calm_train.parallel.ds_config import lr_at
from calm_train.parallel.export import full_optimizer_state, load_full_optimizer_state, load_full_weights

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
        self._file = safe_open(str(path), "pt")
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


def reshard(engine, checkpoint: pathlib.Path, saved: dict, layout: dict, cfg: Config, progress) -> str:
    """Load the layout-free state of `checkpoint` (state.json `saved`) into `engine`, built in `layout`.
    Every rank calls. Returns the log line: the two layouts, what was carried and what was not."""
    load_full_weights(engine.model, SafetensorsFile(checkpoint / "model.safetensors"))
    carried, lost = ["weights"], ["per-rank RNG states (unused: training noise is seeded per sample)"]
    path = checkpoint / OPTIMIZER_FILE
    if path.is_file():
        moments = SafetensorsFile(path)
        step = int(moments.metadata["adam_step"])
        load_full_optimizer_state(engine.model, engine.ds.optimizer, moments, step)
        carried.append(f"Adam moments and Adam step {step}")
    else:
        lost.insert(0, f"Adam moments ({OPTIMIZER_FILE} is missing: an older checkpoint; Adam restarts "
                       "from zero moments)")
    engine.ds.global_steps, engine.ds.global_samples = progress.step, progress.samples
    carried.append(f"step {progress.step} (lr {lr_at(cfg, progress.step + 1):.4g} next)")
    loader = progress.loader
    if loader is not None:
        carried.append(f"data position (epoch {loader['epoch']}, sample {loader['sample_in_epoch']} of the epoch)")
    else:
        lost.insert(0, "data position (state.json has no loader state: the data restarts at the epoch's start)")
    return (f"layout changed from {describe(saved['layout'])} to {describe(layout)}: resharded {checkpoint}; "
            f"carried {', '.join(carried)}; not carried: {', '.join(lost)}")
