"""Compiled CPU kernels (numba, GIL released) for the two per-sample recursions torch has no fast CPU op for.

* :func:`sosfiltfilt_block` — forward-backward second-order-section IIR filter along time, vectorised across
  channels (the ``(time, channel)`` layout keeps channels contiguous, so every time step is one SIMD sweep).
  States are float64, input int16/float32 (scaled by a per-channel gain on the fly), output float32.
* :func:`median_subtract_block` — exact per-sample median across channels (Kilosort4's ``torch.median``: the
  lower middle value for an even count) subtracted from every channel. A branchless bracket around
  ``mean ± 0.15·std`` usually holds the median and a few dozen values; an exact selection runs on that small
  set, and on the whole row when the bracket misses (rare, e.g. a huge artefact on many channels).

On CUDA the torch kernels in :mod:`._kernels` do the same work; tests compare the two.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["sosfiltfilt_block", "median_subtract_block"]


@numba.njit(cache=True, nogil=True)
def _sos_pass(src, gain, sos, out, reverse):
    """One causal pass of the cascade over ``src * gain`` (reversed in time if ``reverse``) into ``out``.

    The first sample's value is subtracted before filtering: for a high-pass (zero DC gain) that equals starting
    from the steady state of a constant input, so the start-up transient is only the signal's own deviation.
    """
    n, c = src.shape
    ns = sos.shape[0]
    z0 = np.zeros((ns, c))
    z1 = np.zeros((ns, c))
    v = np.empty(c)
    ref = np.empty(c)
    first = n - 1 if reverse else 0
    for ch in range(c):
        ref[ch] = src[first, ch] * gain[ch]
    for i in range(n):
        t = n - 1 - i if reverse else i
        for ch in range(c):
            v[ch] = src[t, ch] * gain[ch] - ref[ch]
        for s in range(ns):
            b0 = sos[s, 0]
            b1 = sos[s, 1]
            b2 = sos[s, 2]
            a1 = sos[s, 4]
            a2 = sos[s, 5]
            za = z0[s]
            zb = z1[s]
            for ch in range(c):
                x = v[ch]
                y = b0 * x + za[ch]
                za[ch] = b1 * x - a1 * y + zb[ch]
                zb[ch] = b2 * x - a2 * y
                v[ch] = y
        for ch in range(c):
            out[t, ch] = v[ch]


@numba.njit(cache=True, nogil=True)
def sosfiltfilt_block(x, gain, sos, out):
    """Zero-phase (forward then backward) SOS filter of ``x * gain`` along axis 0 into float32 ``out``.

    Parameters
    ----------
    x : ndarray (n, c), int16 or float32
    gain : ndarray (c,), float32 — per-channel scale applied on the fly (µV per count)
    sos : ndarray (n_sections, 6), float64 — scipy's second-order sections with ``a0 == 1``
    out : ndarray (n, c), float32 — written in place (may not alias ``x`` unless ``x`` is float32 and gain is 1)
    """
    _sos_pass(x, gain, sos, out, False)
    ones = np.ones(gain.shape[0], dtype=np.float32)
    _sos_pass(out, ones, sos, out, True)
    return out


@numba.njit(cache=True, nogil=True)
def _select(buf, n, k):
    """The k-th smallest (0-based) of ``buf[:n]`` (partially reorders ``buf``); Hoare partition, median of 3."""
    lo = 0
    hi = n - 1
    while hi > lo:
        mid = (lo + hi) // 2
        a = buf[lo]
        b = buf[mid]
        c = buf[hi]
        if a > b:
            a, b = b, a
        if b > c:
            b = c
        if a > b:
            b = a
        piv = b
        i = lo
        j = hi
        while i <= j:
            while buf[i] < piv:
                i += 1
            while buf[j] > piv:
                j -= 1
            if i <= j:
                tmp = buf[i]
                buf[i] = buf[j]
                buf[j] = tmp
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return buf[k]
    return buf[k]


@numba.njit(cache=True, nogil=True, fastmath=True)
def _row_moments(row):
    """Sum and sum of squares of one row (float32; only used to bracket the median, so rounding is harmless)."""
    s = np.float32(0.0)
    s2 = np.float32(0.0)
    for ch in range(row.shape[0]):
        v = row[ch]
        s += v
        s2 += v * v
    return s, s2


@numba.njit(cache=True, nogil=True, fastmath=True)
def _subtract(row, out, value):
    for ch in range(row.shape[0]):
        out[ch] = row[ch] - value


@numba.njit(cache=True, nogil=True)
def median_subtract_block(x, out, med):
    """``out[t] = x[t] - lower_median(x[t])`` for every row; ``med`` (n,) float32 receives the medians.

    ``x`` and ``out`` are ``(n, c)`` float32 and may be the same array. The mean and SD that place the bracket are
    computed with reordered (vectorised) float32 sums; the median itself is always an exact selection.
    """
    n, c = x.shape
    k = (c - 1) // 2
    buf = np.empty(c, dtype=np.float32)
    for t in range(n):
        row = x[t]
        s, s2 = _row_moments(row)
        mu = s / c
        var = s2 / c - mu * mu
        w = np.float32(0.15) * np.sqrt(var if var > 0.0 else np.float32(0.0))
        lo = mu - w
        hi = mu + w
        below = 0
        m = 0
        for ch in range(c):
            v = row[ch]
            below += v < lo
            buf[m] = v
            m += (v >= lo) & (v <= hi)
        kk = k - below
        if kk >= 0 and kk < m:
            value = _select(buf, m, kk)
        else:
            for ch in range(c):
                buf[ch] = row[ch]
            value = _select(buf, c, k)
        med[t] = value
        _subtract(row, out[t], value)
    return out
