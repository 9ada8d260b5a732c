"""Rank-0 run logging per the run-directory contract: metrics.jsonl, eval.jsonl, progress, wandb."""
from __future__ import annotations

import hashlib
import json
import math
import pathlib
import sys

from calm_train.errors import UserError
from calm_train.files import write_atomic


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
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise UserError(f"{path}:{number} is not a JSON object ({err}). Fix: repair or delete that line") \
                    from err
            log(f"warning: dropped the torn last line of {path} ({len(line)} characters: {line[:40]!r}...)")
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
        self.progress = enabled and cfg.logging.progress
        self.wandb = None
        self.cfg, self.run_dir = cfg, run_dir

    def resume_at(self, step: int) -> None:
        """Drop the lines of steps after the checkpoint the run continues from; a start at step 0 moves an
        earlier history aside (NAME.before-restart-<UTC>)."""
        if not self.enabled:
            return
        for path in (self.metrics_path, self.eval_path):
            if step == 0 and path.is_file() and path.stat().st_size:
                from calm_train.train.rundir import move_aside
                move_aside(path, self.event)
            else:
                truncate_after(path, step, self.event)
        if self.cfg.logging.wandb != "off" and self.wandb is None:
            import wandb
            from calm_train.config import to_dict
            run_id = hashlib.sha256(str(self.run_dir.resolve()).encode()).hexdigest()[:12]
            self.wandb = wandb.init(project=self.cfg.logging.project, mode=self.cfg.logging.wandb,
                                    config=to_dict(self.cfg), dir=str(self.run_dir), name=self.run_dir.name,
                                    id=run_id, resume="allow")

    def _append(self, path: pathlib.Path, row: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")

    def step(self, row: dict, eta_s: float | None) -> None:
        if not self.enabled:
            return
        self._append(self.metrics_path, row)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])
        if self.progress:
            done = row["step"] / self.total
            bar = "#" * int(24 * done) + "-" * (24 - int(24 * done))
            eta = f"{eta_s:6.0f}s" if eta_s is not None else "     ?"
            sys.stderr.write(f"\r[{bar}] step {row['step']}/{self.total} loss {row['loss']:.4f} "
                             f"{row['tokens_per_s']:.0f} tok/s eta {eta}")
            if row["step"] == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    def evaluation(self, row: dict) -> None:
        if not self.enabled:
            return
        self._append(self.eval_path, row)
        if self.wandb is not None:
            self.wandb.log({f"eval/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])
        if self.progress:
            sys.stderr.write("\n")
        self.event("eval " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def event(self, message: str) -> None:
        if self.enabled:
            print(f"[calm-train] {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
