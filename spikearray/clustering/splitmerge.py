"""Clustering of one feature matrix: over-cluster with k-means, then merge pairs that are not bimodal.

The idea is isosplit's (Magland & Barnett, 2015): two clusters are one when the distribution of their points
along the line that best separates them has no valley. We test that with Kilosort4's bimodality score on a
smoothed histogram of the class-balanced projection (score = 1 − valley / smaller peak), using the Fisher
direction between the two clusters. Pairs are visited nearest first until no pair merges. Deterministic
(seeded k-means++).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter1d

__all__ = ["split_merge", "split_population", "kmeans", "bimodality_score"]


def kmeans(X: np.ndarray, k: int, seed: int, iters: int = 40) -> np.ndarray:
    """Labels of a seeded k-means++ / Lloyd clustering of rows of ``X`` (n, d)."""
    n = len(X)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    centres = np.empty((k, X.shape[1]), X.dtype)
    centres[0] = X[rng.integers(n)]
    d2 = ((X - centres[0]) ** 2).sum(1)
    for i in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1 / n)
        centres[i] = X[rng.choice(n, p=p)]
        d2 = np.minimum(d2, ((X - centres[i]) ** 2).sum(1))
    xx = (X ** 2).sum(1)
    lab = np.zeros(n, int)
    for _ in range(iters):
        dist = xx[:, None] - 2 * X @ centres.T + (centres ** 2).sum(1)[None, :]
        new = dist.argmin(1)
        if _ and np.array_equal(new, lab):
            break
        lab = new
        for j in range(k):
            m = lab == j
            if m.any():
                centres[j] = X[m].mean(0)
    return lab


def bimodality_score(z: np.ndarray, w: np.ndarray, split: float, n_bins: int | None = None) -> float:
    """1 − valley / min(left peak, right peak) of a weighted, smoothed histogram of ``z``.

    ``split`` is the point between the two groups' means; the valley is searched between the two groups'
    medians, the peaks on either side of the valley. 0 = unimodal, → 1 = a deep valley. The number of bins
    grows with the sample (about 25 points per bin, 12–64 bins) so that counting noise does not carve
    valleys into a unimodal histogram.
    """
    if n_bins is None:
        n_bins = int(np.clip(len(z) / 25, 12, 64))
    lo, hi = np.percentile(z, [0.5, 99.5])
    if hi <= lo:
        return 0.0
    h, edges = np.histogram(np.clip(z, lo, hi), bins=n_bins, range=(lo, hi), weights=w)
    h = gaussian_filter1d(h.astype(float), 1.5)
    centres = 0.5 * (edges[1:] + edges[:-1])
    left = z < split
    if left.all() or (~left).all():
        return 0.0
    a = np.searchsorted(centres, np.median(z[left]))
    b = np.searchsorted(centres, np.median(z[~left]))
    a, b = min(a, b), max(a, b)
    if b - a < 2:
        return 0.0
    iv = a + int(np.argmin(h[a:b + 1]))
    valley = h[iv]
    pl = h[: iv + 1].max()
    pr = h[iv:].max()
    peak = min(pl, pr)
    if peak <= 0:
        return 0.0
    return float(1.0 - valley / peak)


def _pair_score(X: np.ndarray, la: np.ndarray, lb: np.ndarray) -> float:
    A, B = X[la], X[lb]
    ma, mb = A.mean(0), B.mean(0)
    cov = (np.cov(A.T, bias=True) * len(A) + np.cov(B.T, bias=True) * len(B)) / (len(A) + len(B))
    cov = np.atleast_2d(cov) + 1e-3 * np.trace(np.atleast_2d(cov)) / max(1, X.shape[1]) * np.eye(X.shape[1])
    try:
        direction = np.linalg.solve(cov, ma - mb)
    except np.linalg.LinAlgError:
        direction = ma - mb
    nrm = np.linalg.norm(direction)
    if nrm == 0:
        return 0.0
    direction /= nrm
    za, zb = A @ direction, B @ direction
    z = np.concatenate([za, zb])
    # class-balanced weights: each group counts as much as the other, so a small unit next to a big one
    # still shows its own mode
    w = np.concatenate([np.full(len(za), 0.5 / len(za)), np.full(len(zb), 0.5 / len(zb))])
    split = 0.5 * (za.mean() + zb.mean())
    return bimodality_score(z, w, split)


def pca(X: np.ndarray, n: int) -> np.ndarray:
    """Scores of the rows of ``X`` on its top ``n`` principal components."""
    Xc = X - X.mean(0)
    cov = Xc.T @ Xc / max(1, len(X) - 1)
    _, v = np.linalg.eigh(cov)
    return Xc @ v[:, ::-1][:, :n]


def _split(X_full: np.ndarray, idx: np.ndarray, seed: int, n_dims: int, min_size: int, split_above: float,
           depth: int = 0, small: tuple[int, float] | None = None) -> list[np.ndarray]:
    """Recursively split ``idx`` in two (k-means on the subset's own PCs) while the halves are bimodal.

    With ``small = (n, norm)``, a split that the size rule refuses (one half under ``min_size`` rows) still
    takes that half out when it holds at least ``n`` rows whose mean has at least ``norm`` and the halves
    are bimodal: a few spikes of a large waveform, a whole low-rate unit. Neither half is split again; every
    split that the size rule accepts is made exactly as without ``small``.
    """
    least = min_size if small is None else min(min_size, small[0])
    if len(idx) < min_size + least or depth > 6:
        return [idx]
    X = pca(X_full[idx], min(n_dims, X_full.shape[1]))
    lab = kmeans(X, 2, seed)
    a, b = np.flatnonzero(lab == 0), np.flatnonzero(lab == 1)
    if min(len(a), len(b)) < min_size:
        lo, hi = (a, b) if len(a) < len(b) else (b, a)
        if (small is not None and len(lo) >= small[0] and len(hi) >= min_size
                and float(np.linalg.norm(X_full[idx[lo]].mean(0))) >= small[1]
                and _pair_score(X, lo, hi) >= split_above):
            return [idx[hi], idx[lo]]
        return [idx]
    if _pair_score(X, a, b) < split_above:
        return [idx]
    return (_split(X_full, idx[a], seed, n_dims, min_size, split_above, depth + 1, small)
            + _split(X_full, idx[b], seed, n_dims, min_size, split_above, depth + 1, small))


def split_population(X: np.ndarray, *, seed: int = 0, n_dims: int = 10, min_size: int = 20,
                     split_above: float = 0.75, small: tuple[int, float] | None = None) -> list[np.ndarray]:
    """Row indices of the pieces of ``X`` (n, D) after recursive bimodal splitting (one piece: no split).

    Each split is a seeded 2-means on the subset's own top ``n_dims`` principal components, kept when the
    halves' bimodality score is at least ``split_above`` and both have ``min_size`` rows (depth ≤ 6). With
    ``small = (n, norm)``, a half of fewer than ``min_size`` rows is still taken out when it has at least
    ``n`` rows whose mean has a norm of at least ``norm`` (neither half is split further); the splits that
    the size rule accepts are unchanged.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X = np.vstack([rng.normal(0, 1, (200, 8)), rng.normal(0, 1, (15, 8)) + 20])
    >>> [len(p) for p in split_population(X, min_size=30)]
    [215]
    >>> sorted(len(p) for p in split_population(X, min_size=30, small=(12, 15.0)))
    [15, 200]
    """
    return _split(np.asarray(X, np.float64), np.arange(len(X)), seed, n_dims, min_size, split_above, small=small)


def split_merge(X_full: np.ndarray, *, n_dims: int = 10, seed: int = 0, k_init: int | None = None,
                min_size: int = 20, merge_below: float = 0.5, split_above: float = 0.75,
                max_points_test: int = 4000) -> np.ndarray:
    """Cluster rows of ``X_full`` (n, D): k-means over-clustering on the top PCs, merge every non-bimodal
    neighbour pair, then split each cluster recursively along its own PCs while the halves are bimodal.

    Parameters
    ----------
    X_full : ndarray (n, D)
        Features.
    n_dims : int
        Principal components used (globally for the merge phase, per cluster for the split phase).
    seed : int
    k_init : int, optional
        Initial k (default ``clip(n // 150, 1, 24)``).
    min_size : int
        Clusters smaller than this are merged into their nearest neighbour at the end.
    merge_below : float
        Pairs whose bimodality score is below this merge.
    split_above : float
        A cluster splits when its two k-means halves score at least this (stricter than ``merge_below``, so
        the two phases cannot undo each other).
    max_points_test : int
        Each pair test uses at most this many points per cluster (evenly subsampled).

    Returns
    -------
    ndarray of int64 (n,)
        Labels 0..K-1.
    """
    n = len(X_full)
    if n < 2 * min_size:
        return np.zeros(n, np.int64)
    X = pca(X_full, min(n_dims, X_full.shape[1]))
    k = k_init or int(np.clip(n // 150, 1, 24))
    lab = kmeans(X, k, seed)
    tested_apart: set[tuple[int, int]] = set()
    while True:
        ids = np.unique(lab)
        if len(ids) < 2:
            break
        cents = np.stack([X[lab == i].mean(0) for i in ids])
        d = ((cents[:, None] - cents[None]) ** 2).sum(-1)
        iu = np.triu_indices(len(ids), 1)
        order = np.argsort(d[iu], kind="stable")
        merged = False
        for o in order:
            a, b = ids[iu[0][o]], ids[iu[1][o]]
            if (a, b) in tested_apart:
                continue
            ia, ib = np.flatnonzero(lab == a), np.flatnonzero(lab == b)
            ia = ia[:: max(1, len(ia) // max_points_test)]
            ib = ib[:: max(1, len(ib) // max_points_test)]
            score = _pair_score(X, ia, ib) if min(len(ia), len(ib)) >= 5 else 0.0
            if score < merge_below:
                lab[lab == b] = a
                # a's content changed: earlier verdicts involving a or b no longer hold
                tested_apart = {p for p in tested_apart if a not in p and b not in p}
                merged = True
                break
            tested_apart.add((a, b))
        if not merged:
            break
    # absorb tiny clusters into the nearest big one
    ids, counts = np.unique(lab, return_counts=True)
    big = ids[counts >= min_size]
    if len(big) == 0:
        return np.zeros(n, np.int64)
    cents = np.stack([X[lab == i].mean(0) for i in big])
    for i in ids[counts < min_size]:
        m = lab == i
        lab[m] = big[((X[m].mean(0) - cents) ** 2).sum(1).argmin()]
    out = np.zeros(n, np.int64)
    k = 0
    for i in np.unique(lab):
        for part in _split(X_full, np.flatnonzero(lab == i), seed, n_dims, min_size, split_above):
            out[part] = k
            k += 1
    return out
