"""``correct``: move every channel by the estimated displacement, lazily, chunk by chunk (kriging interpolation).

Channel ``i`` at ``(x_i, y_i)`` receives the Gaussian-process (kriging) interpolation of the whitened signal at
``(x_i, y_i + d_i(t))``, where ``d_i(t)`` is the displacement of the tissue at that channel's depth: a unit that
moved up by ``d`` is seen at ``y + d``, so reading there puts it back at its mean position. Kernel
``exp(−r² / (2·sig_interp²))`` between contacts of the same shank, ``K⁻¹ = inv(Kxx + 0.01·I)`` as Kilosort4.

The displacement is interpolated linearly in time between batch centres (no steps at batch borders) and
evaluated once per segment of ``segment_ms`` on a grid fixed to the recording's first sample, quantised to
``quantum_um``; so the output does not depend on the chunking, and one interpolation matrix (cached per call)
serves every segment with the same quantised displacement.
"""

from __future__ import annotations

from collections import OrderedDict
from threading import Lock

import numpy as np
import torch
import xarray as xr

from .._compute import band_blocks, band_matmul, resolve_device
from ..errors import DataError
from ..geometry import shanks
from .registration import depth_weights, time_weights

__all__ = ["correct", "kriging_matrix", "kriging_inverse"]


def kriging_matrix(x: np.ndarray, y: np.ndarray, shank: np.ndarray, shift: np.ndarray, sig: float, *,
                   inverse: np.ndarray | None = None) -> np.ndarray:
    """Interpolation matrix ``M`` (C, C): ``out = M @ signal`` reads channel ``i`` at ``(x_i, y_i + shift_i)``.

    Parameters
    ----------
    x, y : ndarray, (C,)
        Contact positions, µm.
    shank : ndarray, (C,)
        Shank of each contact; no signal crosses shanks.
    shift : ndarray, (C,)
        Displacement at each channel, µm (positive: read higher up).
    sig : float
        Kernel width ``sig_interp``, µm.
    inverse : ndarray (C, C), optional
        :func:`kriging_inverse` of the same geometry (it does not depend on ``shift``; pass it when building
        many matrices).

    Returns
    -------
    ndarray (C, C), float64. Weights below float32 resolution of their row's largest (``eps32 · max_j |M_ij|``)
    are 0: they change a float32 output by less than one rounding step of its main term, but as float32 most
    are subnormal numbers, which CPU BLAS multiplies ~25× slower (9 % of a 384-channel matrix's entries; one 2 s
    chunk took 1.54 s instead of 0.06 s). The zeros also give the matrix the band structure that
    :func:`~spikearray._compute.band_blocks` uses.
    """
    same = shank[:, None] == shank[None, :]
    ik = kriging_inverse(x, y, shank, sig) if inverse is None else inverse
    yq = y + shift
    kyx = np.exp(-((x[:, None] - x[None, :]) ** 2 + (yq[:, None] - y[None, :]) ** 2) / (2 * sig ** 2)) * same
    m = kyx @ ik
    m[np.abs(m) < np.finfo(np.float32).eps * np.abs(m).max(1, keepdims=True)] = 0.0
    return m


def kriging_inverse(x: np.ndarray, y: np.ndarray, shank: np.ndarray, sig: float) -> np.ndarray:
    """``inv(Kxx + 0.01·I)`` of the contacts (Kilosort4's regularisation): the shift-free half of
    :func:`kriging_matrix`, (C, C) float64."""
    same = shank[:, None] == shank[None, :]
    kxx = np.exp(-((x[:, None] - x[None, :]) ** 2 + (y[:, None] - y[None, :]) ** 2) / (2 * sig ** 2)) * same
    return np.linalg.inv(kxx + 0.01 * np.eye(len(x)))


class _Mover:
    """Per-call state of one correction: geometry, displacement and a small cache of matrices."""

    def __init__(self, drift: xr.Dataset, rec: xr.DataArray, sig: float, segment: int, quantum: float,
                 device: str, cache_size: int = 512) -> None:
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
        self.cache: OrderedDict = OrderedDict()
        self.cache_size = cache_size
        self.lock = Lock()

    # dask-distributed ships the mover to worker processes: send the geometry, not the lock or the matrix cache
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("lock", "cache")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.cache = OrderedDict()
        self.lock = Lock()

    def matrix(self, key: tuple, dev: torch.device) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
        """The interpolation matrix of a quantised displacement (as a tensor on ``dev``) and its band blocks."""
        key = (str(dev),) + key
        with self.lock:
            m = self.cache.get(key)
            if m is not None:
                self.cache.move_to_end(key)
                return m
        shift = self.chan_w @ (np.asarray(key[1:], np.float64) * self.quantum)
        w = kriging_matrix(self.cx, self.cy, self.shank, shift, self.sig, inverse=self.inverse)
        m = (torch.as_tensor(w.astype(np.float32), device=dev), band_blocks(w))
        with self.lock:
            self.cache[key] = m
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return m

    def __call__(self, block: np.ndarray, block_info=None) -> np.ndarray:
        s0 = int(block_info[0]["array-location"][0][0])
        n = block.shape[0]
        dev = resolve_device(self.device)
        x = torch.as_tensor(np.ascontiguousarray(block, dtype=np.float32), device=dev)
        out = torch.empty_like(x)
        seg0, seg1 = s0 // self.segment, (s0 + n - 1) // self.segment
        mids = (np.arange(seg0, seg1 + 1) + 0.5) * self.segment
        k0, k1, f = time_weights(mids, self.centres)
        blocks = (1.0 - f)[:, None] * self.disp[k0] + f[:, None] * self.disp[k1]
        keys = np.rint(blocks / self.quantum).astype(np.int64)
        for m in range(seg0, seg1 + 1):
            a = max(s0, m * self.segment) - s0
            b = min(s0 + n, (m + 1) * self.segment) - s0
            w, blocks = self.matrix(tuple(keys[m - seg0].tolist()), dev)
            out[a:b] = band_matmul(w, x[a:b], blocks, channels_first=False)
        return out.cpu().numpy()


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
        Displacements are rounded to this before building an interpolation matrix (and cached by it).
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
    from .._engine import as_dask

    out = as_dask(rec).astype(np.float32).map_blocks(mover, dtype=np.float32)
    res = xr.DataArray(out, dims=rec.dims, coords=rec.coords, name=rec.name, attrs=dict(rec.attrs))
    res.attrs["drift_corrected"] = True
    return res
