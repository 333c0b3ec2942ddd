"""Template similarity: the maximum over time lags of the normalised cross-correlation (Kilosort4, Phy)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["template_similarity"]


def template_similarity(templates: np.ndarray, max_lag: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise similarity of templates.

    Parameters
    ----------
    templates : ndarray (K, C, nt)
        Templates (any units; each is normalised to unit Frobenius norm).
    max_lag : int
        Largest lag tried, samples.

    Returns
    -------
    sim : ndarray (K, K) float32
        ``max_lag |Σ_{c,t} a[c,t] b[c,t+lag]|`` for unit-norm ``a``, ``b``; only positive correlation counts.
    lag : ndarray (K, K) int64
        The best lag: ``b[t] ≈ a[t - lag]`` (b is a delayed by ``lag`` samples).
    """
    K = len(templates)
    if K == 0:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64)
    U = torch.from_numpy(np.ascontiguousarray(templates, dtype=np.float32))
    U = U / U.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]
    # conv1d computes out[a, b, l] = Σ_{c,t} in[a, c, t + l] · w[b, c, t]
    xc = F.conv1d(F.pad(U, (max_lag, max_lag)), U)  # (K, K, 2*max_lag+1)
    best, arg = xc.max(dim=2)
    sim = best.numpy().astype(np.float32)
    lag = (max_lag - arg).numpy().astype(np.int64)
    return sim, lag
