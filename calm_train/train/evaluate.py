"""Evaluation on held-out sequences: loss, BrierLM (CALM, AR) and reconstruction accuracy (autoencoder).

Both language models are scored on the same positions: every chunk boundary i = K, 2K, ... where
the next four tokens exist.  Brier-n looks at the n-gram y[i : i+n] that follows.
- CALM: two latents sampled by the energy head, decoded by the frozen autoencoder (argmax), give
  two n-gram samples; the two-sample estimate 1{x1=y} + 1{x2=y} - 1{x1=x2}.
- AR: the Rao-Blackwellised form (models/brier.py): two (n-1)-token prefixes sampled from the model
  (ancestral sampling), and the model's exact next-token distribution after each prefix.
Sums and counts are accumulated per rank and all-reduced, so any data-parallel split gives the
same numbers.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from calm_train.models.brier import brier_ngram_sampled_with_probs, brier_two_sample, brierlm
from calm_train.models.rng import EVAL_STEP, SampleRNG, sample_seeds

MAX_N = 4


def boundaries(seq_len: int, patch_size: int) -> torch.Tensor:
    """Chunk boundaries i (> 0) with y[i : i+4] inside the sequence."""
    return torch.arange(patch_size, seq_len - MAX_N + 1, patch_size)


@torch.no_grad()
def calm_brier_sums(model, autoencoder, tokens_BL: torch.Tensor, rng: SampleRNG) -> torch.Tensor:
    """Sum over positions of the two-sample Brier-n estimates, n = 1..4; returns [4]."""
    k = autoencoder.patch_size
    latents_BT2D = model.predict_next_latents(tokens_BL, 2, rng)         # chunk t+1 predicted at chunk t
    chunks_BT2K = autoencoder.decode(latents_BT2D.flatten(1, 2)).unflatten(1, latents_BT2D.shape[1:3])
    idx = boundaries(tokens_BL.shape[1], k)
    chunk = idx // k                                                      # index of the chunk that starts at i
    x1, x2 = chunks_BT2K[:, chunk - 1, 0], chunks_BT2K[:, chunk - 1, 1]   # [B, P, K] predicted from chunk-1
    y = torch.stack([tokens_BL[:, i:i + MAX_N] for i in idx.tolist()], 1)  # [B, P, 4]
    return torch.stack([brier_two_sample(_ngram(x1, y, n), _ngram(x2, y, n), y[..., :n]).sum()
                        for n in range(1, MAX_N + 1)])


def _ngram(x: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    """The first n tokens of a sampled chunk; beyond K tokens the chunk cannot match (n > K)."""
    return x[..., :n] if n <= x.shape[-1] else torch.full_like(y[..., :n], -1)


@torch.no_grad()
def ar_brier_sums(model, tokens_BL: torch.Tensor, patch_size: int, rng: SampleRNG) -> torch.Tensor:
    """Rao-Blackwellised Brier-n sums, n = 1..4, over the chunk boundaries; returns [4].

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
    y = torch.stack([tokens_BL[:, i:i + MAX_N] for i in idx.tolist()], 1)    # [B, P, 4]
    prefixes = torch.stack([rows_RL[:, k, :, i:i + MAX_N] for k, i in enumerate(idx.tolist())], 1)  # [B,P,2,4]
    sums = []
    for n in range(1, MAX_N + 1):
        a, c = prefixes[:, :, 0, :n - 1], prefixes[:, :, 1, :n - 1]
        sums.append(brier_ngram_sampled_with_probs(a, probs[n - 1][:, :, 0], c, probs[n - 1][:, :, 1],
                                                   y[..., :n]).sum())
    return torch.stack(sums)


def eval_rng(sample_ids: torch.Tensor, seed: int, device) -> SampleRNG:
    return SampleRNG(sample_seeds(seed, EVAL_STEP, sample_ids), device)


@torch.no_grad()
def batch_metric_sums(kind: str, model, autoencoder, tokens_BL: torch.Tensor, sample_ids: torch.Tensor,
                      seed: int, patch_size: int) -> dict[str, torch.Tensor]:
    """Per-batch sums (and the count they are averaged over) for one model kind."""
    rng = eval_rng(sample_ids, seed, tokens_BL.device)
    if kind == "autoencoder":
        acc = model.reconstruction_accuracy(tokens_BL)
        return {"recon_acc": acc.float() * tokens_BL.numel(), "recon_count": torch.tensor(float(tokens_BL.numel()))}
    positions = float(tokens_BL.shape[0] * len(boundaries(tokens_BL.shape[1], patch_size)))
    sums = (calm_brier_sums(model, autoencoder, tokens_BL, rng) if kind == "calm"
            else ar_brier_sums(model, tokens_BL, patch_size, rng))
    return {"brier": sums, "brier_count": torch.tensor(positions)}


def finish(totals: dict[str, torch.Tensor]) -> dict[str, float]:
    """Turn accumulated sums into the eval.jsonl fields."""
    row = {}
    if "recon_count" in totals:
        row["recon_acc"] = float(totals["recon_acc"] / totals["recon_count"])
    if "brier_count" in totals:
        brier = (totals["brier"] / totals["brier_count"]).tolist()
        row.update({f"brier{n}": brier[n - 1] for n in range(1, MAX_N + 1)})
        row["brierlm"] = brierlm(brier)
    if "loss_count" in totals:
        row["loss"] = float(totals["loss"] / totals["loss_count"])
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


def evaluate_run(run, step: int) -> dict[str, float]:
    """One evaluation inside a training run: train.eval_batches validation batches in all, split over DP ranks."""
    from calm_train.data.loader import TokenLoader
    cfg = run.cfg
    data_dir, split = validation_source(cfg)
    per_batch = cfg.train.micro_batch * cfg.parallel.pp      # a pipeline needs >= pp microbatches per batch
    loader = TokenLoader(data_dir, split, batch_size=per_batch, dp_rank=run.world.dp_rank,
                         dp_size=run.dp, seed=cfg.train.seed, shuffle=False, verify=False)
    totals: dict = {}
    model = run.engine.model
    was_training = model.training
    model.eval()
    batches = max(1, cfg.train.eval_batches // run.dp)          # train.eval_batches counts over all DP ranks
    for _, batch in zip(range(batches), loader):
        tokens = batch["tokens"].to(run.world.device)
        loss = run.engine.eval_loss(tokens, batch["sample_ids"])
        accumulate(totals, {"loss": torch.tensor(loss * tokens.shape[0]), "loss_count": torch.tensor(float(tokens.shape[0]))})
        if cfg.parallel.pp == 1:
            accumulate(totals, batch_metric_sums(cfg.model.kind, model, run.autoencoder, tokens,
                                                 batch["sample_ids"], cfg.train.seed, cfg.model.patch_size))
    model.train(was_training)
    return finish(all_reduce_totals(totals, run.world.device))


def validation_source(cfg) -> tuple:
    """data.val (its val split if any, else its train split), or the val split of data.train (a mixture:
    the same weighted mixture of its datasets' val splits)."""
    from calm_train.data.dataset_info import read_dataset_info
    if cfg.data.val:
        splits = read_dataset_info(cfg.data.val).splits
        return cfg.data.val, "val" if "val" in splits else "train"
    return cfg.data.train, "val"
