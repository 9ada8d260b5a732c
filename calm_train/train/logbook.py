"""Rank-0 run logging per the run-directory contract: metrics.jsonl, eval.jsonl, progress, wandb, TensorBoard."""
from __future__ import annotations

import hashlib
import json
import math
import pathlib
import numbers
import sys

from calm_train.errors import UserError
from calm_train.files import write_atomic
from calm_train.train.progress import ProgressDisplay


def read_jsonl(path: pathlib.Path, log=print) -> list[dict]:
    """The objects of a history file.  A torn last line (a write cut by a full disk or a power loss) is
    dropped with a warning; a damaged line before it is an error naming the file and line."""
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise UserError(f"{path}:{number} is not a JSON object ({err}). Fix: repair or delete that line") \
                    from err
            log(f"warning: dropped the torn last line of {path} ({len(line)} characters: {line[:40]!r}...)")
            continue
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number} is {line.strip()[:40]!r}, not a JSON object. Fix: repair or delete "
                            "that line")
        rows.append(row)
    return rows


def truncate_after(path: pathlib.Path, step: int, log=print) -> None:
    """On resume, drop lines of steps after the checkpoint: those steps are redone, so the file keeps one
    object per step and equals an uninterrupted run's."""
    if not path.is_file() or not path.stat().st_size:
        return
    rows = read_jsonl(path, log)
    kept = [r for r in rows if r.get("step", 0) <= step]
    with open(path, "rb") as f:
        f.seek(-1, 2)
        whole_lines = f.read(1) == b"\n"  # else a torn last line, or a line to finish before the next append
    if len(kept) != len(rows) or not whole_lines:
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def _clean(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


class Logbook:
    """Appends one JSON object per logged step / evaluation; a progress line on rank 0; optional wandb."""

    def __init__(self, run_dir: pathlib.Path, cfg, enabled: bool, total_steps: int):
        self.enabled = enabled
        self.metrics_path = run_dir / "metrics.jsonl"
        self.eval_path = run_dir / "eval.jsonl"
        self.total = total_steps
        self.progress = ProgressDisplay(total_steps) if enabled and cfg.logging.progress else None
        self.wandb = self.tensorboard = None
        self.cfg, self.run_dir = cfg, run_dir
        if enabled and cfg.logging.tensorboard:
            try:
                import torch.utils.tensorboard  # noqa: F401 - fail before training, not at the first row
            except ImportError as err:
                raise UserError(f"config key 'logging.tensorboard' is true but TensorBoard cannot be imported ({err}). "
                                "Fix: pip install tensorboard, or set logging.tensorboard=false") from err

    def resume_at(self, step: int) -> None:
        """Drop the lines of steps after the checkpoint the run continues from; a start at step 0 moves an
        earlier history aside (NAME.before-restart-<UTC>)."""
        if not self.enabled:
            return
        from calm_train.train.rundir import move_aside
        for path in (self.metrics_path, self.eval_path, self.run_dir / "tensorboard"):
            if step == 0 and (path.is_dir() or path.is_file() and path.stat().st_size):
                move_aside(path, self.event)
            elif path.is_file():
                truncate_after(path, step, self.event)
        if self.cfg.logging.wandb != "off" and self.wandb is None:
            import wandb
            from calm_train.config import to_dict
            run_id = hashlib.sha256(str(self.run_dir.resolve()).encode()).hexdigest()[:12]
            self.wandb = wandb.init(project=self.cfg.logging.project, mode=self.cfg.logging.wandb,
                                    config=to_dict(self.cfg), dir=str(self.run_dir), name=self.run_dir.name,
                                    id=run_id, resume="allow")
        if self.cfg.logging.tensorboard and self.tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: TensorBoard hides the events of steps after the checkpoint, which are redone
            self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=step + 1 if step else None)

    def _append(self, path: pathlib.Path, row: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")

    def advance(self, step: int, seconds: float, tokens: int, loss: float) -> None:
        """After every step: the progress bar and the ETA window."""
        if self.progress is not None:
            self.progress.advance(step, seconds, tokens, loss)

    def step(self, row: dict) -> None:
        if not self.enabled:
            return
        self._append(self.metrics_path, row)
        self._scalars("train", row)
        if self.progress is not None:
            self.progress.logged(row)

    def evaluation(self, row: dict) -> None:
        if not self.enabled:
            return
        self._append(self.eval_path, row)
        self._scalars("eval", row)
        self.event("eval " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def _scalars(self, group: str, row: dict) -> None:
        """The row's numbers to wandb and TensorBoard as `group/key`."""
        values = {f"{group}/{k}": v for k, v in row.items()
                  if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)}
        if self.wandb is not None:
            self.wandb.log(values, step=row["step"])
        if self.tensorboard is not None:
            for tag, value in values.items():
                self.tensorboard.add_scalar(tag, value, row["step"])

    def event(self, message: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.write(f"[calm-train] {message}")
        else:
            print(f"[calm-train] {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
