"""Where a launch starts in RUN_DIR (rank 0, under the run-directory lock, before anything else is written).

`train.resume_from` chooses:
    ""        (auto) the newest checkpoint whose files match their sha256; damaged newer ones are named,
              passed over and moved aside.  When checkpoints exist but none is intact the launch stops
              (DamagedRun, exit 1) naming each damaged file and the choices below: never a silent restart.
    scratch   restart at step 0: checkpoints/, metrics.jsonl, eval.jsonl, tensorboard/ and tokenizer/ are
              moved aside to NAME.before-restart-<UTC>, never deleted.
    PATH      resume from the named checkpoint (verified; a URL is downloaded first); this run's checkpoints
              of later steps are moved aside.
The choice is recorded in state.json ("resume_from") of every checkpoint that descends from it, so a
relaunch of the same command (a requeued job) continues the run instead of applying it again.
`choose_start` decides without changing anything; what it moves aside is moved only once every other
check of the launch (identity, tokenizer) has passed.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil

from calm_train.convert.native import (LATEST, CheckpointError, read_json, resolve_checkpoint, step_dirs, step_of,
                                       verify_checkpoint)
from calm_train.files import move_aside as move_path_aside
from calm_train.errors import UserError
from calm_train.convert.remote import fetch_checkpoint
from calm_train.storage.url import is_url

SCRATCH = "scratch"


class DamagedRun(UserError):
    """Checkpoints exist but none is intact."""


def move_aside(path: pathlib.Path, log) -> pathlib.Path:
    """Rename `path` to NAME.before-restart-<UTC> (files.move_aside: nothing is overwritten) and say so."""
    aside = move_path_aside(path, "before-restart")
    log(f"moved {path} aside to {aside}")
    return aside


def read_state(ckpt: pathlib.Path) -> dict:
    path = ckpt / "state.json"
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has no state.json: it holds weights but no training state to resume. Fix: "
                              "name a checkpoint written by `calm-train train`, or start a new run from it as a "
                              "warm start")
    state = read_json(path)
    if not isinstance(state, dict) or "progress" not in state:
        raise CheckpointError(f"{path} holds no training progress. Fix: restore the file from a copy, or use "
                              "another checkpoint")
    return state


def _damaged_run(root: pathlib.Path, damaged: list[CheckpointError]) -> DamagedRun:
    problems = "; ".join(str(err).split(" Fix: ")[0] for err in damaged)
    return DamagedRun(
        f"{root} holds checkpoints but none is intact: {problems}. Fix, one of: restore the damaged file from a copy "
        "and relaunch; restart at step 0 with train.resume_from=scratch (old checkpoints and history are moved "
        "aside, not deleted); or resume from a checkpoint you name with train.resume_from=PATH")


@dataclasses.dataclass
class Start:
    checkpoint: pathlib.Path | None        # None: step 0
    resume_from: str | None                # the train.resume_from choice this run descends from (state.json)
    move_aside: list[pathlib.Path]         # moved aside once every check of the launch has passed


def _later(root: pathlib.Path, step: int, keep: pathlib.Path | None) -> list[pathlib.Path]:
    return [path for path in step_dirs(root) if step_of(path) > step and path != keep]


def choose_start(manager, resume_from: str, log) -> Start:
    """Where this launch starts; it changes nothing in RUN_DIR (see Start.move_aside)."""
    root, run_dir = manager.root, manager.root.parent
    intact, damaged = manager.newest_intact()
    latest = root / LATEST
    if intact is None and not damaged and latest.is_file():
        damaged = [CheckpointError(f"{latest} names {latest.read_text().strip()}, which does not exist")]
    descends_from = read_state(intact).get("resume_from") if intact else None
    continued = Start(intact, descends_from, _later(root, step_of(intact), intact) if intact else [])
    if resume_from == "":
        if intact is None and damaged:
            raise _damaged_run(root, damaged)
        return continued
    if resume_from == SCRATCH:
        if intact is not None and descends_from == SCRATCH:
            log(f"train.resume_from=scratch: {intact} descends from that restart (an earlier launch of this command); "
                "resuming from it. To restart again, use a new run_dir")
            return continued
        names = ("checkpoints", "metrics.jsonl", "eval.jsonl", "tensorboard", "tokenizer")
        return Start(None, SCRATCH, [run_dir / name for name in names if (run_dir / name).exists()])
    ckpt = resolve_checkpoint(fetch_checkpoint(resume_from))
    step = verify_checkpoint(ckpt, hashes=True)["step"]
    read_state(ckpt)
    key = resume_from if is_url(resume_from) else str(ckpt.resolve())
    if intact is not None and intact.resolve() != ckpt.resolve() and descends_from == key:
        log(f"train.resume_from={resume_from}: {intact} descends from it (an earlier launch of this command); "
            "resuming from it")
        return continued
    return Start(ckpt, key, _later(root, step, ckpt))


def write_run_files(run_dir: pathlib.Path, config_yaml: str, data_dir, tokenizer_files: list[str]) -> None:
    """config.yaml (every launch, after validation) and tokenizer/ (once, at the first start, never overwritten)."""
    (run_dir / "config.yaml").write_text(config_yaml)
    tokenizer_dir = run_dir / "tokenizer"
    if tokenizer_dir.exists():
        return
    staging = run_dir / ".tokenizer.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name in [*tokenizer_files, "dataset.json"]:
        shutil.copy2(pathlib.Path(data_dir) / name, staging / name)
    os.replace(staging, tokenizer_dir)
