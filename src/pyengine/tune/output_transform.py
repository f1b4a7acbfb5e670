"""Robust standardisation of observed objective values before the GP sees them.

A plain standardisation lets one diverged training run (loss 1e30, or inf) set the standard
deviation: every other value then sits within a hair of the mean and the GP learns a flat
surface. Here values are oriented so that lower is better, and only the bad (upper) tail is
compressed: the good region, where the optimiser refines, stays linear in the original units.

    1. non-finite values: NaN and +inf count as the worst finite value, -inf as the best;
    2. with a robust spread s (interquartile range / 1.349), values above Tukey's upper fence
       q75 + 1.5 IQR become t + s/2 * (1 - exp(-(y - t) / s)), where t is the largest value
       below the fence: still ordered, but at most half a spread above every ordinary value,
       so a diverged run reads as "bad", not as a spike the GP must bend to fit;
    3. standardise to zero mean and unit variance.

The map is monotone, so the ranking (and the incumbent) is unchanged.
"""

from __future__ import annotations

import math

import torch

_MAX_EXCESS = 0.5  # robust spreads above the largest ordinary value that outliers may reach


def robust_standardize(values: torch.Tensor) -> torch.Tensor:
    """Transform observed values (lower is better) into standardised GP targets.

    Args:
        values: (n,) observed values; may contain NaN or +-inf.

    Returns:
        (n,) float64 targets with mean 0 and standard deviation 1 (all zeros when every value is equal).
    """
    y = values.to(torch.float64).clone()
    finite = torch.isfinite(y)
    if not bool(finite.any()):
        return torch.zeros_like(y)
    lo, hi = float(y[finite].min()), float(y[finite].max())
    y = torch.where(torch.isnan(y) | (y == math.inf), torch.full_like(y, hi), y)
    y = torch.where(y == -math.inf, torch.full_like(y, lo), y)
    q25, q75 = (float(q) for q in torch.quantile(y, torch.tensor([0.25, 0.75], dtype=torch.float64)))
    spread = (q75 - q25) / 1.349
    if not spread > 0:
        spread = float(y.std()) if len(y) > 1 else 0.0
    if spread > 0:
        fence = q75 + 1.5 * (q75 - q25)
        top = float(y[y <= fence].max())
        excess = ((y - top) / spread).clamp_min(0.0)
        y = torch.where(y > fence, top + _MAX_EXCESS * spread * (1.0 - torch.exp(-excess)), y)
    sd = float(y.std()) if len(y) > 1 else 0.0
    return (y - y.mean()) / sd if sd > 0 else torch.zeros_like(y)
