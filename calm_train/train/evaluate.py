"""Evaluation on held-out sequences: loss, BrierLM (CALM, AR) and reconstruction accuracy (autoencoder).

Both language models are scored on the same positions: every chunk boundary i = K, 2K, ... where
the next four tokens exist.  Brier-n looks at the n-gram y[i : i+n] that follows.
- CALM: S >= 2 latents sampled by the energy head (`samples`, default 2), decoded by the frozen
  autoencoder (argmax), give S n-gram samples; the U-statistic 2 mean_i 1{x_i=y} - mean_{i<j}
  1{x_i=x_j} (models/brier.py), which for S = 2 is the two-sample estimate 1{x1=y} + 1{x2=y} - 1{x1=x2}.
- AR: the Rao-Blackwellised form (models/brier.py): two (n-1)-token prefixes sampled from the model
  (ancestral sampling), and the model's exact next-token distribution after each prefix.
Every Brier-n and BrierLM comes with a standard error over positions (BrierLM's by the delta
method, models/brier.py), and `brier_near_zero` lists the n whose Brier-n is below two standard
errors.  CALM runs add the diagnostics of train/calm_diagnostics.py (energy loss between its
marginal and oracle references, fraction of decoded samples that are real chunks).
Sums and counts are accumulated per rank and all-reduced, so any data-parallel split gives the
same numbers.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from calm_train.models.brier import (brier_ngram_sampled_with_probs, brier_u_statistic, brierlm,
                                     brierlm_standard_error, near_zero)
from calm_train.models.rng import EVAL_STEP, SampleRNG, sample_seeds
from calm_train.train.moments import mean_and_covariance, moment_sums

MAX_N = 4


def boundaries(seq_len: int, patch_size: int) -> torch.Tensor:
    """Chunk boundaries i (> 0) with y[i : i+4] inside the sequence."""
    return torch.arange(patch_size, seq_len - MAX_N + 1, patch_size)


def next_ngrams(tokens_BL: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, P, 4]: the 4 tokens y[i : i+4] after each boundary i."""
    return torch.stack([tokens_BL[:, i:i + MAX_N] for i in boundaries(tokens_BL.shape[1], patch_size).tolist()], 1)


@torch.no_grad()
def calm_brier_estimates(chunks_BPSK: torch.Tensor, y_BP4: torch.Tensor) -> torch.Tensor:
    """Per-position U-statistic Brier-n estimates [B, P, 4] from S decoded chunks per position."""
    return torch.stack([brier_u_statistic(_ngram(chunks_BPSK, n), y_BP4[..., :n]) for n in range(1, MAX_N + 1)], -1)


@torch.no_grad()
def calm_sums(model, autoencoder, tokens_BL: torch.Tensor, rng: SampleRNG, samples: int = 2,
              pool=None) -> dict[str, torch.Tensor]:
    """Brier-n moment sums from `samples` head samples per position, then the CALM diagnostics.

    The Brier draws come first, so `samples` = 2 gives the two-sample estimates of earlier versions.
    """
    from calm_train.train.calm_diagnostics import decode_samples, diagnostic_sums
    k = autoencoder.patch_size
    hidden_BTH = model.hidden(tokens_BL)
    latents_BTSD = model.generative_head.sample(hidden_BTH, samples, rng)   # entry t predicts chunk t+1
    chunk = boundaries(tokens_BL.shape[1], k) // k                         # index of the chunk that starts at i
    decoded_BPSK = decode_samples(autoencoder, latents_BTSD[:, chunk - 1])   # predicted from chunk - 1
    sums = moment_sums("brier", calm_brier_estimates(decoded_BPSK, next_ngrams(tokens_BL, k)))
    sums.update(diagnostic_sums(model, autoencoder, hidden_BTH, tokens_BL, decoded_BPSK, rng, pool))
    return sums


def _ngram(x: torch.Tensor, n: int) -> torch.Tensor:
    """The first n tokens of sampled chunks; for n > K the chunk is padded with -1, which no token equals."""
    if n <= x.shape[-1]:
        return x[..., :n]
    return torch.cat([x, torch.full((*x.shape[:-1], n - x.shape[-1]), -1, dtype=x.dtype, device=x.device)], -1)


@torch.no_grad()
def ar_brier_estimates(model, tokens_BL: torch.Tensor, patch_size: int, rng: SampleRNG) -> torch.Tensor:
    """Rao-Blackwellised Brier-n estimates [B, P, 4] at the chunk boundaries.

    Row (b, position, sample) holds the true prefix y[:i] followed by sampled tokens a_1..a_j at i..i+j-1:
    causal attention makes the logits at i+j-1 the distribution after y[:i] a_1..a_j.
    """
    b, seq_len = tokens_BL.shape
    idx = boundaries(seq_len, patch_size)
    p = len(idx)
    uniforms_BP2J = rng.uniform(p, 2, MAX_N - 1)
    rows_RL = tokens_BL[:, None, None, :].expand(b, p, 2, seq_len).clone()
    at = idx[None, :, None].expand(b, p, 2)
    probs = []                                                            # after 0, 1, 2, 3 sampled tokens
    for j in range(MAX_N):
        logits = model.logits(rows_RL.flatten(0, 2)).unflatten(0, (b, p, 2))   # [B, P, 2, L, V]
        position = (at + j - 1)[..., None, None].expand(b, p, 2, 1, logits.shape[-1])
        probs_j = torch.softmax(logits.float().gather(3, position).squeeze(3), -1)  # [B, P, 2, V]
        probs.append(probs_j)
        if j < MAX_N - 1:
            cdf = probs_j.cumsum(-1)
            u = uniforms_BP2J[..., j:j + 1] * cdf[..., -1:]
            sampled = torch.searchsorted(cdf, u).clamp_max(cdf.shape[-1] - 1).squeeze(-1)
            rows_RL.scatter_(3, (at + j)[..., None], sampled[..., None])
    y = next_ngrams(tokens_BL, patch_size)                                   # [B, P, 4]
    prefixes = torch.stack([rows_RL[:, k, :, i:i + MAX_N] for k, i in enumerate(idx.tolist())], 1)  # [B,P,2,4]
    estimates = []
    for n in range(1, MAX_N + 1):
        a, c = prefixes[:, :, 0, :n - 1], prefixes[:, :, 1, :n - 1]
        estimates.append(brier_ngram_sampled_with_probs(a, probs[n - 1][:, :, 0], c, probs[n - 1][:, :, 1],
                                                        y[..., :n]))
    return torch.stack(estimates, -1)


def eval_rng(sample_ids: torch.Tensor, seed: int, device) -> SampleRNG:
    return SampleRNG(sample_seeds(seed, EVAL_STEP, sample_ids), device)


@torch.no_grad()
def batch_metric_sums(kind: str, model, autoencoder, tokens_BL: torch.Tensor, sample_ids: torch.Tensor,
                      seed: int, patch_size: int, samples: int = 2, pool=None) -> dict[str, torch.Tensor]:
    """Per-batch sums (and the counts they are averaged over) for one model kind.

    samples: CALM's head samples per position for the Brier estimates; pool: the training split's
    ChunkPool for CALM's marginal energy and real-chunk fraction (None: those fields are absent).
    """
    rng = eval_rng(sample_ids, seed, tokens_BL.device)
    if kind == "autoencoder":
        acc = model.reconstruction_accuracy(tokens_BL)
        return {"recon_acc": acc.float() * tokens_BL.numel(), "recon_count": torch.tensor(float(tokens_BL.numel()))}
    if kind == "calm":
        return calm_sums(model, autoencoder, tokens_BL, rng, samples, pool)
    return moment_sums("brier", ar_brier_estimates(model, tokens_BL, patch_size, rng))


def finish(totals: dict[str, torch.Tensor], kind: str, samples: int = 2) -> dict:
    """Turn accumulated sums into the eval.jsonl fields (see brier_fields and calm_diagnostics.finish_diagnostics)."""
    from calm_train.train.calm_diagnostics import finish_diagnostics
    row = {}
    if "recon_count" in totals:
        row["recon_acc"] = float(totals["recon_acc"] / totals["recon_count"])
    if "brier_count" in totals:
        row.update(brier_fields(totals, samples if kind == "calm" else 2))
        row["brier_estimator"] = "u-statistic" if kind == "calm" else "rao-blackwell"
    row.update(finish_diagnostics(totals))
    if "loss_count" in totals:
        row["loss"] = float(totals["loss"] / totals["loss_count"])
    return row


def brier_fields(totals: dict, samples: int) -> dict:
    """brier1..4 and brierlm (as before), their standard errors, the estimator, and the n near 0."""
    mean, covariance = mean_and_covariance(totals, "brier")
    brier, se = mean.tolist(), covariance.diagonal().clamp_min(0).sqrt().tolist()
    row = {f"brier{n}": brier[n - 1] for n in range(1, MAX_N + 1)}
    row["brierlm"] = brierlm(brier)
    row.update({f"brier{n}_se": se[n - 1] for n in range(1, MAX_N + 1)})
    row["brierlm_se"] = brierlm_standard_error(brier, covariance.tolist())
    row["brier_positions"] = round(float(totals["brier_count"]))
    row["brier_samples"] = samples
    row["brier_near_zero"] = near_zero(brier, se)
    return row


def accumulate(totals: dict, sums: dict) -> None:
    for key, value in sums.items():
        value = value.detach().double().cpu()
        totals[key] = totals[key] + value if key in totals else value


def all_reduce_totals(totals: dict, device) -> dict:
    """Sum over ranks (TP/PP partners contribute identical copies: the ratios are unchanged)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return totals
    keys = sorted(totals)
    flat = torch.cat([totals[k].reshape(-1) for k in keys]).to(device)
    dist.all_reduce(flat)
    out, offset = {}, 0
    for k in keys:
        n = totals[k].numel()
        out[k] = flat[offset:offset + n].reshape(totals[k].shape).cpu()
        offset += n
    return out


def plan_micro_batches(own_B: torch.Tensor, micro: int) -> tuple[list[torch.Tensor], list[int]]:
    """Rows of a batch in micro-batches of exactly `micro` rows, and weights such that the weighted sum of
    the micro-batches' mean losses is the loss summed over the own rows, each counted once: whole
    micro-batches of own rows (weight micro), then each own row left over repeated `micro` times (weight 1:
    copies of one sample, with its sample id and so its noise, have its loss as their mean)."""
    rows = own_B.nonzero().flatten()
    whole = len(rows) // micro * micro
    groups = list(rows[:whole].view(-1, micro)) + [row.repeat(micro) for row in rows[whole:]]
    return groups, [micro] * (whole // micro) + [1] * (len(rows) - whole)


def _max_over_ranks(value: int) -> int:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return int(box)


def evaluate_run(run, step: int) -> dict[str, float]:
    """One evaluation inside a training run: one pass over the validation split, at most train.eval_batches
    batches of micro_batch x pp sequences over all DP ranks; every sample it reaches is counted once."""
    from calm_train.data.loader import TokenLoader, cache_options
    cfg, world = run.cfg, run.world
    data_dir, split = run.validation                  # Run.evaluate skips a run without validation data
    micro, pp = cfg.train.micro_batch, cfg.parallel.pp
    loader = TokenLoader(data_dir, split, batch_size=micro * pp, dp_rank=world.dp_rank,
                         dp_size=run.dp, seed=cfg.train.seed, shuffle=False, verify=False, **cache_options(cfg.data))
    totals = {key: torch.zeros((), dtype=torch.float64) for key in ("samples", "loss", "loss_count")}
    model = run.engine.model
    was_training = model.training
    model.eval()
    batches = max(1, cfg.train.eval_batches // run.dp)          # train.eval_batches counts over all DP ranks
    pool = reference_pool(cfg) if cfg.model.kind == "calm" and pp == 1 else None
    for _, batch in zip(range(batches), loader.one_pass()):
        groups, weights = plan_micro_batches(batch["own"], micro)
        # every rank runs as many micro-batches (ZeRO-3 gathers weights in each forward), a multiple of pp
        # (a pipeline needs >= pp): weight-0 padding repeats row 0
        padding = -(-_max_over_ranks(len(groups)) // pp) * pp - len(groups)
        groups, weights = groups + [torch.zeros(micro, dtype=torch.long)] * padding, weights + [0] * padding
        totals["samples"] += float(batch["own"].sum())
        for first in range(0, len(groups), pp):
            rows = torch.cat(groups[first:first + pp])
            tokens, ids = batch["tokens"][rows].to(world.device), batch["sample_ids"][rows]
            losses = run.engine.eval_losses(tokens, ids)
            chunk = weights[first:first + pp]
            if losses is not None:
                accumulate(totals, {"loss": torch.tensor(sum(loss * w for loss, w in zip(losses, chunk))),
                                    "loss_count": torch.tensor(float(sum(chunk)))})
            if pp == 1:
                sums = batch_metric_sums(cfg.model.kind, model, run.autoencoder, tokens, ids, cfg.train.seed,
                                         cfg.model.patch_size, cfg.train.eval_samples, pool)
                accumulate(totals, {k: v * (chunk[0] / micro) for k, v in sums.items()})
    loader.close()
    model.train(was_training)
    # TP and PP partners add identical copies (samples on every rank, metrics on the ranks that compute
    # them): dividing by tp x pp leaves the means unchanged and makes counts, and so standard errors, right
    copies = world.tp_size * world.pp_size
    totals = {key: value / copies for key, value in all_reduce_totals(totals, world.device).items()}
    return {**finish(totals, cfg.model.kind, cfg.train.eval_samples), "samples": round(float(totals["samples"]))}


def reference_pool(cfg, data_dir: str | None = None):
    """The ChunkPool of the training split (`data_dir`, default data.train) for CALM's diagnostics, or None
    when that directory is gone, at a URL (its split is streamed, not read whole) or data.train is a mixture
    (then the marginal energy and the real-chunk fractions are left out)."""
    import pathlib
    from calm_train.data.chunk_pool import training_pool
    from calm_train.data.mixing import as_sources
    from calm_train.storage.url import is_url
    sources = as_sources(data_dir or cfg.data.train)
    if len(sources) != 1 or is_url(sources[0].path) or not (pathlib.Path(sources[0].path) / "train" /
                                                            "index.json").is_file():
        return None                                   # gone, remote, or a mixture: no single reference split
    return training_pool(str(pathlib.Path(sources[0].path).resolve()), cfg.model.patch_size, cfg.model.vocab_size)


def validation_source(cfg) -> tuple | None:
    """data.val (its val split if any, else its train split), or the val split of data.train (a mixture:
    the same weighted mixture of its datasets' val splits); None when data.val is unset and data.train has
    no val split (prepared with --val-fraction 0)."""
    from calm_train.data.dataset_info import DataError, read_dataset_info
    from calm_train.data.mixing import as_sources
    if cfg.data.val:
        splits = read_dataset_info(cfg.data.val).splits
        return cfg.data.val, "val" if "val" in splits else "train"
    sources = as_sources(cfg.data.train)
    without = [s.path for s in sources if "val" not in read_dataset_info(s.path).splits]
    if len(without) == len(sources):
        return None
    if without:
        raise DataError(f"{without[0]} has no val split, other datasets of data.train do: the mixture cannot be "
                        "evaluated on its own val splits. Fix: set data.val=DIR (one prepared directory), or "
                        "prepare every dataset with --val-fraction > 0")
    return cfg.data.train, "val"
