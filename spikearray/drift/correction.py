"""``correct``: move every channel by the estimated displacement, lazily, chunk by chunk (kriging interpolation).

Channel ``i`` at ``(x_i, y_i)`` receives the Gaussian-process (kriging) interpolation of the whitened signal at
``(x_i, y_i + d_i(t))``, where ``d_i(t)`` is the displacement of the tissue at that channel's depth: a unit that
moved up by ``d`` is seen at ``y + d``, so reading there puts it back at its mean position. Kernel
``exp(−r² / (2·sig_interp²))`` between contacts of the same shank, ``K⁻¹ = inv(Kxx + 0.01·I)`` as Kilosort4.

The displacement is interpolated linearly in time between batch centres (no steps at batch borders) and
evaluated once per segment of ``segment_ms`` on a grid fixed to the recording's first sample and rounded to
``quantum_um``, so the interpolation weights do not depend on the chunking; a row of the interpolation matrix is
made once per chunk for each shift its channel takes.
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from .._compute import band_blocks, resolve_device
from ..errors import DataError
from ..geometry import shanks
from .registration import depth_weights, time_weights

__all__ = ["correct", "kriging_matrix", "kriging_rows", "kriging_inverse"]


def kriging_rows(x: np.ndarray, y: np.ndarray, shank: np.ndarray, rows: np.ndarray, shift: np.ndarray,
                 sig: float, *, inverse: np.ndarray | None = None) -> np.ndarray:
    """Rows ``rows`` of the interpolation matrix: row ``k`` reads channel ``rows[k]`` at ``y + shift[k]``.

    Row ``i`` of :func:`kriging_matrix` depends on channel ``i``'s own shift only, so the rows of many
    displacements can be made together, each once.

    Parameters
    ----------
    x, y : ndarray, (C,)
        Contact positions, µm.
    shank : ndarray, (C,)
        Shank of each contact; no signal crosses shanks.
    rows : ndarray of int, (R,)
        The output channel of each row (repeats allowed).
    shift : ndarray, (R,)
        Displacement of each row, µm (positive: read higher up).
    sig : float
        Kernel width ``sig_interp``, µm.
    inverse : ndarray (C, C), optional
        :func:`kriging_inverse` of the same geometry.

    Returns
    -------
    ndarray (R, C), float64, with weights below ``eps32 · max_j |w_j|`` of their row set to 0 (see
    :func:`kriging_matrix`).

    Examples
    --------
    >>> x, y, sh = np.zeros(4), np.arange(4) * 20.0, np.zeros(4, int)
    >>> full = kriging_matrix(x, y, sh, np.full(4, 5.0), 20.0)
    >>> bool(np.array_equal(kriging_rows(x, y, sh, np.array([2, 0]), np.array([5.0, 5.0]), 20.0), full[[2, 0]]))
    True
    """
    rows = np.asarray(rows, np.int64)
    ik = kriging_inverse(x, y, shank, sig) if inverse is None else inverse
    yq = y[rows] + np.asarray(shift, np.float64)
    same = shank[rows][:, None] == shank[None, :]
    kyx = np.exp(-((x[rows][:, None] - x[None, :]) ** 2 + (yq[:, None] - y[None, :]) ** 2) / (2 * sig ** 2)) * same
    m = kyx @ ik
    size = np.abs(m)
    m[size < np.finfo(np.float32).eps * size.max(1, keepdims=True)] = 0.0
    return m


def kriging_matrix(x: np.ndarray, y: np.ndarray, shank: np.ndarray, shift: np.ndarray, sig: float, *,
                   inverse: np.ndarray | None = None) -> np.ndarray:
    """Interpolation matrix ``M`` (C, C): ``out = M @ signal`` reads channel ``i`` at ``(x_i, y_i + shift_i)``.

    Parameters
    ----------
    x, y, shank, sig, inverse
        As :func:`kriging_rows` (``inverse`` does not depend on ``shift``: pass it when building many matrices).
    shift : ndarray, (C,)
        Displacement at each channel, µm (positive: read higher up).

    Returns
    -------
    ndarray (C, C), float64. Weights below float32 resolution of their row's largest (``eps32 · max_j |M_ij|``)
    are 0: they change a float32 output by less than one rounding step of its main term, but as float32 most
    are subnormal numbers, which CPU BLAS multiplies ~25× slower (9 % of a 384-channel matrix's entries; one 2 s
    chunk took 1.54 s instead of 0.06 s). The zeros also give the matrix the band structure that
    :func:`~spikearray._compute.band_blocks` uses.
    """
    return kriging_rows(x, y, shank, np.arange(len(x)), shift, sig, inverse=inverse)


def kriging_inverse(x: np.ndarray, y: np.ndarray, shank: np.ndarray, sig: float) -> np.ndarray:
    """``inv(Kxx + 0.01·I)`` of the contacts (Kilosort4's regularisation): the shift-free half of
    :func:`kriging_matrix`, (C, C) float64."""
    same = shank[:, None] == shank[None, :]
    kxx = np.exp(-((x[:, None] - x[None, :]) ** 2 + (y[:, None] - y[None, :]) ** 2) / (2 * sig ** 2)) * same
    return np.linalg.inv(kxx + 0.01 * np.eye(len(x)))


#: A channel's shift is keyed (and its kriging row made) at this resolution, µm: far below float32's effect on
#: the weights, and int64 keys hold shifts up to ±10⁹ µm.
_KEY_UM = 1e-6


class _Mover:
    """Per-call state of one correction: geometry, displacement, the shift-free kriging inverse.

    A row of the interpolation matrix depends on its own channel's shift only, and a channel's shift changes
    only when one of its blocks' rounded displacements does. A chunk makes each (channel, shift) row once and
    applies every segment's rows in one batched product per band block. On 20 s of the 384-channel drifting
    benchmark set (synchronous scheduler) the correction took 12.1 s when it made 455 whole matrices (7 ms each)
    and ran 16 small products per 10 ms segment; it takes 4.7 s now, of which 0.4 s is reading the traces, and
    gives the same traces to 2e-6 (float32 rounding of a different summation order).
    """

    def __init__(self, drift: xr.Dataset, rec: xr.DataArray, sig: float, segment: int, quantum: float,
                 device: str) -> None:
        fs = float(rec.attrs["sampling_rate"])
        t0 = float(rec.attrs.get("time_start", 0.0))
        self.centres = (np.asarray(drift["time"].values, float) - t0) * fs  # samples
        self.disp = np.asarray(drift["displacement"].values, np.float64)  # (T, B)
        self.cx = np.asarray(rec["x"].values, np.float64)
        self.cy = np.asarray(rec["y"].values, np.float64)
        self.shank = shanks(rec)
        blk_shank = (np.asarray(drift["block_shank"].values) if "block_shank" in drift.coords
                     else np.zeros(self.disp.shape[1], int))
        centres = np.asarray(drift["depth"].values, np.float64)
        # (C, B): each channel's displacement from its own shank's blocks (a shank without blocks stays put).
        self.chan_w = np.zeros((len(self.cx), self.disp.shape[1]))
        for sh in np.unique(self.shank):
            cs, bs = self.shank == sh, blk_shank == sh
            if bs.any():
                self.chan_w[np.ix_(cs, bs)] = depth_weights(self.cy[cs], centres[bs])
        # the device string ("auto" too) is resolved where a block runs: a GPU worker uses its GPU
        self.sig, self.segment, self.quantum, self.device = sig, segment, quantum, str(device)
        # the same for every displacement: one C³ inverse per correction, not one per new displacement
        self.inverse = kriging_inverse(self.cx, self.cy, self.shank, sig)

    def shifts(self, seg0: int, seg1: int) -> np.ndarray:
        """(S, C) int64: each channel's shift in segments ``seg0..seg1``, in units of :data:`_KEY_UM`.

        The displacement of each block is taken at the segment's middle (so it does not depend on where a chunk
        starts) and rounded to ``quantum``; a channel's shift is its depth-weighted mix of its blocks.
        """
        mids = (np.arange(seg0, seg1 + 1) + 0.5) * self.segment
        k0, k1, f = time_weights(mids, self.centres)
        blocks = (1.0 - f)[:, None] * self.disp[k0] + f[:, None] * self.disp[k1]
        blocks = np.rint(blocks / self.quantum) * self.quantum
        return np.rint(blocks @ self.chan_w.T / _KEY_UM).astype(np.int64)

    def __call__(self, block: np.ndarray, block_info=None) -> np.ndarray:
        return self.apply(block, int(block_info[0]["array-location"][0][0]))

    def apply(self, block: np.ndarray, s0: int) -> np.ndarray:
        """The corrected ``block`` (n, C) whose first row is sample ``s0`` of the recording."""
        n, c = block.shape
        dev = resolve_device(self.device)
        seg = self.segment
        seg0, seg1 = s0 // seg, (s0 + n - 1) // seg
        q = self.shifts(seg0, seg1)  # (S, C)
        # every (channel, shift) row the chunk needs, made once: key = shift · C + channel
        keys, which = np.unique((q * c + np.arange(c)).ravel(), return_inverse=True)
        chan = keys % c
        rows = kriging_rows(self.cx, self.cy, self.shank, chan, (keys - chan) // c * _KEY_UM, self.sig,
                            inverse=self.inverse)
        # one band layout for the chunk: the union of its rows' non-zeros
        nz = np.zeros((c, c), bool)
        np.logical_or.at(nz, chan, rows != 0)
        which = torch.as_tensor(which.reshape(q.shape), device=dev)
        rows = torch.as_tensor(rows.astype(np.float32), device=dev)
        blocks = band_blocks(nz)
        x = torch.as_tensor(np.ascontiguousarray(block, dtype=np.float32), device=dev)
        out = torch.empty_like(x)
        # whole segments as one (S, seg, C) view; a partial segment at either end of the chunk on its own
        a = min(n, -s0 % seg)
        b = max(a, n - (s0 + n) % seg)
        first = (s0 + a) // seg - seg0
        if b > a:
            whole = which[first:first + (b - a) // seg]
            out[a:b] = _segments(x[a:b].view(-1, seg, c), rows, whole, blocks).view(-1, c)
        if a > 0:
            out[:a] = _segments(x[None, :a], rows, which[:1], blocks)[0]
        if b < n:
            out[b:] = _segments(x[None, b:], rows, which[-1:], blocks)[0]
        return out.cpu().numpy()


def _segments(x: torch.Tensor, rows: torch.Tensor, which: torch.Tensor,
              blocks: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """``x[s] @ rows[which[s]].T`` for every segment ``s`` of ``x`` (S, L, C) (``rows`` (U, C) float32, ``which``
    (S, C) indices into ``rows``), one product per band block.

    Consecutive segments whose channels all keep their rows form a run, and a run is one product: a static or
    slowly drifting recording has few runs (6.5 per 2 s chunk of 200 segments on P384-static), and a chunk took
    0.16 s instead of 0.20 s there (one thread), with the same bits. Where most segments differ (P128-drift: ~100
    runs per chunk) every segment's matrix is gathered and the products are batched.
    """
    S, L, c = x.shape
    new_run = torch.ones(S, dtype=torch.bool, device=x.device)
    if S > 1:
        new_run[1:] = (which[1:] != which[:-1]).any(1)
    starts = torch.nonzero(new_run)[:, 0].tolist() + [S]
    out = torch.empty_like(x)
    if len(starts) - 1 <= S // 4:
        flat_x, flat_out = x.view(S * L, c), out.view(S * L, c)
        for r0, r1 in zip(starts[:-1], starts[1:]):
            for o0, o1, i0, i1 in blocks:
                w = rows[which[r0, o0:o1]][:, i0:i1]  # (o, i)
                flat_out[r0 * L:r1 * L, o0:o1] = flat_x[r0 * L:r1 * L, i0:i1] @ w.T
        return out
    for o0, o1, i0, i1 in blocks:
        w = rows[:, i0:i1][which[:, o0:o1]].transpose(1, 2).contiguous()  # (S, i, o)
        out[:, :, o0:o1] = torch.bmm(x[:, :, i0:i1], w)
    return out


def correct(rec: xr.DataArray, drift: xr.Dataset, *, sig_interp: float | None = None, segment_ms: float = 10.0,
            quantum_um: float = 0.1, device: str | None = None) -> xr.DataArray:
    """Drift-corrected recording (lazy): each channel reads the signal where its tissue has moved to.

    Parameters
    ----------
    rec : xarray.DataArray, (time, channel) float32
        The preprocessed (whitened) recording the drift was estimated on.
    drift : xarray.Dataset
        Output of :func:`spikearray.drift.estimate` (``displacement`` (time, block) µm, coords ``time``,
        ``depth``, ``block_shank``).
    sig_interp : float, optional
        Kriging kernel width, µm (default: the ``sig_interp`` of the settings stored in ``drift``, else 20).
    segment_ms : float
        Time step at which the displacement is re-evaluated (on a grid fixed to the recording's start).
    quantum_um : float
        Each block's displacement is rounded to this before the interpolation weights are made.
    device : str, optional
        Torch device (default: the settings' ``device``).

    Returns
    -------
    xarray.DataArray
        Same dims, coords, chunks and attrs as ``rec`` (plus attr ``drift_corrected``), float32. With drift
        correction off (``nblocks = 0``), ``rec`` itself.

    Examples
    --------
    >>> import spikearray as sa
    >>> from spikearray.synthetic import generate_recording
    >>> rec, _ = generate_recording(duration=4.0, n_channels=16, n_units=4, seed=1)
    >>> white = ((rec - rec.mean("time")) / 25.0).astype("float32")
    >>> drift = sa.drift.estimate(white, {"batch_size": 30000})
    >>> sa.drift.correct(white, drift).shape == white.shape
    True
    """
    import json

    if drift.attrs.get("drift_correction") == "off":
        return rec
    if "displacement" not in drift:
        raise DataError("drift has no 'displacement' variable; pass the Dataset returned by drift.estimate.")
    settings = json.loads(drift.attrs.get("settings", "{}"))
    sig = float(sig_interp if sig_interp is not None else settings.get("sig_interp", 20.0))
    dev = device if device is not None else settings.get("device", "auto")  # resolved in each block
    fs = float(rec.attrs["sampling_rate"])
    segment = max(1, int(round(segment_ms * 1e-3 * fs)))
    mover = _Mover(drift, rec, sig, segment, float(quantum_um), dev)
    from .._engine import as_dask, register_samplewise

    source = as_dask(rec).astype(np.float32)
    out = source.map_blocks(mover, dtype=np.float32)
    # each sample is moved on its own: chunk kernels correct their own halo'd blocks (spikearray._engine)
    register_samplewise(out, source, mover.apply)
    res = xr.DataArray(out, dims=rec.dims, coords=rec.coords, name=rec.name, attrs=dict(rec.attrs))
    res.attrs["drift_corrected"] = True
    return res
