"""Accuracy against known ground truth (synthetic recordings), without SpikeInterface.

The same definitions as SpikeInterface's ``compare_sorter_to_ground_truth`` with its defaults: spikes match
when within ``delta`` (0.4 ms); the agreement of ground-truth unit ``u`` and sorted unit ``k`` is
``n_match / (n_u + n_k − n_match)``; units are paired by the Hungarian method on agreement (pairs below 0.5
are unmatched); accuracy = agreement of the pair, recall = ``n_match / n_u``, precision = ``n_match / n_k``.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy.optimize import linear_sum_assignment

__all__ = ["compare_to_truth"]


def compare_to_truth(sorting: xr.Dataset, truth: xr.Dataset, *, delta_ms: float = 0.4,
                     min_agreement: float = 0.5) -> xr.Dataset:
    """Per ground-truth unit accuracy, recall and precision of a sorting.

    Parameters
    ----------
    sorting : xarray.Dataset
        ``spike_time``, ``spike_unit`` (and dim ``unit``).
    truth : xarray.Dataset
        ``spike_time``, ``spike_unit`` (and dim ``unit``), attr ``sampling_rate``.
    delta_ms : float
        Matching window.
    min_agreement : float
        Pairs below this agreement count as unmatched.

    Returns
    -------
    xarray.Dataset
        dims ``unit`` (ground truth): ``accuracy``, ``recall``, ``precision``, ``matched_unit`` (−1 if none);
        attrs ``n_well_detected`` (accuracy ≥ 0.8), ``n_false_positive`` (sorted units matched to no ground-truth
        unit with agreement ≥ 0.2).
    """
    fs = float(truth.attrs["sampling_rate"])
    delta = int(round(delta_ms * fs / 1000))
    gt_t = truth["spike_time"].values.astype(np.int64)
    gt_u = truth["spike_unit"].values.astype(np.int64)
    so_t = sorting["spike_time"].values.astype(np.int64)
    so_u = sorting["spike_unit"].values.astype(np.int64)
    U = int(truth.sizes.get("unit", gt_u.max() + 1 if len(gt_u) else 0))
    K = int(sorting.sizes.get("unit", so_u.max() + 1 if len(so_u) else 0))
    n_u = np.bincount(gt_u, minlength=U)
    n_k = np.bincount(so_u, minlength=K)
    match = np.zeros((U, K))
    if len(gt_t) and len(so_t):
        order = np.argsort(gt_t, kind="stable")
        g_t, g_u = gt_t[order], gt_u[order]
        # every (gt spike, sorted spike) pair within delta counts once per sorted unit
        lo = np.searchsorted(g_t, so_t - delta, side="left")
        hi = np.searchsorted(g_t, so_t + delta, side="right")
        for off in range(int((hi - lo).max()) if len(lo) else 0):
            j = lo + off
            ok = j < hi
            np.add.at(match, (g_u[j[ok]], so_u[ok]), 1)
        match = np.minimum(match, np.minimum(n_u[:, None], n_k[None, :]))
    agreement = match / np.maximum(n_u[:, None] + n_k[None, :] - match, 1)
    matched = -np.ones(U, np.int64)
    acc = np.zeros(U)
    rec = np.zeros(U)
    prec = np.zeros(U)
    if U and K:
        rows, cols = linear_sum_assignment(-agreement)
        for r, c in zip(rows, cols):
            if agreement[r, c] >= min_agreement:
                matched[r] = c
                acc[r] = agreement[r, c]
                rec[r] = match[r, c] / max(n_u[r], 1)
                prec[r] = match[r, c] / max(n_k[c], 1)
    fp = int(((agreement.max(0) < 0.2) & (n_k > 0)).sum()) if U else int((n_k > 0).sum())
    return xr.Dataset(
        {"accuracy": ("unit", acc), "recall": ("unit", rec), "precision": ("unit", prec),
         "matched_unit": ("unit", matched)},
        coords={"unit": np.arange(U)},
        attrs={"n_well_detected": int((acc >= 0.8).sum()), "n_false_positive": fp, "n_sorted_units": K},
    )
