"""Per-position estimates -> sums that add over batches and ranks -> means with their covariance.

An evaluation averages per-position estimates (Brier-n, energies) over positions.  Per batch it keeps
three sums: of the estimates [X], of their outer products [X, X] and their count; summed over batches
and all-reduced over data-parallel ranks they give the mean and the covariance of the mean (sample
covariance / count, positions treated as independent draws).
"""
from __future__ import annotations

import torch


def moment_sums(name: str, estimates_X: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over positions of per-position estimates [..., X], of their outer products, and the count."""
    flat = estimates_X.reshape(-1, estimates_X.shape[-1]).double()
    return {name: flat.sum(0), f"{name}_sq": flat.T @ flat, f"{name}_count": torch.tensor(float(len(flat)))}


def mean_and_covariance(totals: dict, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean over positions and the covariance matrix of that mean."""
    count = float(totals[f"{name}_count"])
    mean = totals[name] / count
    covariance = (totals[f"{name}_sq"] - count * torch.outer(mean, mean)) / max(count - 1, 1)
    return mean, covariance / count
