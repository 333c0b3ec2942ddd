"""Local ZCA whitening (Kilosort4 §2.3): matrix from a deterministic sample of windows, applied per chunk."""

from __future__ import annotations

import dask
import numpy as np
import torch
import xarray as xr

from .._compute import default_torch_threads, resolve_device, torch_threads
from ..errors import DataError, ProbeMismatchError, SettingsError
from ..geometry import neighbourhoods, shanks, uV_gains
from ._common import check_finite, check_recording, derive_attrs, json_friendly
from .._engine import compute_tasks
from ._graph import as_dask, map_time_blocks, sample_windows, wrap_like
from ._kernels import band_blocks, covariance_block, whiten_block
from .bad_channels import classify_bad_channels, robust_sd, warn_bad_channels

__all__ = ["whitening_matrix", "whiten", "local_zca", "needed_pairs", "covariance_tasks",
           "matrix_from_estimates"]

CONVENTION = "whitened[t, i] = sum_j W[i, j] * x[t, j]  (X @ W.T; W is symmetric by default)"


def _check_params(whitening_range: int, nskip: int, batch_size: int) -> None:
    for name, v in (("whitening_range", whitening_range), ("nskip", nskip), ("batch_size", batch_size)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise SettingsError(f"{name}={v!r}; expected a positive integer (Kilosort4 defaults: whitening_range=32,"
                                " nskip=25, batch_size=60000).")


def whitening_neighbourhoods(rec: xr.DataArray, whitening_range: int,
                             exclude: np.ndarray | None = None) -> np.ndarray:
    """Each channel's ``whitening_range`` nearest channels on its own shank (:func:`~spikearray.geometry.
    neighbourhoods`): shanks of a multi-shank probe are whitened apart, so no signal leaks between them."""
    return neighbourhoods(rec["x"].values, rec["y"].values, k=whitening_range, exclude=exclude, shank=shanks(rec))


def needed_pairs(nb: np.ndarray) -> np.ndarray:
    """Boolean ``(c, c)`` mask of the covariance entries the local ZCA reads (pairs inside a neighbourhood)."""
    c = nb.shape[0]
    nbs = np.where(nb >= 0, nb, nb[:, :1])  # padding (-1) repeats the channel itself
    pairs = np.zeros((c, c), bool)
    pairs[nbs[:, :, None], nbs[:, None, :]] = True
    return pairs


def local_zca(cov: np.ndarray, x: np.ndarray, y: np.ndarray, *, whitening_range: int, eps: float = 1e-6,
              exclude: np.ndarray | None = None, symmetric: bool = True,
              shank: np.ndarray | None = None) -> np.ndarray:
    """Kilosort4's local ZCA whitening matrix from a channel covariance.

    For every channel ``j``: its ``whitening_range`` nearest channels in (x, y) (itself first; ties by channel
    order), the ZCA matrix ``E diag(1/sqrt(D + eps)) Eᵀ`` of their covariance, whose row for ``j`` becomes row
    ``j`` of ``W``. Rows of excluded (dead) channels are the identity row and those channels are left out of
    every neighbourhood, so a flat channel can neither blow up nor leak into its neighbours.

    Parameters
    ----------
    cov : ndarray (c, c)
        Channel covariance (data units²); only the entries of :func:`needed_pairs` are read.
    x, y : ndarray (c,)
        Positions (µm).
    eps : float
        Regulariser added to the eigenvalues, at least 1e-6 × the median channel variance (Kilosort4: 1e-6
        absolute), so near-singular neighbourhoods (shorted or duplicated channels) stay finite.
    exclude : bool ndarray (c,), optional
    symmetric : bool
        Return ``(W + Wᵀ)/2`` — exactly symmetric, so Phy's ``template @ inv(W)`` unwhitening and xarray's
        ``dot`` over either axis agree. Kilosort4's ``Wrot`` is only approximately symmetric; the two whiten
        equally well (rows of neighbouring channels are nearly each other's transpose).

    Returns
    -------
    ndarray (c, c), float64, ``whitened = X @ W.T``.
    """
    c = cov.shape[0]
    exclude = np.zeros(c, bool) if exclude is None else np.asarray(exclude, bool)
    keep = np.flatnonzero(~exclude)
    w = np.zeros((c, c))
    w[exclude, exclude] = 1.0
    if keep.size == 0:
        return w
    eps_eff = max(float(eps), 1e-6 * float(np.median(np.diag(cov)[keep])))
    nb = neighbourhoods(x, y, k=whitening_range, exclude=exclude, shank=shank)[keep]  # (n_keep, k), self first
    local = cov[nb[:, :, None], nb[:, None, :]]  # (n_keep, k, k)
    # torch's batched eigh on CPU (numpy's loops LAPACK per matrix and its BLAS threads can stall next to dask's)
    with torch_threads(1):
        evals_t, evecs_t = torch.linalg.eigh(torch.from_numpy(np.ascontiguousarray(local, dtype=np.float64)))
    evals, evecs = evals_t.numpy(), evecs_t.numpy()
    scale = 1.0 / np.sqrt(np.clip(evals, 0.0, None) + eps_eff)
    rows = np.einsum("nj,nj,nkj->nk", evecs[:, 0, :], scale, evecs)  # row 0 of E diag(s) Eᵀ
    w[keep[:, None], nb] = rows
    if symmetric:
        w = 0.5 * (w + w.T)
    if not np.isfinite(w).all():
        raise DataError("the whitening matrix is not finite; the covariance holds NaN/inf (check the input for "
                        "NaN or extreme values).")
    return w


def covariance_tasks(rec: xr.DataArray, windows: list[tuple[int, int]], *, device: torch.device,
                     threads: int | None, pairs: np.ndarray | None = None, with_sd: bool = False) -> list:
    """Delayed ``(X.T @ X, n_samples)`` of each window of ``rec`` (float µV or whitened data).

    With a ``pairs`` mask only the band of entries it needs is computed (the rest stays 0), which for local
    whitening on a depth-ordered probe is several times cheaper than the full product. With ``with_sd`` each
    task also returns the window's per-channel robust SD (:func:`.bad_channels.robust_sd`) as a third item:
    one task per window, so a lazy upstream stage computes each window once (a separate robust-SD task per
    window made dask filter every window twice).
    """
    data = as_dask(rec)
    gain = uV_gains(rec)
    blocks = band_blocks(pairs) if pairs is not None else None

    def cov(x: np.ndarray) -> tuple:
        xf = np.asarray(x, dtype=np.float32) * gain if x.dtype.kind not in "f" or not np.all(gain == 1) else x
        out = (covariance_block(xf, device=device, threads=threads, blocks=blocks), len(x))
        return out + (robust_sd(x),) if with_sd else out

    return [dask.delayed(cov)(data[a:b]) for a, b in windows]


def matrix_from_estimates(rec: xr.DataArray, covs: list[tuple[np.ndarray, int]], bad: dict, *,
                          whitening_range: int, nskip: int, batch_size: int, windows: list[tuple[int, int]],
                          eps: float, symmetric: bool, pairs: np.ndarray | None = None) -> xr.DataArray:
    """Assemble the labelled whitening matrix from window covariances and a bad-channel report.

    ``pairs`` is the mask the covariances were computed for (None: full); if the dead channels make some
    neighbourhood reach outside it, the covariance is recomputed in full (a second sampled pass).
    """
    ids = rec["channel"].values
    exclude = np.isin(ids, np.asarray(bad["dead"], dtype=ids.dtype)) if bad["dead"] else None
    if pairs is not None:
        need = needed_pairs(whitening_neighbourhoods(rec, whitening_range, exclude=exclude))
        if (need & ~pairs).any():
            covs = compute_tasks(covariance_tasks(rec, windows, device=torch.device("cpu"), threads=None),
                                 desc="whitening")
    total = sum(n for _, n in covs)
    cov = sum(cv for cv, _ in covs) / max(total, 1)
    if not np.isfinite(cov).all():
        raise DataError("whitening: the sampled windows hold NaN or inf; compute the traces (e.g. "
                        "rec.data.compute()) to find where, or clean the input.")
    w = local_zca(cov, rec["x"].values, rec["y"].values, whitening_range=whitening_range, eps=eps,
                  exclude=exclude, symmetric=symmetric, shank=shanks(rec))
    out = xr.DataArray(w.astype(np.float32), dims=("channel", "channel_out"),
                       coords={"channel": ids, "channel_out": ids.copy()}, name="whitening_matrix")
    for name in ("x", "y", "shank", "contact_id"):
        if name in rec.coords:
            out = out.assign_coords({name: ("channel", rec[name].values)})
    out.attrs = json_friendly({
        "whitening_range": int(whitening_range), "nskip": int(nskip), "batch_size": int(batch_size),
        "windows": [list(wd) for wd in windows], "n_samples_used": int(total), "eps": float(eps),
        "symmetric": bool(symmetric), "convention": CONVENTION,
        "input_units": rec.attrs.get("units", ""),
        "bad_channels": {"dead": bad["dead"], "noisy": bad["noisy"]},
        "dead_channel_handling": "excluded from all neighbourhoods; identity row/column",
    })
    return out


def whitening_matrix(rec: xr.DataArray, *, whitening_range: int = 32, nskip: int = 25, batch_size: int = 60000,
                     seed: int = 0, device: str = "auto", eps: float = 1e-6, symmetric: bool = True,
                     bad_channels: dict | None = None, torch_threads: int | None = None) -> xr.DataArray:
    """Kilosort4's local ZCA whitening matrix, estimated from a deterministic sample of windows.

    The covariance ``Σ XᵀX / n`` (not re-centred, as Kilosort4) is accumulated over the windows
    ``[b·batch_size, (b+1)·batch_size)`` for ``b = 0, nskip, 2·nskip, ...`` (stride shrunk so that at least 4
    windows are used on short recordings, see :func:`._graph.sample_windows`); then :func:`local_zca`. This is
    one of the few global reductions of the pipeline: it computes the sampled windows now.

    Parameters
    ----------
    rec : xarray.DataArray, dims (time, channel)
        The traces to be whitened (high-passed and referenced; counts are scaled to µV).
    whitening_range : int
        Channels per local neighbourhood (≥ n_channels gives global ZCA).
    nskip, batch_size, seed : int
        Sampling stride (windows), window length (samples), shift of the first window (``seed % stride``).
    eps : float
        Eigenvalue regulariser (see :func:`local_zca`).
    symmetric : bool
        Symmetrise (default; see :func:`local_zca`).
    bad_channels : dict, optional
        A :func:`detect_bad_channels` report; detected on ``rec`` when not given. Dead channels are excluded
        from the neighbourhoods (identity row), noisy ones kept; both are warned about.

    Returns
    -------
    xarray.DataArray, dims ("channel", "channel_out"), float32
        ``W`` with ``whitened[t, i] = Σ_j W[i, j] x[t, j]`` (``X @ W.T``); coords ``channel`` and ``channel_out``
        both hold the channel ids (and x, y on ``channel``). Exactly symmetric by default, so the dim order does
        not matter. attrs: parameters, sampled windows, ``bad_channels``. Noise of the whitened data has ≈ unit
        variance. For Phy: ``whitening_mat.npy = W``, ``whitening_mat_inv.npy = inv(W)``.
    """
    rec = check_recording(rec, "whitening_matrix")
    _check_params(whitening_range, nskip, batch_size)
    dev = resolve_device(device)
    threads = torch_threads or default_torch_threads()
    windows = sample_windows(rec.sizes["time"], batch_size=batch_size, nskip=nskip, seed=seed)
    pairs = needed_pairs(whitening_neighbourhoods(rec, whitening_range))
    results = compute_tasks(covariance_tasks(rec, windows, device=dev, threads=threads, pairs=pairs,
                                             with_sd=bad_channels is None), desc="whitening")
    covs = [r[:2] for r in results]
    if bad_channels is None:
        bad_channels = classify_bad_channels(rec, [r[2] for r in results], dead_threshold=0.1, noisy_threshold=5.0)
    warn_bad_channels(bad_channels, what="whitening_matrix")
    return matrix_from_estimates(rec, covs, bad_channels, whitening_range=whitening_range, nskip=nskip,
                                 batch_size=batch_size, windows=windows, eps=eps, symmetric=symmetric, pairs=pairs)


def check_matrix(rec: xr.DataArray, matrix: xr.DataArray) -> np.ndarray:
    """The matrix values (float32) after checking that it belongs to ``rec``'s channels."""
    if not isinstance(matrix, xr.DataArray) or matrix.dims != ("channel", "channel_out"):
        raise SettingsError(f"matrix must be a DataArray with dims ('channel', 'channel_out') as returned by "
                            f"whitening_matrix(); got {type(matrix).__name__} {getattr(matrix, 'dims', '')}.")
    ids = rec["channel"].values
    if matrix.sizes["channel"] != ids.size or not np.array_equal(matrix["channel"].values, ids):
        raise ProbeMismatchError(f"the whitening matrix is for channels {matrix['channel'].values.tolist()[:8]}... "
                                 f"({matrix.sizes['channel']}) but the recording has {ids.tolist()[:8]}... "
                                 f"({ids.size}); recompute it with whitening_matrix(rec).")
    return np.ascontiguousarray(matrix.values, dtype=np.float32)


def whiten_record(matrix: xr.DataArray) -> dict:
    """The ``stages`` entry of a whitening with ``matrix``."""
    a = matrix.attrs
    return {"stage": "whiten", "whitening_range": a.get("whitening_range"), "nskip": a.get("nskip"),
            "batch_size": a.get("batch_size"), "symmetric": a.get("symmetric"), "eps": a.get("eps"),
            "n_samples_used": a.get("n_samples_used")}


def whiten(rec: xr.DataArray, *, matrix: xr.DataArray | None = None, whitening_range: int = 32, nskip: int = 25,
           batch_size: int = 60000, seed: int = 0, device: str = "auto",
           torch_threads: int | None = None) -> xr.DataArray:
    """Apply local ZCA whitening per chunk (lazy); the matrix is estimated first when not given.

    Parameters
    ----------
    rec : xarray.DataArray, dims (time, channel)
        High-passed (and referenced) traces; counts are scaled to µV first.
    matrix : xarray.DataArray, optional
        From :func:`whitening_matrix` for the same channels. When omitted it is computed (a global reduction
        over sampled windows, done now) with ``whitening_range``, ``nskip``, ``batch_size`` and ``seed``; get it
        yourself with :func:`whitening_matrix` when you need it afterwards (attrs stay JSON-friendly and do not
        carry it).

    Returns
    -------
    xarray.DataArray
        Lazy float32 in whitened units (noise ≈ unit variance), ``attrs["units"] = "whitened"``, ``stages`` +=
        the whitening record, ``bad_channels`` from the matrix. ``out[t, i] = Σ_j W[i, j] x[t, j]``.
    """
    rec = check_recording(rec, "whiten")
    dev = resolve_device(device)
    threads = torch_threads or default_torch_threads()
    if matrix is None:
        matrix = whitening_matrix(rec, whitening_range=whitening_range, nskip=nskip, batch_size=batch_size,
                                  seed=seed, device=device, torch_threads=threads)
    w = check_matrix(rec, matrix)
    blocks = band_blocks(w)
    gain = uV_gains(rec)
    scaled = bool(np.all(gain == 1))
    fs = float(rec.attrs["sampling_rate"])
    ids = rec["channel"].values
    t0 = float(rec.attrs.get("time_start", 0.0))

    def block(x: np.ndarray, start: int) -> np.ndarray:
        check_finite(x, start=start, sampling_rate=fs, channel_ids=ids, time_start=t0, stage="whiten")
        xf = np.asarray(x, dtype=np.float32) if scaled else x.astype(np.float32) * gain
        return whiten_block(xf, w, blocks, device=dev, threads=threads)

    data = map_time_blocks(block, as_dask(rec))
    extra = {"bad_channels": matrix.attrs.get("bad_channels", {"dead": [], "noisy": []})}
    return wrap_like(rec, data, derive_attrs(rec, units="whitened", stages=[whiten_record(matrix)], extra=extra))
