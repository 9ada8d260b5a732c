"""`calm-train train`: one run of the autoencoder, CALM or AR trainer, in any parallel layout.

Order: validate and check inputs (data, frozen autoencoder) -> process groups -> take RUN_DIR/.lock
(train/lock.py) -> verify shards, choose the checkpoint to resume from (train/rundir.py), compare the
run's identity (train/identity.py), write config.yaml and, at the first start, tokenizer/ -> engine ->
resume -> steps (log, evaluate, save, obey signals) -> final save and evaluation.  Exit 0 when done (a
finished run relaunched: at once, one line, nothing written), 75 after a signal- or wall-clock-triggered
save, 130 after a second SIGINT; the lock is released on every exit path.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import socket
import time

import torch
import torch.distributed as dist

from calm_train.config import Config, data_parallel_size, to_yaml, validate, validate_layout
from calm_train.data.loader import require_one_batch
from calm_train.errors import UserError
from calm_train.train import identity
from calm_train.train.checkpoint import (CheckpointManager, load_rng_state, rng_file, rng_snapshot,
                                        write_rng_state)
from calm_train.train.flops import MFU, measure_peak_flops, spec_peak_flops, train_flops_per_token
from calm_train.train.lock import RunLock
from calm_train.train.logbook import Logbook
from calm_train.train.profiling import StepProfiler, peak_memory_gib
from calm_train.train.signals import StopRequest

EXIT_DONE, EXIT_REQUEUE, EXIT_ABORTED = 0, 75, 130


@dataclasses.dataclass
class Progress:
    """Everything besides the engine's tensors that an exact resume needs."""
    step: int = 0
    tokens: int = 0
    samples: int = 0
    skipped_steps: int = 0
    bad_in_a_row: int = 0
    elapsed_s: float = 0.0
    loader: dict | None = None
    dataset_tokens: dict = dataclasses.field(default_factory=dict)   # data.train dataset name -> tokens


def resolve_data(cfg: Config):
    """Fill vocab size and sequence length from dataset.json (shared by every dataset of a mixture);
    a mismatch names both values."""
    from calm_train.data.mixing import as_sources, read_mixture
    if not cfg.data.train:
        raise UserError("config key 'data.train' is empty. Fix: set data.train=DIR of `calm-train prepare --out DIR`")
    info = read_mixture(cfg.data.train)
    first = as_sources(cfg.data.train)[0].path
    checks = [("model.vocab_size", cfg.model.vocab_size, info.vocab_size),
              ("data.seq_len", cfg.data.seq_len, info.seq_len),
              ("model.patch_size", cfg.model.patch_size if cfg.model.kind != "ar" else None, info.patch_size)]
    for key, ours, theirs in checks:
        if ours is not None and ours != theirs:
            raise UserError(f"config key '{key}' is {ours} but {first}/dataset.json says {theirs}. "
                            f"Fix: drop the key to take {theirs} from the data, or prepare data with {ours}")
    cfg.model.vocab_size = info.vocab_size
    cfg.data.seq_len = info.seq_len
    return info


class Run:
    """One rank's view of a training run."""

    def __init__(self, cfg: Config):
        from calm_train.data.mixing import mixture_tokenizer
        from calm_train.parallel import runtime
        self.cfg = cfg
        self.run_dir = pathlib.Path(cfg.run_dir)
        self.info = resolve_data(cfg)
        validate(cfg)
        from calm_train.train.warm_start import WarmStart
        self.warm_start = WarmStart.open(cfg, self.run_dir)    # model.init_from: checked and read here
        if cfg.model.kind != "autoencoder":     # model.attention=flash where it cannot run: refused before any work
            from calm_train.models.attention import resolve_attention
            b = cfg.model.backbone
            resolve_attention(cfg.model.attention, self.engine_dtype(), b.hidden_size // b.num_heads)
        self.autoencoder_ref = None
        if cfg.model.kind == "calm":
            from calm_train.train.frozen_autoencoder import check_autoencoder
            self.autoencoder_ref = check_autoencoder(cfg)
        runtime.init_distributed(tp=cfg.parallel.tp, pp=cfg.parallel.pp, seed=cfg.train.seed)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        validate_layout(cfg, self.world_size)
        self.dp = data_parallel_size(cfg, self.world_size)
        require_one_batch(cfg.data.train, "train", cfg.train.global_batch, self.dp)
        self.log = Logbook(self.run_dir, cfg, enabled=self.rank == 0, total_steps=cfg.train.steps)
        self.checkpoints = CheckpointManager(self.run_dir, self.rank, dist.barrier, cfg.train.keep_last,
                                             cfg.train.keep_every, log=self.log.event,
                                             agree=lambda ok: not any_rank(not ok), async_save=cfg.train.async_save,
                                             remote=cfg.train.remote_checkpoints)
        self.lock = RunLock(self.run_dir, cfg.train.lock_timeout, log=self.log.event)
        self.data_dir = mixture_tokenizer(cfg.data.train)[1]    # the (first) dataset: its tokenizer is the run's
        self.resume_from: str | None = None      # the train.resume_from choice this run descends from
        self.finished = ""                       # why there is nothing to do: the run is done
        self.save_stall: dict = {}               # how long the last save blocked training: the next metrics row
        self.profiler = None

    # ------------------------------------------------------------------------------------------
    def preflight(self) -> pathlib.Path | None:
        """Rank 0 takes the lock, verifies the shards and the inputs' identity and chooses the checkpoint to resume
        from; every rank settles the warm start; rank 0 moves aside what the start leaves behind and writes
        config.yaml and (at the first start) tokenizer/.  An error stops every rank; nothing is written before
        every check has passed."""
        start, finished, error = None, "", ""
        if self.rank == 0:
            try:
                start = self._choose_start()
                finished = self._finished(start)
            except UserError as err:
                error = str(err)
        error, latest, self.resume_from, self.finished = broadcast_object(
            (error, *((start.checkpoint, start.resume_from) if start else (None, None)), finished))
        if error:
            raise UserError(error)
        if self.finished:
            return latest
        if self.warm_start is not None:
            self.warm_start.settle(self.cfg, latest, self.log.event)
        if self.rank == 0:
            if self.warm_start is not None and latest is None and self.autoencoder_ref is not None:
                self.warm_start.note_autoencoder(self.autoencoder_ref, self.log.event)
            from calm_train.train.rundir import move_aside, write_run_files
            for path in start.move_aside:
                move_aside(path, self.log.event)
            write_run_files(self.run_dir, to_yaml(self.cfg), self.data_dir, self.info.tokenizer_files)
        dist.barrier()
        return latest

    def _choose_start(self):
        """Rank 0, under the lock; writes nothing into RUN_DIR (train/rundir.py)."""
        from calm_train.data.mixing import as_sources
        from calm_train.data.verify import verify_dataset
        from calm_train.train.rundir import choose_start, read_state
        cfg, tokenizer = self.cfg, self.info.tokenizer_sha256
        self.lock.acquire()
        for source in as_sources(cfg.data.train):      # a URL's shards: listed here, hashed as streamed
            verify_dataset(source.path, remote_hashes=False)
        if cfg.data.val:
            verify_dataset(cfg.data.val, remote_hashes=False)
        identity.check_val_tokenizer(cfg, self.data_dir, tokenizer)
        if self.autoencoder_ref is not None:
            identity.check_autoencoder_tokenizer(self.autoencoder_ref, self.data_dir, tokenizer, self.log.event)
        self.checkpoints.finish_pruning()
        self.checkpoints.sync_remote(cfg.train.resume_from or "")    # train.remote_checkpoints: a new node resumes
        # the resume point is hash-verified once (rank 0) and shared, so a damaged file is never loaded
        start = choose_start(self.checkpoints, cfg.train.resume_from or "", self.log.event)
        self.checkpoints.check_remote_branch(start.checkpoint, cfg.train.resume_from or "")
        if start.checkpoint is not None:
            saved = identity.saved_identity(start.checkpoint, read_state(start.checkpoint), self.log.event)
            identity.check_resume(saved, self.run_identity(), start.checkpoint, cfg, self.data_dir)
        if self.run_dir / "tokenizer" not in start.move_aside:
            identity.check_run_tokenizer(self.run_dir, self.data_dir, tokenizer)
        return start

    def _finished(self, start) -> str:
        """Rank 0: why this launch has nothing to do (its checkpoint reached train.steps and was evaluated), or ""."""
        from calm_train.train.evaluate import validation_source
        from calm_train.train.logbook import read_jsonl
        from calm_train.train.rundir import read_state
        if start.checkpoint is None or start.move_aside:
            return ""
        step = read_state(start.checkpoint)["progress"]["step"]
        evaluated = validation_source(self.cfg) is None or any(
            row.get("step") == step for row in read_jsonl(self.log.eval_path, self.log.event))
        if step < self.cfg.train.steps or not evaluated:
            return ""
        return (f"{self.run_dir} is finished: {start.checkpoint} is at step {step} of train.steps="
                f"{self.cfg.train.steps} and evaluated; nothing to do (raise train.steps to train on)")

    def run_identity(self) -> dict:
        return identity.run_identity(self.cfg, self.info.tokenizer_sha256, self.autoencoder_ref)

    def build(self) -> None:
        from calm_train.data.loader import TokenLoader, cache_options
        from calm_train.parallel.engine import TrainEngine, build_world
        from calm_train.train.evaluate import validation_source
        from calm_train.train.tasks import task_for
        self.world = build_world(self.cfg)
        autoencoder = None
        if self.autoencoder_ref is not None:
            from calm_train.train.frozen_autoencoder import load_frozen_autoencoder
            autoencoder = load_frozen_autoencoder(self.autoencoder_ref, self.world.device)
        self.autoencoder = autoencoder
        task = task_for(self.cfg, autoencoder)
        if self.warm_start is not None:
            task.init_state = self.warm_start.take_state()
        self.engine = TrainEngine(self.cfg, task, self.world)
        task.init_state = None
        self.log.event(f"engine: {self.engine.describe()}")
        self.per_rank_batch = self.cfg.train.global_batch // self.dp
        self.loader = TokenLoader(self.cfg.data.train, "train", batch_size=self.per_rank_batch,
                                  dp_rank=self.world.dp_rank, dp_size=self.dp, seed=self.cfg.train.seed,
                                  num_workers=self.cfg.data.num_workers, verify=False, **cache_options(self.cfg.data))
        self.validation = validation_source(self.cfg)
        if self.validation is None:
            self.log.event(f"no validation split in {self.cfg.data.train} and data.val is unset: evaluations are "
                           "skipped (prepare with --val-fraction > 0, or set data.val=DIR)")
        device, dtype = self.world.device, self.engine_dtype()
        measured = float(broadcast_object(measure_peak_flops(device, dtype)))
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        self.mfu = MFU(train_flops_per_token(self.cfg.model, self.cfg.data.seq_len), self.world_size, measured,
                       spec_peak_flops(name, dtype), self.cfg.train.peak_flops, name)
        self.profiler = StepProfiler(self.cfg.train.profile, self.run_dir, self.rank == 0, device, self.log.event)

    def engine_dtype(self) -> torch.dtype:
        dtype = self.cfg.train.dtype
        if dtype == "auto":
            dtype = "bf16" if torch.cuda.is_available() else "fp32"
        return torch.bfloat16 if dtype == "bf16" else torch.float32

    # ------------------------------------------------------------------------------------------
    def resume(self, latest: pathlib.Path | None) -> Progress:
        nodes = [None] * self.world_size
        dist.all_gather_object(nodes, os.environ.get("SLURMD_NODENAME") or socket.gethostname())
        self.log.event("ranks on nodes: " + ", ".join(f"{rank}:{node}" for rank, node in enumerate(nodes)))
        if latest is None:
            self.log.event(f"starting {self.cfg.model.kind} run in {self.run_dir} on {self.world_size} process(es): "
                           f"tp={self.cfg.parallel.tp} pp={self.cfg.parallel.pp} dp={self.dp} "
                           f"zero={self.cfg.parallel.zero_stage}")
            return Progress()
        from calm_train.convert.native import read_json
        from calm_train.train.reshard import layout_of, restore
        saved = read_json(latest / "state.json")
        progress = Progress(**saved["progress"])
        layout = layout_of(self.cfg, self.world_size)
        rng, error = None, None
        path = rng_file(latest, self.rank)
        if saved.get("layout") == layout and path.is_file():
            try:
                rng = load_rng_state(path)
            except UserError as err:
                error = err
        if any_rank(error is not None):                 # every rank stops, not only the one that cannot read
            raise error or UserError(f"another rank could not read its RNG states in {latest}/rng (see its error)")
        message = restore(self.engine, latest, saved, layout, self.cfg, progress, rng)
        if progress.loader is not None:
            self.loader.load_state_dict(progress.loader)
        self.log.event(message)
        return progress

    def save(self, progress: Progress) -> None:
        self.lock.check()                           # a launch that lost RUN_DIR/.lock writes nothing more
        started, cpu = time.monotonic(), time.thread_time()
        progress.loader = self.loader.state_dict()
        from calm_train.train.reshard import engine_counters, layout_of, optimizer_export, write_optimizer
        state = {"progress": dataclasses.asdict(progress), "engine": engine_counters(self.engine),
                 "identity": self.run_identity(), "resume_from": self.resume_from,
                 "layout": layout_of(self.cfg, self.world_size)}
        export = self.engine.state_for_export()
        moments, moments_metadata = optimizer_export(self.engine)
        rng = rng_snapshot()                        # export, moments, rng: host copies that training cannot change

        def write(directory: pathlib.Path) -> None:
            write_rng_state(rng_file(directory, self.rank), rng)
            if self.rank == 0:
                from safetensors.torch import save_file
                save_file({k: v.contiguous() for k, v in export.items()}, str(directory / "model.safetensors"))
                write_optimizer(directory, moments, moments_metadata)
                (directory / "state.json").write_text(json.dumps(state, indent=1))
                (directory / "config.yaml").write_text(to_yaml(self.cfg))
                shutil.copytree(self.run_dir / "tokenizer", directory / "tokenizer")
                if self.autoencoder is not None:
                    from calm_train.convert.native import save_autoencoder_file
                    save_autoencoder_file(self.autoencoder, directory)

        self.checkpoints.save(progress.step, write, {"kind": self.cfg.model.kind})
        self.save_stall = {"save_stall_s": round(time.monotonic() - started, 4),
                           "save_stall_cpu_s": round(time.thread_time() - cpu, 4)}

    # ------------------------------------------------------------------------------------------
    def evaluate(self, step: int) -> None:
        from calm_train.train.evaluate import evaluate_run
        if self.validation is None:
            return
        self.lock.check()
        row = evaluate_run(self, step)
        self.log.evaluation({"step": step, **row})

    def count_datasets(self, progress: Progress, sample_ids: torch.Tensor) -> None:
        """Tokens read from each dataset of data.train (a mixture: summed over data-parallel ranks)."""
        names, seq_len = self.loader.names, self.cfg.data.seq_len
        if len(names) == 1:     # the run's tokens less those read from datasets dropped since (allow_mixture_change)
            dropped = sum(count for name, count in progress.dataset_tokens.items() if name != names[0])
            progress.dataset_tokens[names[0]] = progress.tokens - dropped
            return
        counts = torch.tensor(self.loader.count_per_dataset(sample_ids.numpy()), dtype=torch.float64)
        dist.all_reduce(counts)                         # every TP/PP rank of a replica read the same batch
        replicas = self.world_size // self.dp
        for name, count in zip(names, counts.tolist()):
            progress.dataset_tokens[name] = progress.dataset_tokens.get(name, 0) + int(count) // replicas * seq_len

    def metrics_row(self, progress: Progress, result, step_s: float, tokens_per_step: int) -> dict:
        """One metrics.jsonl row; after a save, the row of the next logged step says how long it blocked training."""
        stall, self.save_stall = self.save_stall, {}
        tokens_per_s = tokens_per_step / max(step_s, 1e-9)
        mfu, note = self.mfu.row(tokens_per_s)
        if note:
            self.log.event(note)
        peak_mem = torch.tensor([peak_memory_gib(self.world.device)])
        dist.all_reduce(peak_mem, op=dist.ReduceOp.MAX)
        return {
            "step": progress.step, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
            "tokens": progress.tokens, "tokens_per_s": tokens_per_s, "samples": progress.samples,
            "elapsed_s": round(progress.elapsed_s, 3), "skipped_steps": progress.skipped_steps,
            "step_s": round(step_s, 4), "flops": self.mfu.flops_per_token * progress.tokens, **mfu,
            "peak_mem_gib": round(float(peak_mem), 4), **stall,
            **{f"tokens/{name}": count for name, count in progress.dataset_tokens.items()},
        }

    def train(self) -> int:
        cfg, t = self.cfg, self.cfg.train
        launched = time.monotonic()      # train.max_wallclock limits this launch (a job), not the whole run
        stop = StopRequest().install()   # a signal from here on is obeyed after the next step
        try:
            latest = self.preflight()
            if self.finished:
                self.log.event(self.finished)
                return EXIT_DONE
            self.build()
            progress = self.resume(latest)
            self.log.resume_at(progress.step)
            resumed_at = progress.step
            tokens_per_step = t.global_batch * cfg.data.seq_len
            started = time.monotonic() - progress.elapsed_s
            batches = iter(self.loader)
            while progress.step < t.steps:
                step_start = time.monotonic()
                batch = next(batches)
                self.profiler.begin(progress.step + 1)
                result = self.engine.train_step(batch["tokens"], batch["sample_ids"], progress.step + 1)
                self.profiler.end(progress.step + 1)
                self.lock.check()
                progress.step += 1
                progress.samples += t.global_batch
                progress.tokens += tokens_per_step
                self.count_datasets(progress, batch["sample_ids"])
                if result.skipped:
                    progress.skipped_steps += 1
                    progress.bad_in_a_row += 1
                    self.log.event(f"step {progress.step}: non-finite loss or gradient, update skipped "
                                   f"({progress.bad_in_a_row} in a row)")
                    if progress.bad_in_a_row >= t.max_bad_steps:
                        good = self.checkpoints.latest()
                        kept = (f"the last good checkpoint {good} is intact" if good else
                                f"no checkpoint was saved yet in {self.checkpoints.root}")
                        raise UserError(f"{progress.bad_in_a_row} non-finite steps in a row (train.max_bad_steps="
                                        f"{t.max_bad_steps}); {kept}. Fix: lower train.lr, check the data, then "
                                        "relaunch to resume")
                else:
                    progress.bad_in_a_row = 0
                step_s = time.monotonic() - step_start
                progress.elapsed_s = time.monotonic() - started
                self.log.advance(progress.step, step_s, tokens_per_step, result.loss)
                if progress.step % t.log_every == 0 or progress.step == t.steps:
                    self.log.step(self.metrics_row(progress, result, step_s, tokens_per_step))
                if t.eval_every and progress.step % t.eval_every == 0 and progress.step < t.steps:
                    self.evaluate(progress.step)
                out_of_time = bool(t.max_wallclock) and time.monotonic() - launched >= t.max_wallclock
                # every rank stops on any rank's request, and names the same reason: the signal one got
                # (the highest number where several did), else the wall clock
                code = max_rank(stop.signum or int(out_of_time))
                asked = code > 0
                reason = signal.Signals(code).name if code > 1 else "train.max_wallclock"
                if asked:
                    self.log.event(f"{reason}: saving a checkpoint at step {progress.step}, then exit {EXIT_REQUEUE} "
                                   "(a second SIGINT aborts without it)")
                if asked or (t.save_every and progress.step % t.save_every == 0 and progress.step < t.steps):
                    self.save(progress)
                if asked:
                    self.checkpoints.close()
                    self.log.event(f"{reason}: checkpoint saved at step {progress.step}; exit {EXIT_REQUEUE} "
                                   "(relaunch the same command to resume)")
                    return EXIT_REQUEUE
            if progress.step > resumed_at:   # `latest` itself may be pruned by now (train.keep_last)
                self.save(progress)
            self.evaluate(progress.step)
            self.checkpoints.close()          # the background save and the uploads, and where they are
            self.log.event(f"done: {progress.step} steps, {progress.tokens} tokens in {progress.elapsed_s:.1f}s")
            return EXIT_DONE
        except KeyboardInterrupt:
            self.log.event(f"second SIGINT: aborted without saving a checkpoint; exit {EXIT_ABORTED} (a relaunch "
                           "resumes from the newest checkpoint)")
            return EXIT_ABORTED
        finally:
            stop.uninstall()
            self.checkpoints.close(raise_errors=False)    # nothing is written into RUN_DIR once the lock is gone
            self.lock.release()
            if self.profiler is not None:
                self.profiler.close()
            self.log.close()


def broadcast_object(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool) -> bool:
    return max_rank(int(flag)) > 0


def max_rank(value: int) -> int:
    tensor = torch.tensor([float(value)])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def run_training(cfg: Config) -> int:
    from calm_train.parallel import runtime
    try:
        return Run(cfg).train()
    finally:
        runtime.destroy()
