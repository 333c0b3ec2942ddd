"""Template similarity: the maximum over time lags of the normalised cross-correlation (Kilosort4, Phy).

The one implementation, used by clustering and merges (templates ``(K, C, nt)``) and by the Phy export and
reader (``(K, nt, C)``, Phy's ``similar_templates.npy``): ``sample_axis`` says which layout.
"""

from __future__ import annotations

import numpy as np

__all__ = ["template_similarity"]


def template_similarity(templates: np.ndarray, max_lag: int | None = None, *, sample_axis: int = 2,
                        symmetric: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise similarity of templates and the lag at which it is reached.

    Cross-correlations at every lag at once, by FFT: per frequency, one complex matrix product sums the
    channel products of all pairs; zero padding to ≥ 2·nt − 1 keeps lags from wrapping around.

    Parameters
    ----------
    templates : ndarray (K, C, nt), or (K, nt, C) with ``sample_axis=1``
        Templates (any units; each is normalised to unit Frobenius norm; all-zero templates score 0).
    max_lag : int, optional
        Largest lag tried, samples (clipped to nt − 1); default ``nt // 6`` (±10 samples at nt = 61, Phy's).
    sample_axis : {2, 1}
        The time axis of ``templates``: 2 for ``(K, C, nt)`` (the stages' layout), 1 for ``(K, nt, C)`` (the
        Sorting Dataset's and Phy's).
    symmetric : bool
        Make ``sim`` exactly symmetric (the larger of the two directions; they differ only by rounding), as
        Phy's ``similar_templates.npy`` is.

    Returns
    -------
    sim : ndarray (K, K) float32
        ``max_lag Σ_{c,t} a[c,t+lag] b[c,t]`` for unit-norm ``a``, ``b`` (positive correlation only); symmetric.
    lag : ndarray (K, K) int64
        The best lag: ``b[t] ≈ a[t - lag]`` (b is a delayed by ``lag`` samples).

    Examples
    --------
    >>> a = np.zeros((1, 2, 21)); a[0, 0, 8:11] = [-1.0, -2.0, -1.0]
    >>> b = np.roll(a, 3, axis=2)
    >>> sim, lag = template_similarity(np.concatenate([a, b]), 5)
    >>> round(float(sim[0, 1]), 3), int(lag[0, 1])
    (1.0, 3)
    """
    if sample_axis not in (1, 2):
        raise ValueError(f"sample_axis={sample_axis!r}; expected 2 for (K, C, nt) or 1 for (K, nt, C) templates.")
    t = np.asarray(templates, dtype=np.float64)
    if sample_axis == 1 and t.ndim == 3:
        t = t.transpose(0, 2, 1)
    K = len(t)
    if K == 0:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64)
    nt = t.shape[2]
    if max_lag is None:
        max_lag = nt // 6
    norm = np.sqrt((t ** 2).sum(axis=(1, 2)))
    t = t / np.where(norm > 0, norm, 1.0)[:, None, None]
    L = max(0, min(nt - 1, int(max_lag)))
    nfft = 1 << int(np.ceil(np.log2(max(2 * nt - 1, 2))))
    F = np.ascontiguousarray(np.fft.rfft(t, n=nfft, axis=2).astype(np.complex64).transpose(2, 0, 1))  # (nf, K, C)
    Fh = np.ascontiguousarray(F.conj().transpose(0, 2, 1))  # (nf, C, K)
    lags = np.r_[0:L + 1, -L:0] if L > 0 else np.array([0])
    sim = np.empty((K, K), np.float32)
    lag = np.empty((K, K), np.int64)
    step = max(1, int(2 ** 26 // max(1, F.shape[0] * K * 8)))  # rows per block: ~64 MB of complex products
    for i0 in range(0, K, step):
        cc = np.fft.irfft(np.matmul(F[:, i0:i0 + step], Fh), n=nfft, axis=0)[lags % nfft]  # (n_lags, rows, K)
        best = cc.argmax(axis=0)
        sim[i0:i0 + step] = np.take_along_axis(cc, best[None], 0)[0]
        lag[i0:i0 + step] = -lags[best]
    sim[norm == 0, :] = 0.0
    sim[:, norm == 0] = 0.0
    if symmetric:
        sim = np.maximum(sim, sim.T)
    return sim, lag
