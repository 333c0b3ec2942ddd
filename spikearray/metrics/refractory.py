r"""Refractory-period metrics from correlograms, exactly as Kilosort4 defines them (§3 of kilosort4.md).

Correlogram: 1 ms bins, lags −500…+500 ms (1001 bins); each pair (a in train 1, b in train 2) with
``|t_b − t_a| ≤ 0.5 s`` adds 1 to bin ``round((t_b − t_a)/1 ms) + 500``. ``T`` = span of all spike times of
the two trains, ``E = tbin·n1·n2/T`` the expected count per bin of independent Poisson trains.

* far flanks ``F`` = bins 1…249 ∪ 750…999, shoulders ``S1`` = 450…489, ``S2`` = 510…549;
* ``R00 = ΣK[F] / (|F|·E)``, ``R01 = max(ΣK[S1]/(|S1|·E), ΣK[S2]/(|S2|·E))``,
  ``Q00 = max(mean K[S1], mean K[S2], mean K[F])``;
* with the centre bin zeroed, for ``i = 1…10`` (window ±i ms): ``R_i = ΣK[500−i…500+i] / (2i·E)``,
  ``n = ΣK/2``, ``λ = Q00·i``, ``Q_i = ½(1 + erf((n − λ)/√(2λ + 1e−10)))``;
* **contamination** ``R12 = min_i R_i / max(R00, R01)`` and ``Q12 = min_i Q_i``.

A unit is refractory ("good") when ``R12 < acg_threshold`` and ``Q12 < 0.2``; two units are
cross-refractory (mergeable) when their cross-correlogram gives ``R12 < ccg_threshold`` and ``Q12 < 0.05``.
"""

from __future__ import annotations

import numpy as np
from scipy.special import erf

__all__ = ["correlogram", "ccg_metrics", "is_refractory", "is_cross_refractory"]

TBIN = 1e-3
NBINS = 500


def correlogram(t1: np.ndarray, t2: np.ndarray, *, tbin: float = TBIN, nbins: int = NBINS) -> np.ndarray:
    """Cross-correlogram counts ``(2·nbins + 1,)`` of two spike trains (seconds); ``t1 is t2`` gives the ACG.

    Vectorised by a sorted two-pointer window: for each spike of ``t1`` the spikes of ``t2`` within
    ``nbins·tbin`` are found with ``searchsorted`` and their lags histogrammed.
    """
    t1 = np.sort(np.asarray(t1, float))
    t2 = np.sort(np.asarray(t2, float))
    out = np.zeros(2 * nbins + 1, np.int64)
    if len(t1) == 0 or len(t2) == 0:
        return out
    max_lag = nbins * tbin
    lo = np.searchsorted(t2, t1 - max_lag - 0.5 * tbin, side="left")
    hi = np.searchsorted(t2, t1 + max_lag + 0.5 * tbin, side="right")
    counts = hi - lo
    total = int(counts.sum())
    if total == 0:
        return out
    # expand (i, j) pairs in bounded slices to keep memory flat for busy units
    step = max(1, int(2e7 // max(1, counts.max())))
    for s in range(0, len(t1), step):
        c = counts[s:s + step]
        if c.sum() == 0:
            continue
        i_rep = np.repeat(np.arange(s, s + len(c)), c)
        offs = np.arange(len(i_rep)) - np.repeat(np.cumsum(c) - c, c)
        j = lo[s:s + step].repeat(c) + offs
        b = np.rint((t2[j] - t1[i_rep]) / tbin).astype(np.int64) + nbins
        ok = (b >= 0) & (b <= 2 * nbins)
        out += np.bincount(b[ok], minlength=2 * nbins + 1)
    return out


def ccg_metrics(t1: np.ndarray, t2: np.ndarray, *, acg: bool = False) -> tuple[float, float, float, float]:
    """Kilosort4's ``R12``, ``Q12``, ``R00``, ``Q00`` for two trains (or one with ``acg=True``), times in s."""
    t1 = np.asarray(t1, float)
    t2 = t1 if acg else np.asarray(t2, float)
    n1, n2 = len(t1), len(t2)
    if n1 == 0 or n2 == 0:
        return 0.0, 1.0, 0.0, 0.0
    K = correlogram(t1, t2).astype(float)
    allt = np.concatenate([t1, t2])
    T = float(allt.max() - allt.min())
    if T <= 0:
        return 0.0, 1.0, 0.0, 0.0
    E = TBIN * n1 * n2 / T
    F = np.r_[1:250, 750:1000]
    S1, S2 = np.arange(450, 490), np.arange(510, 550)
    R00 = K[F].sum() / (len(F) * E)
    R01 = max(K[S1].sum() / (len(S1) * E), K[S2].sum() / (len(S2) * E))
    Q00 = max(K[S1].mean(), K[S2].mean(), K[F].mean())
    K[NBINS] = 0
    Rs, Qs = [], []
    for i in range(1, 11):
        win = K[NBINS - i:NBINS + i + 1].sum()
        Rs.append(win / (2 * i * E))
        n = win / 2
        lam = Q00 * i
        Qs.append(0.5 * (1 + erf((n - lam) / np.sqrt(2 * lam + 1e-10))))
    denom = max(R00, R01)
    R12 = float(min(Rs) / denom) if denom > 0 else 0.0
    return R12, float(min(Qs)), float(R00), float(Q00)


def is_refractory(times_s: np.ndarray, acg_threshold: float = 0.2) -> tuple[bool, float]:
    """``(is_ref, R12)`` of one unit (Kilosort4: ≤ 10 spikes or zero span → ``(False, 0.0)``)."""
    t = np.asarray(times_s, float)
    if len(t) <= 10 or np.ptp(t) == 0:
        return False, 0.0
    R12, Q12, _, _ = ccg_metrics(t, t, acg=True)
    return bool(R12 < acg_threshold and Q12 < 0.2), R12


def is_cross_refractory(t1_s: np.ndarray, t2_s: np.ndarray, ccg_threshold: float = 0.25) -> bool:
    """Whether two trains look like one neuron split in two (few coincidences at short lags)."""
    if len(t1_s) == 0 or len(t2_s) == 0:
        return False
    R12, Q12, _, _ = ccg_metrics(t1_s, t2_s)
    return bool(R12 < ccg_threshold and Q12 < 0.05)
