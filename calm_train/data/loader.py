"""TokenLoader: batches of one split of a prepared directory (or a weighted mixture of several),
partitioned by data-parallel rank only.

mosaicml-streaming 0.13 reads RANK/WORLD_SIZE/LOCAL_* from the environment and uses them twice: the
*unique* world coordinates the processes of a node (shared memory, barriers, one shard cache), the
*parallel* world decides which samples a process reads.  We build the unique world from the real
launch and replace the parallel world by a one-node world of dp_size ranks in which this process is
dp_rank, so every TP/PP rank of a replica reads the same batches, and a state saved at one dp_size
resumes at another (fixed num_canonical_nodes=1).

A mixture (data/mixing.py) is one `Stream` per dataset with `proportion` = its weight's share, so
streaming itself draws each epoch's samples (repeating or subsampling a dataset, seeded by the shuffle
seed and the epoch); the partition, resume and elastic resume above are unchanged.  Sample ids run over
the datasets concatenated in order; `count_per_dataset` maps a batch's ids to the datasets.

Robustness (notes/data_stack.md section 3): shards are verified against index.json before any
dataset exists (verify=True); shards are copied from the data directory (or downloaded from its URL:
streaming's `remote`, with its retries, timeout and cache limit) into a per-job local cache
(private TMPDIR beside it, stale shared memory of dead jobs removed); a DataLoader timeout turns a
stuck worker into an exception; and every epoch's sample count is asserted, so a worker error never
ends an epoch silently.  All ranks must construct and iterate their TokenLoader together.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import pathlib
import tempfile
import uuid

import numpy as np
import torch
from streaming import Stream, StreamingDataLoader, StreamingDataset
from streaming.base.partition import get_partitions
from streaming.base.world import World

from calm_train.data import jobdir
from calm_train.data.dataset_info import DataError, read_dataset_info
from calm_train.data.mixing import as_sources, count_per_source, proportions, read_mixture
from calm_train.data.verify import verify_dataset
from calm_train.errors import UserError
from calm_train.storage.url import child

CANONICAL_NODES = 1
# streaming's own settings for shards it downloads (data.download_retry, data.download_timeout, data.cache_limit)
DOWNLOAD = {"download_retry": 2, "download_timeout": 60.0, "cache_limit": None}


def _dist():
    return torch.distributed if torch.distributed.is_available() and torch.distributed.is_initialized() else None


def _launch_env() -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE of the real launch (one node if unset)."""
    dist = _dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    local_rank = int(os.environ.get("LOCAL_RANK", rank % local_world))
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(local_world)}


@contextlib.contextmanager
def _streaming_context(env: dict[str, str], tmpdir: pathlib.Path):
    """Environment and tempfile root that StreamingDataset reads while it is constructed."""
    saved_env = {k: os.environ.get(k) for k in env}
    saved_tmp = tempfile.tempdir
    os.environ.update(env)
    tempfile.tempdir = str(tmpdir)
    try:
        yield
    finally:
        tempfile.tempdir = saved_tmp
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _all_ranks_ok(error: str | None) -> None:
    """Raise the first rank's error on every rank (no rank is left waiting in a collective)."""
    dist = _dist()
    errors = [error]
    if dist:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise DataError(first)


def _collate(batch):
    ids, tokens = zip(*batch)
    return {"tokens": torch.from_numpy(np.stack(tokens).astype(np.int64)),
            "sample_ids": torch.tensor(ids, dtype=torch.long)}


class DPStreamingDataset(StreamingDataset):
    """StreamingDataset whose sample partition follows (dp_rank, dp_size), not the launch."""

    def __init__(self, dp_rank: int, dp_size: int, **kwargs):
        super().__init__(**kwargs)
        self._parallel_rank_world = World(num_nodes=1, ranks_per_node=dp_size, workers_per_rank=1, worker=dp_rank)
        self.length = -(-self.epoch_size // dp_size)

    def __getitem__(self, idx):
        return idx, super().__getitem__(idx)["tokens"]


class TokenLoader:
    """`data`: a prepared directory, or a data.train mixture (a list of config.DataSource)."""

    def __init__(self, data, split: str, batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 shuffle: bool = True, num_workers: int = 0, cache_dir=None, verify: bool = True,
                 batch_timeout: float = 600.0, download: dict | None = None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
        self.sources = as_sources(data)
        self.names = [source.name for source in self.sources]
        self.info = read_mixture(self.sources)
        download = {**DOWNLOAD, **(download or {})}
        self.split, self.batch_size = split, batch_size
        self.dp_rank, self.dp_size, self.num_workers = dp_rank, dp_size, num_workers
        env = _launch_env()
        leader = env["LOCAL_RANK"] == "0"
        error = None
        if verify and leader:
            try:
                for source in self.sources:
                    verify_dataset(source.path, [split])
            except UserError as err:
                error = str(err)
        _all_ranks_ok(error)

        self._job = jobdir.open_job(cache_dir, _broadcast_key(), leader)
        if _dist():
            _dist().barrier()
        shares = proportions(self.sources)
        with _streaming_context(env, self._job.tmp):
            streams = [Stream(remote=child(source.path, split), local=str(self._job.local / str(n)),
                              proportion=shares[n] if shares else None, download_retry=download["download_retry"],
                              download_timeout=download["download_timeout"])
                       for n, source in enumerate(self.sources)]
            # a mixture is always shuffled (seeded): unshuffled, an epoch would read one dataset after another
            self.dataset = DPStreamingDataset(
                dp_rank=dp_rank, dp_size=dp_size, streams=streams, batch_size=batch_size,
                shuffle=shuffle or len(streams) > 1, cache_limit=download["cache_limit"],
                shuffle_seed=seed, num_canonical_nodes=CANONICAL_NODES, validate_hash="xxh64", keep_zip=False)

        fork = "fork" if num_workers and "fork" in multiprocessing.get_all_start_methods() else None
        self._loader = StreamingDataLoader(self.dataset, batch_size=batch_size, num_workers=num_workers,
                                           collate_fn=_collate, timeout=batch_timeout if num_workers else 0,
                                           multiprocessing_context=fork)
        self.epoch = 0
        self.samples_seen = 0            # this rank, all epochs, including dropped partial batches
        self._epoch_offset = 0           # global samples of the current epoch before this iteration
        self._yielded = 0                # this rank's samples in the current iteration of the epoch
        self._resume_state: dict | None = None

    @property
    def num_samples(self) -> int:
        """Samples per epoch (a mixture: after each dataset's repeat or subsampling)."""
        return int(self.dataset.epoch_size)

    def count_per_dataset(self, sample_ids) -> np.ndarray:
        """How many of a batch's samples come from each dataset, in the order of `names`."""
        return count_per_source(sample_ids, self.dataset.sample_offset_per_stream)

    @property
    def own_samples(self) -> int:
        """Samples of one epoch that belong to this dp rank alone (streaming deals them out in turn)."""
        return len(range(self.dp_rank, self.dataset.epoch_size, self.dp_size))

    def _expected(self, sample_in_epoch: int) -> int:
        """This rank's sample count for the rest of an epoch, by streaming's own partition."""
        ids = get_partitions(self.dataset.partition_algo, self.dataset.epoch_size, CANONICAL_NODES, 1,
                             self.dp_size, max(1, self.num_workers), self.batch_size, sample_in_epoch, 1)
        return int((ids[0, self.dp_rank] >= 0).sum())

    def one_pass(self):
        """The split once from its start, with the final partial batch; every batch gets `own` [B] (bool):
        False marks streaming's repeats that even out the dp ranks' shares (always at the end of a share).
        Every rank yields the same number of batches of the same sizes.  Needs num_workers=0 (in order)."""
        if self.num_workers:
            raise ValueError("TokenLoader.one_pass reads in order: construct the loader with num_workers=0")
        expected, own = self._expected(0), self.own_samples
        self._yielded = 0
        for batch in self._loader:
            n = len(batch["sample_ids"])
            batch["own"] = torch.arange(self._yielded, self._yielded + n) < own
            self._yielded += n
            yield batch
        if self._yielded != expected:
            raise DataError(self._short_epoch(expected))

    def _short_epoch(self, expected: int) -> str:
        where = ", ".join(child(source.path, self.split) for source in self.sources)
        return (f"{where}: epoch {self.epoch} ended after {self._yielded} of {expected} samples on dp rank "
                f"{self.dp_rank} (a shard failed to load; see the worker error above). "
                "Fix: run `calm-train verify-data DIR` on each and re-prepare the bad shard")

    def __iter__(self):
        while True:
            if self._resume_state is not None:
                self._loader.load_state_dict(self._resume_state)
                self.epoch, self._epoch_offset = self._resume_state["epoch"], self._resume_state["sample_in_epoch"]
                self._resume_state = None
            expected = self._expected(self._epoch_offset)
            self._yielded = 0
            for batch in self._loader:
                n = len(batch["sample_ids"])
                self._yielded += n
                self.samples_seen += n
                if n == self.batch_size:
                    yield batch
            if self._yielded != expected:
                raise DataError(self._short_epoch(expected))
            self.epoch += 1
            self._epoch_offset = 0

    def state_dict(self) -> dict:
        """Where the epoch stands, in global samples (all dp ranks hold the same state)."""
        if self._resume_state is not None:
            return dict(self._resume_state, samples_seen=self.samples_seen, dp_size=self.dp_size)
        return {"epoch": self.epoch, "sample_in_epoch": self._epoch_offset + self._yielded * self.dp_size,
                "num_canonical_nodes": CANONICAL_NODES, "shuffle_seed": self.dataset.shuffle_seed,
                "initial_physical_nodes": 1, "samples_seen": self.samples_seen, "dp_size": self.dp_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume before iterating; the state may come from another dp_size (elastic)."""
        self._resume_state = {k: state[k] for k in ("epoch", "sample_in_epoch", "num_canonical_nodes",
                                                    "shuffle_seed", "initial_physical_nodes")}
        self.epoch = state["epoch"]
        self.samples_seen = state.get("samples_seen", 0)

    def close(self) -> None:
        """Stop streaming's prefetch threads and remove this job's cache directory (collective)."""
        if getattr(self.dataset, "_iterator", None) is not None:
            self.dataset._iterator.exit()
        if getattr(self.dataset, "_executor", None) is not None:
            self.dataset._executor.shutdown(wait=True)
        self._loader = self.dataset = None
        dist = _dist()
        if dist:
            dist.barrier()
        self._job.close()


def cache_options(data) -> dict:
    """TokenLoader's shard cache and streaming download settings from a run's DataConfig."""
    return {"cache_dir": data.cache_dir, "download": {key: getattr(data, key) for key in DOWNLOAD}}


def require_one_batch(data, split: str, global_batch: int, dp_size: int) -> None:
    """Refuse a training split (of one dataset or a mixture: data.train) in which a dp rank's share of an
    epoch (ceil(samples / dp): streaming evens the shares out) is smaller than its batch: training reads
    whole batches only and would wait forever."""
    sources = as_sources(data)
    samples = sum(read_dataset_info(source.path).splits[split]["samples"] for source in sources)
    share, batch = -(-samples // dp_size), global_batch // dp_size
    if share < batch:
        where = ", ".join(child(source.path, split) for source in sources)
        raise DataError(f"{where}: {samples} samples are fewer than one batch: "
                        f"train.global_batch={global_batch} over dp={dp_size} ranks needs {batch} samples per rank, "
                        f"a rank gets {share}. Fix: prepare more data, or lower train.global_batch (and "
                        f"train.micro_batch) to at most {share * dp_size}")


def _broadcast_key() -> str:
    """One random job key for all ranks (names the local cache and private TMPDIR)."""
    dist = _dist()
    key = [uuid.uuid4().hex[:12]]
    if dist:
        dist.broadcast_object_list(key, src=0)
    return key[0]
