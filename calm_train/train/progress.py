"""Rank 0's progress display: a live tqdm bar on a terminal, plain lines in a log file.

On a TTY the bar moves every step and shows the loss, tokens/s and the ETA, both over the last
WINDOW steps (one slow step, an evaluation or a save, does not swing the ETA).  When stderr is not a
TTY (a SLURM log, a pipe) nothing is redrawn: one line per logged step (train.log_every), never `\r`.
"""
from __future__ import annotations

import collections
import sys

WINDOW = 20


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Throughput:
    """Seconds and tokens of the last `window` steps."""

    def __init__(self, window: int = WINDOW):
        self.steps = collections.deque(maxlen=window)

    def add(self, seconds: float, tokens: int) -> None:
        self.steps.append((seconds, tokens))

    def tokens_per_s(self) -> float:
        seconds = sum(s for s, _ in self.steps)
        return sum(t for _, t in self.steps) / seconds if seconds > 0 else 0.0

    def eta_s(self, remaining_steps: int) -> float | None:
        if not self.steps:
            return None
        return remaining_steps * sum(s for s, _ in self.steps) / len(self.steps)


class ProgressDisplay:
    """`advance` after every step, `logged` for each metrics row, `write` for any other line."""

    def __init__(self, total: int, stream=None, interactive: bool | None = None):
        self.stream = stream or sys.stderr
        self.total = total
        self.window = Throughput()
        interactive = self.stream.isatty() if interactive is None else interactive
        self.bar = None
        if interactive:
            from tqdm import tqdm
            self.bar = tqdm(total=total, file=self.stream, dynamic_ncols=True, unit="step",
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def advance(self, step: int, seconds: float, tokens: int, loss: float) -> None:
        self.window.add(seconds, tokens)
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(self._summary(step, loss))

    def logged(self, row: dict) -> None:
        """One plain line per metrics row when there is no bar."""
        if self.bar is None:
            extra = f" mem {row['peak_mem_gib']:.2f} GiB" if row.get("peak_mem_gib") is not None else ""
            self.write(f"[calm-train] step {row['step']}/{self.total} {self._summary(row['step'], row['loss'])}{extra}")

    def _summary(self, step: int, loss: float | None) -> str:
        loss_text = f"{loss:.4f}" if loss is not None else "nan"
        return (f"loss {loss_text} | {self.window.tokens_per_s():,.0f} tok/s | "
                f"eta {format_seconds(self.window.eta_s(self.total - step))}")

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
