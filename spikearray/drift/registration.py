"""Global registration of per-batch depth × amplitude fingerprints into a displacement per batch and block.

Method (decentralised, written for spikearray; Kilosort4's `datashift` sets the parameters and the block layout):

1. Fingerprints: for every batch of ``batch_size`` samples, a 2-D histogram of spike depth (bins of
   ``binning_depth`` µm, each spike split linearly between its two nearest bins so positions are not quantised)
   × log amplitude (20 bins from the detection threshold to 100), entries ``log2(1 + count)``, each amplitude
   column centred over depth.
2. Pairwise offsets: for every pair of batches ``(i, j)`` within a horizon and every depth block, the normalised
   cross-correlation over integer shifts of ``±max_shift`` bins; the array (pair, shift, block) is smoothed
   with Gaussian sigmas ``drift_smoothing`` = (shift, batch, block) like Kilosort4's score array, and the peak
   (with a parabolic sub-bin fit) gives the offset ``D_ij ≈ p_i − p_j`` and its weight (the peak correlation).
3. Global solve, all blocks at once: ``p = argmin Σ_k Σ w_ijk (p_ik − p_jk − D_ijk)² + λ Σ (p_{i+1,k} − p_ik)²
   + μ Σ (p_{i,k−1} − 2 p_ik + p_{i,k+1})²`` (sparse normal equations), re-weighted a few times with a Cauchy
   loss so inconsistent pairs lose their weight. The small ``λ`` only bridges batches without spikes; ``μ``
   (``DEPTH_SMOOTHNESS``) keeps sparse blocks from wandering while leaving linear depth gradients free.
4. Iterative refinement: spikes are moved back by the current estimate (interpolated in time between batch
   centres and in depth between block centres) and steps 1–3 are repeated on the residual with a small shift
   range. Near zero the parabolic sub-bin fit is unbiased, so a few rounds give sub-bin accuracy. The first
   rounds are rigid (one block spanning the probe, ``±15`` bins); with ``nblocks > 1`` the last rounds use
   ``2·nblocks − 1`` half-overlapping blocks (Kilosort4's layout) with ``±5`` bins.

Sign: ``p`` is the displacement of the tissue (units) relative to the probe along ``y``, positive when units
move towards larger ``y``; a spike seen at depth ``d`` in batch ``i`` comes from rest depth ``d − p_i``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.ndimage
import scipy.sparse
import scipy.sparse.linalg
import torch

__all__ = ["BlockLayout", "block_layout", "depth_weights", "displacement_at_spikes", "register"]

N_AMP_BINS = 20
AMP_MAX = 100.0
HORIZON_BATCHES = 300  # pairs farther apart than this many batches (10 min at 2 s) are not compared
# Weight of the second-difference prior across neighbouring blocks, relative to a batch's median data weight.
# Measured on GT-B (nblocks=5): 0 → 2.14 µm, 1 → 1.48 µm, 10 → 0.71 µm RMS; on the synthetic non-rigid set
# 0.89 µm at 3 and 0.86 µm at 10.
DEPTH_SMOOTHNESS = 10.0
# Normal equations up to this many unknowns (batches × blocks) are solved as a dense Cholesky factorisation.
# Within the horizon every batch is paired with every other, so the matrix is nearly full and a sparse LU
# gains nothing: on the 384-channel, 600 s benchmark set (300 batches × 9 blocks = 2,700 unknowns) SuperLU
# took 34 s of the estimate's 48 s over its 36 solves; LAPACK's Cholesky takes well under a second each.
# 8,000 unknowns hold 512 MB as float64; beyond that (hours-long recordings) the sparse solver is kept.
DENSE_SOLVE_MAX = 8000


@dataclass(frozen=True)
class BlockLayout:
    """Depth bins and blocks of one shank.

    Attributes
    ----------
    y0 : float
        Lower edge of bin 0, µm.
    bin_um : float
        Bin height (``binning_depth``), µm.
    n_bins : int
    starts : ndarray of int, (n_blocks,)
        First bin of each block.
    length : int
        Bins per block.
    centres : ndarray of float, (n_blocks,)
        Block centres, µm.
    """

    y0: float
    bin_um: float
    n_bins: int
    starts: np.ndarray
    length: int
    centres: np.ndarray


def block_layout(y_min: float, y_max: float, bin_um: float, nblocks: int) -> BlockLayout:
    """Kilosort4's block layout: ``2·nblocks − 1`` half-overlapping blocks (1 for ``nblocks ≤ 1``)."""
    y0 = float(y_min) - bin_um
    n_bins = int(np.ceil((float(y_max) - float(y_min)) / bin_um)) + 3
    nb = max(1, int(nblocks))
    length = max(1, n_bins // nb)
    n_blk = 2 * nb - 1
    starts = np.round(np.linspace(0, n_bins - length, n_blk)).astype(np.int64)
    centres = y0 + (starts + length / 2.0) * bin_um
    return BlockLayout(y0, float(bin_um), n_bins, starts, length, centres)


def depth_weights(depth: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Weights ``(n, n_blocks)`` that interpolate block values linearly in depth (and extrapolate linearly
    beyond the outer centres, as Kilosort4 does); a single block gives weight 1 everywhere."""
    depth = np.asarray(depth, dtype=np.float64)
    centres = np.asarray(centres, dtype=np.float64)
    nb = len(centres)
    w = np.zeros((len(depth), nb))
    if nb == 1:
        w[:, 0] = 1.0
        return w
    k = np.clip(np.searchsorted(centres, depth) - 1, 0, nb - 2)
    f = (depth - centres[k]) / (centres[k + 1] - centres[k])
    rows = np.arange(len(depth))
    w[rows, k] = 1.0 - f
    w[rows, k + 1] = f
    return w


def time_weights(t: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation in time between batch centres (constant beyond the first and last):
    returns ``(k, k + 1, f)`` so a value is ``(1 − f)·v[k] + f·v[k+1]``."""
    t = np.asarray(t, dtype=np.float64)
    nt = len(centres)
    if nt == 1:
        z = np.zeros(len(t), dtype=np.int64)
        return z, z, np.zeros(len(t))
    k = np.clip(np.searchsorted(centres, t) - 1, 0, nt - 2)
    f = np.clip((t - centres[k]) / (centres[k + 1] - centres[k]), 0.0, 1.0)
    return k, k + 1, f


def displacement_at_spikes(p: np.ndarray, t: np.ndarray, depth: np.ndarray, t_centres: np.ndarray,
                           d_centres: np.ndarray) -> np.ndarray:
    """Displacement (same unit as ``p``, shape (T, n_blocks)) at spike times ``t`` and depths ``depth``."""
    k0, k1, f = time_weights(t, t_centres)
    pt = (1.0 - f)[:, None] * p[k0] + f[:, None] * p[k1]
    return (pt * depth_weights(depth, d_centres)).sum(1)


def _fingerprints(batch: np.ndarray, depth: np.ndarray, amp: np.ndarray, n_batches: int, lay: BlockLayout,
                  threshold: float) -> np.ndarray:
    """(T, n_bins, N_AMP_BINS) float32 fingerprints, log2(1 + count) with linear splatting in depth."""
    pos = (depth - lay.y0) / lay.bin_um - 0.5
    i0 = np.floor(pos).astype(np.int64)
    f = pos - i0
    lt = np.log10(max(threshold, 1e-3))
    a = (np.log10(np.clip(amp, 1e-3, AMP_MAX - 1)) - lt) / max(np.log10(AMP_MAX) - lt, 1e-6)
    col = np.clip((a * N_AMP_BINS + 1e-5).astype(np.int64), 0, N_AMP_BINS - 1)
    counts = np.zeros((n_batches, lay.n_bins, N_AMP_BINS))
    for idx, wt in ((i0, 1.0 - f), (i0 + 1, f)):
        ok = (idx >= 0) & (idx < lay.n_bins)
        np.add.at(counts, (batch[ok], idx[ok], col[ok]), wt[ok])
    fp = np.log2(1.0 + counts)
    fp -= fp.mean(axis=1, keepdims=True)
    return fp.astype(np.float32)


def _pair_scores(fp: np.ndarray, lay: BlockLayout, max_shift: int, horizon: int,
                 device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Normalised cross-correlations ``(n_blocks, T, 2H+1, 2S+1)`` for pairs ``j = i + lag − H`` and the
    validity mask ``(T, 2H+1)``. Entry ``[k, i, l, s]`` compares ``fp_i`` shifted by ``s`` bins with ``fp_j``."""
    T = fp.shape[0]
    S = int(max_shift)
    H = int(min(horizon, max(T - 1, 0)))
    h = torch.as_tensor(fp, device=device)
    hp = torch.nn.functional.pad(h, (0, 0, S, S))  # zero-pad depth (centred data: 0 = mean)
    n_blk = len(lay.starts)
    out = np.zeros((n_blk, T, 2 * H + 1, 2 * S + 1), dtype=np.float32)
    rows = max(1, min(T, 4_000_000 // max(1, (2 * H + 1) * (2 * S + 1))))
    for k, a in enumerate(lay.starts):
        ref = hp[:, S + a:S + a + lay.length].reshape(T, -1)
        nr = ref.norm(dim=1)
        for i0 in range(0, T, rows):
            i1 = min(T, i0 + rows)
            j0, j1 = max(0, i0 - H), min(T, i1 + H)
            ii = np.arange(i0, i1)[:, None]
            jj = np.arange(j0, j1)[None, :]
            lag = jj - ii + H
            ok = (lag >= 0) & (lag <= 2 * H)
            for s in range(-S, S + 1):
                mov = hp[i0:i1, S + a + s:S + a + s + lay.length].reshape(i1 - i0, -1)
                c = (mov @ ref[j0:j1].T) / (nr[i0:i1, None] * nr[None, j0:j1] + 1e-6)
                c = c.cpu().numpy()
                out[k, np.broadcast_to(ii, ok.shape)[ok], lag[ok], s + S] = c[ok]
    i = np.arange(T)[:, None]
    j = i + np.arange(2 * H + 1)[None, :] - H
    valid = (j >= 0) & (j < T) & (j != i)
    return out, valid


def _smooth(scores: np.ndarray, valid: np.ndarray, sig: tuple[float, float, float]) -> np.ndarray:
    """Normalised Gaussian smoothing over (block, batch, lag, shift) with sigmas (block, batch, batch, shift)."""
    s_shift, s_batch, s_block = (max(0.0, float(v)) for v in sig)
    if scores.shape[0] == 1:
        s_block = 0.0
    sig4 = (s_block, s_batch, s_batch, s_shift)
    m = np.broadcast_to(valid[None, :, :, None], scores.shape).astype(np.float32)
    num = scipy.ndimage.gaussian_filter(scores * m, sig4, mode="constant", truncate=3.0)
    den = scipy.ndimage.gaussian_filter(m, sig4, mode="constant", truncate=3.0)
    return np.where(den > 1e-3, num / np.maximum(den, 1e-3), 0.0).astype(np.float32)


def _peaks(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sub-bin arg-max over the last axis (parabola through the peak and its neighbours) and the peak value;
    a peak on the border of the shift range gets weight 0 (the true offset may lie beyond it)."""
    S2 = scores.shape[-1]
    S = (S2 - 1) // 2
    k = scores.argmax(-1)
    peak = np.take_along_axis(scores, k[..., None], -1)[..., 0]
    inner = (k > 0) & (k < S2 - 1)
    kc = np.clip(k, 1, S2 - 2)
    left = np.take_along_axis(scores, (kc - 1)[..., None], -1)[..., 0]
    mid = np.take_along_axis(scores, kc[..., None], -1)[..., 0]
    right = np.take_along_axis(scores, (kc + 1)[..., None], -1)[..., 0]
    den = left - 2 * mid + right
    delta = np.where(den < -1e-9, 0.5 * (left - right) / np.where(den < -1e-9, den, -1.0), 0.0)
    delta = np.clip(delta, -0.5, 0.5)
    shift = np.where(inner, kc + delta - S, k - S).astype(np.float64)
    weight = np.where(inner, np.maximum(peak, 0.0), 0.0).astype(np.float64)
    return shift, weight


def _solve(D: np.ndarray, W0: np.ndarray, valid: np.ndarray, *, depth_smoothness: float = 1.0,
           n_irls: int = 5, c_robust: float = 1.0) -> np.ndarray:
    """Robust least squares for ``p`` (T, B) from band offsets ``D[k, i, l] ≈ p[i, k] − p[i+l−H, k]`` with
    weights ``W0`` (B, T, 2H+1).

    Priors: weak first differences in time (bridges batches without usable pairs) and, with ≥ 3 blocks,
    second differences across neighbouring blocks weighted by ``depth_smoothness`` × the median data weight of
    a batch: a displacement that varies linearly with depth costs nothing, block-to-block noise does.
    """
    B, T, L = D.shape
    H = (L - 1) // 2
    if T == 1:
        return np.zeros((T, B))
    i = np.broadcast_to(np.arange(T)[:, None], (T, L))
    j = i + np.arange(L)[None, :] - H
    ii, jj, dd, ww = [], [], [], []
    for k in range(B):
        ok = valid & (W0[k] > 0)
        ii.append(i[ok] * B + k)
        jj.append(j[ok] * B + k)
        dd.append(D[k][ok])
        ww.append(W0[k][ok])
    ii, jj, d, w0 = (np.concatenate(v) for v in (ii, jj, dd, ww))
    N = T * B
    if len(ii) == 0:
        return np.zeros((T, B))
    deg0 = np.bincount(ii, w0, N) + np.bincount(jj, w0, N)
    scale = float(np.median(deg0[deg0 > 0])) if (deg0 > 0).any() else 1.0
    eye_b = scipy.sparse.identity(B)
    dt = scipy.sparse.diags([np.ones(T - 1), -np.ones(T - 1)], [0, 1], shape=(T - 1, T))
    prior = 1e-3 * scale * scipy.sparse.kron(dt.T @ dt, eye_b)
    if B >= 3 and depth_smoothness > 0:
        d2 = scipy.sparse.diags([np.ones(B - 2), -2 * np.ones(B - 2), np.ones(B - 2)], [0, 1, 2], shape=(B - 2, B))
        prior = prior + depth_smoothness * scale * scipy.sparse.kron(scipy.sparse.identity(T), d2.T @ d2)
    prior = prior + 1e-9 * scale * scipy.sparse.identity(N)
    p = np.zeros(N)
    w = w0.copy()
    for _ in range(n_irls + 1):
        Wm = scipy.sparse.coo_matrix((w, (ii, jj)), shape=(N, N)).tocsr()
        deg = np.asarray(Wm.sum(1)).ravel() + np.asarray(Wm.sum(0)).ravel()
        A = scipy.sparse.diags(deg) - Wm - Wm.T + prior
        b = np.bincount(ii, w * d, N) - np.bincount(jj, w * d, N)
        p = _spd_solve(A, b)
        r = p[ii] - p[jj] - d
        w = w0 / (1.0 + (r / c_robust) ** 2)
    p = p.reshape(T, B)
    return p - p.mean(0, keepdims=True)


def _spd_solve(A: scipy.sparse.spmatrix, b: np.ndarray) -> np.ndarray:
    """``A⁻¹ b`` for the symmetric positive definite normal matrix of :func:`_solve` (its priors include a
    small multiple of the identity, so it is definite even for batches without pairs)."""
    if A.shape[0] <= DENSE_SOLVE_MAX:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(A.toarray(), lower=True, check_finite=False), b,
                                      check_finite=False)
    return scipy.sparse.linalg.spsolve(A.tocsc(), b)


def register(spike_t: np.ndarray, depth: np.ndarray, amp: np.ndarray, *, batch_edges: np.ndarray,
             t_centres: np.ndarray, lay: BlockLayout, threshold: float, smoothing: tuple[float, float, float],
             device: torch.device, rigid_rounds: int = 3, block_rounds: int = 3,
             horizon: int = HORIZON_BATCHES) -> np.ndarray:
    """Displacement ``(T, n_blocks)`` in µm of one shank from its spikes.

    Parameters
    ----------
    spike_t : ndarray of int, (n,)
        Spike times, samples.
    depth, amp : ndarray, (n,)
        Spike depth (µm) and amplitude (whitened units).
    batch_edges : ndarray of int, (T + 1,)
        Sample boundaries of the batches.
    t_centres : ndarray, (T,)
        Batch centres, samples (used to interpolate the estimate in time when moving spikes back).
    lay : BlockLayout
    threshold : float
        Detection threshold (lower edge of the amplitude bins).
    smoothing : (float, float, float)
        Gaussian sigmas along (shift, batch, block), as ``drift_smoothing``.
    device : torch.device
    rigid_rounds, block_rounds : int
        Refinement rounds with one block and with the non-rigid blocks.
    """
    T = len(batch_edges) - 1
    n_blk = len(lay.starts)
    p = np.zeros((T, n_blk))
    if T < 2 or len(spike_t) == 0:
        return p
    batch = np.clip(np.searchsorted(batch_edges, spike_t, side="right") - 1, 0, T - 1)
    rigid = BlockLayout(lay.y0, lay.bin_um, lay.n_bins, np.array([0]), lay.n_bins,
                        np.array([lay.y0 + lay.n_bins * lay.bin_um / 2]))
    plan = [(rigid, 15)] + [(rigid, 3)] * max(0, rigid_rounds - 1)
    if n_blk > 1:
        plan += [(lay, 5)] + [(lay, 3)] * max(0, block_rounds - 1)
    for layout, max_shift in plan:
        moved = depth - displacement_at_spikes(p, spike_t, depth, t_centres, lay.centres)
        fp = _fingerprints(batch, moved, amp, T, lay, threshold)
        scores, valid = _pair_scores(fp, layout, max_shift, horizon, device)
        scores = _smooth(scores, valid, smoothing)
        shift, weight = _peaks(scores)
        dp = _solve(shift, weight, valid, depth_smoothness=DEPTH_SMOOTHNESS)
        p = p + dp * lay.bin_um if dp.shape[1] == n_blk else p + dp[:, :1] * lay.bin_um
    return p - p.mean(0, keepdims=True)
