"""``preprocess``: high-pass → common median reference → local whitening, fused into one pass per chunk."""

from __future__ import annotations

import math

import dask
import dask.array as da
import numpy as np
import xarray as xr

from .._compute import default_torch_threads, resolve_device
from ..errors import DataError, RecordingError, SettingsError
from ..settings import PARAMETERS, Settings
from ._common import check_recording, derive_attrs
from .._engine import compute_tasks
from ._graph import as_dask, map_time_blocks, map_time_overlap, sample_windows, wrap_like
from ._kernels import band_blocks, covariance_block, median_subtract, reference_whiten_inplace, whiten_block
from .bad_channels import classify_bad_channels, robust_sd, warn_bad_channels
from .filters import highpass_stage
from .reference import reference_stage
from .whitening import matrix_from_estimates, needed_pairs, whiten_record, whitening_neighbourhoods

__all__ = ["preprocess", "scale_shift", "check_sampling_rate", "estimate_windows", "artifact_batches"]

_FS_TOLERANCE = 1e-3  # relative: SpikeGLX's calibrated rates (e.g. 30000.07 Hz) still match a nominal fs=30000


def check_sampling_rate(rec: xr.DataArray, settings: Settings) -> None:
    """Raise :class:`~spikearray.errors.RecordingError` when a non-default ``settings.fs`` disagrees with the
    recording's own ``sampling_rate`` by more than 0.1 %.

    spikearray always uses the recording's rate; a Kilosort4 dict carries ``fs`` because Kilosort4 cannot read
    it from the file. The default (30000 Hz) is not checked, so a 25 kHz recording sorts with a default dict.

    Examples
    --------
    >>> from spikearray.synthetic import generate_recording
    >>> rec, _ = generate_recording(duration=0.5, n_channels=8, n_units=1)
    >>> check_sampling_rate(rec, Settings(fs=30000.0))  # the generator's rate: fine
    """
    default = next(p.default for p in PARAMETERS if p.name == "fs")
    fs = float(settings.fs)
    rate = float(rec.attrs["sampling_rate"])
    if fs != default and abs(fs - rate) > _FS_TOLERANCE * rate:
        raise RecordingError(f"settings fs={fs:g} Hz but the recording samples at {rate:g} Hz; spikearray uses the "
                             "recording's own rate, so leave fs out of the settings (or fix it).")


def scale_shift(rec: xr.DataArray, *, scale: float | None = None, shift: float | None = None) -> xr.DataArray:
    """Kilosort4's ``data*scale + shift`` on the stored samples, before anything else (lazy, per chunk).

    The samples are in the file's own units (counts for int16 data); the µV gain (``gain_to_uV``) still applies
    after it, so the result is float32 with the same ``units`` and gains. ``None`` for both returns ``rec``.

    Parameters
    ----------
    rec : xarray.DataArray (time, channel)
    scale, shift : float, optional
        Factor (default 1) and offset (default 0, in file units).

    Returns
    -------
    xarray.DataArray
        Lazy float32, same dims, coords, chunks and attrs, ``stages`` += ``{"stage": "scale_shift", ...}``.

    Examples
    --------
    >>> from spikearray.synthetic import generate_recording
    >>> rec, _ = generate_recording(duration=0.5, n_channels=8, n_units=1)
    >>> out = scale_shift(rec, scale=2.0, shift=1.0)
    >>> bool(np.allclose(out.values, rec.values * 2.0 + 1.0))
    True
    """
    if scale is None and shift is None:
        return rec
    a = np.float32(1.0 if scale is None else scale)
    b = np.float32(0.0 if shift is None else shift)
    data = as_dask(rec).map_blocks(lambda x: x.astype(np.float32) * a + b, dtype=np.float32,
                                   meta=np.empty((0, 0), np.float32))
    attrs = dict(rec.attrs)
    attrs["stages"] = [dict(st) for st in rec.attrs.get("stages", [])] + [
        {"stage": "scale_shift", "scale": float(a), "shift": float(b)}]
    return wrap_like(rec, data, attrs)


def estimate_windows(n_samples: int, *, batch_size: int, nskip: int, seed: int,
                     batch_downsampling: int = 1) -> list[tuple[int, int]]:
    """The ``batch_size`` windows the global estimates (whitening, bad channels) read.

    Kilosort4 with ``batch_downsampling = k`` uses only batches ``0, k, 2k, ...``, and the whitening every
    ``nskip``-th of those. :func:`._graph.sample_windows` picks among the used batches; its indices are then
    mapped back to the recording's batches. ``k = 1`` gives :func:`._graph.sample_windows` unchanged.

    Returns
    -------
    list of (start, stop)
        Sample ranges, in order; the last may be shorter.
    """
    k = int(batch_downsampling)
    if k == 1:
        return sample_windows(n_samples, batch_size=batch_size, nskip=nskip, seed=seed)
    n_batches = max(1, -(-int(n_samples) // int(batch_size)))
    n_used = -(-n_batches // k)
    used = sample_windows(n_used * batch_size, batch_size=batch_size, nskip=nskip, seed=seed)
    return [(a // batch_size * k * batch_size, min(n_samples, (a // batch_size * k + 1) * batch_size))
            for a, _ in used]


def artifact_batches(data: da.Array, hp_run, halo: int, *, batch_size: int, threshold: float, do_car: bool,
                     device, threads) -> "dask.delayed":
    """Delayed bool array ``(n_batches,)``: does batch ``b`` (samples ``[b·batch_size, (b+1)·batch_size)``) reach
    ``|x| ≥ threshold`` once filtered and referenced (µV, before whitening)?

    Batches are fixed sample windows, each read with its filter halo straight from the recording, so the
    answer does not depend on the dask chunking (Kilosort4 §2.2 step 5 tests its own batches).
    """
    n_total = int(data.shape[0])
    n_batches = max(1, -(-n_total // int(batch_size)))

    def one(x: np.ndarray, start: int, pad_left: int, pad_right: int) -> bool:
        y = hp_run(x, start, pad_left, pad_right, start == 0, start + len(x) == n_total)
        core = y[pad_left:len(y) - pad_right]
        if do_car:
            core = median_subtract(core, device=device, threads=threads, out=core)
        return bool(np.abs(core).max() >= threshold) if core.size else False

    tasks = []
    for b in range(n_batches):
        a, e = b * batch_size, min(n_total, (b + 1) * batch_size)
        pl, pr = min(halo, a), min(halo, n_total - e)
        tasks.append(dask.delayed(one)(data[a - pl:e + pr], a - pl, pl, pr))
    return dask.delayed(lambda *f: np.asarray(f, dtype=bool))(*tasks)


def _zero_batches(data: da.Array, flags, batch_size: int) -> da.Array:
    """``data`` with every row of a flagged batch set to 0 (blockwise; ``flags``: bool ndarray (n_batches,))."""
    starts = np.concatenate([[0], np.cumsum(data.chunks[0])[:-1]]).astype(int)

    def block(x: np.ndarray, fl: np.ndarray, block_info=None) -> np.ndarray:
        a = int(starts[block_info[0]["chunk-location"][0]])
        b0, b1 = a // batch_size, -(-(a + len(x)) // batch_size)
        hit = [b for b in range(b0, min(b1, len(fl))) if fl[b]]
        if not hit:
            return x
        x = x.copy()
        for b in hit:
            x[max(b * batch_size - a, 0):max(min((b + 1) * batch_size - a, len(x)), 0)] = 0.0
        return x

    return da.map_blocks(block, data, fl=flags, dtype=np.float32, meta=np.empty((0, 0), np.float32))


def preprocess(rec: xr.DataArray, settings: Settings | None = None, *, dead_threshold: float = 0.1,
               noisy_threshold: float = 5.0) -> tuple[xr.DataArray, xr.DataArray]:
    """Kilosort4's preprocessing as one lazy stage: filtered, referenced, whitened traces and the matrix.

    Per chunk (one dask task, halo'd for the filter): ``samples*scale + shift`` when ``settings.scale`` /
    ``settings.shift`` are set, scale counts to µV (× −1 if ``settings.invert_sign``), zero-phase Butterworth
    high-pass at ``settings.highpass_cutoff``, subtract the median across channels (``settings.do_CAR``), whiten
    with the local ZCA matrix. Before building that graph, the few global estimates are computed in one pass
    over a deterministic sample of ``batch_size`` windows (every ``nskip``-th of every ``batch_downsampling``-th
    batch, at least 4): per-channel robust noise of the filtered data (dead/noisy channels, see
    :func:`detect_bad_channels`) and the covariance of the referenced data (:func:`whitening_matrix`).

    With a finite ``settings.artifact_threshold`` (µV), every batch ``[b·batch_size, (b+1)·batch_size)`` whose
    filtered, referenced data reach it is zeroed in the output (Kilosort4 §2.2) and left out of the estimates.
    Batches are fixed sample windows, so which samples are zeroed does not depend on the chunking; the test
    costs one extra filter pass (lazy, computed with the output). A non-default ``settings.fs`` is checked
    against the recording's rate (:func:`check_sampling_rate`).

    Order. Kilosort4 subtracts each channel's batch mean, then the median, then filters. The median is not linear,
    so referencing before filtering depends on the offsets removed first — and a per-chunk mean makes the
    result depend on the chunking. Filtering first removes the offsets (and LFP) exactly and chunk-independently,
    so the median sees only the spike-band signal. This is also SpikeInterface's order; the whitened output is
    chunk-invariant.

    Parameters
    ----------
    rec : xarray.DataArray, dims (time, channel)
        Raw recording (int16 counts or float µV).
    settings : Settings, optional
        Uses ``fs`` (checked), ``scale``, ``shift``, ``highpass_cutoff``, ``do_CAR``, ``invert_sign``,
        ``artifact_threshold``, ``whitening_range``, ``nskip``, ``batch_size``, ``batch_downsampling``, ``seed``,
        ``device``, ``torch_threads``.
    dead_threshold, noisy_threshold : float
        See :func:`detect_bad_channels`.

    Returns
    -------
    traces : xarray.DataArray
        Lazy float32, whitened units (noise ≈ 1), same coords and chunks as ``rec``; attrs ``units="whitened"``,
        ``stages`` (highpass, common_reference, whiten records), ``bad_channels`` (dead/noisy channel ids).
    matrix : xarray.DataArray, dims ("channel", "channel_out")
        The whitening matrix (see :func:`whitening_matrix`), for unwhitening templates and Phy.

    Examples
    --------
    >>> import spikearray as sa
    >>> from spikearray.synthetic import generate_recording
    >>> rec, _ = generate_recording(duration=2.0, n_channels=16, n_units=2)
    >>> white, W = preprocess(rec, sa.Settings(batch_size=15000))
    >>> white.attrs["units"], W.dims
    ('whitened', ('channel', 'channel_out'))
    """
    rec = check_recording(rec, "preprocess")
    settings = Settings() if settings is None else settings
    if not isinstance(settings, Settings):
        raise SettingsError(f"settings must be a spikearray.Settings, got {type(settings).__name__}; use "
                            "Settings(**ks4_dict).")
    check_sampling_rate(rec, settings)
    rec = scale_shift(rec, scale=settings.scale, shift=settings.shift)
    dev = settings.device  # a string: "auto" is resolved inside each block, where it runs
    threads = settings.torch_threads or default_torch_threads()
    sign = -1.0 if settings.invert_sign else 1.0
    hp_run, halo, hp_record = highpass_stage(rec, cutoff=float(settings.highpass_cutoff), order=3, device=dev,
                                             threads=threads, sign=sign)
    car_run, car_record = reference_stage(rec, operator="median", device=dev, threads=threads)
    do_car = bool(settings.do_CAR)
    data = as_dask(rec)

    # lazy referenced traces: only needed again if dead channels push a neighbourhood outside the banded pairs
    hp_data = map_time_overlap(hp_run, data, halo)
    ref = wrap_like(rec, map_time_blocks(car_run, hp_data) if do_car else hp_data,
                    derive_attrs(rec, units="uV", stages=[hp_record]))
    batch_size = int(settings.batch_size)
    windows = estimate_windows(rec.sizes["time"], batch_size=batch_size, nskip=int(settings.nskip),
                               seed=int(settings.seed), batch_downsampling=int(settings.batch_downsampling))
    threshold = float(settings.artifact_threshold)
    pairs = needed_pairs(whitening_neighbourhoods(rec, int(settings.whitening_range)))
    tasks = _window_estimates(data, windows, hp_run, halo, do_car=do_car, device=dev, threads=threads,
                              cov_blocks=band_blocks(pairs), artifact_threshold=threshold)
    results = compute_tasks(tasks, desc="whitening")  # the sampled windows, on the current client or threads
    clean = [i for i, r in enumerate(results) if r is not None]
    if not clean:
        raise DataError(f"artifact_threshold={threshold:g} µV flags every window sampled for the whitening "
                        f"({len(windows)} windows of {batch_size} samples): nothing is left to estimate the noise "
                        "from. Raise artifact_threshold (it compares with the filtered data in µV) or leave it "
                        "at inf.")
    windows = [windows[i] for i in clean]
    covs = [(results[i][0], results[i][1]) for i in clean]
    sds = [results[i][2] for i in clean]
    bad = classify_bad_channels(ref, sds, dead_threshold=dead_threshold, noisy_threshold=noisy_threshold)
    warn_bad_channels(bad, what="preprocess")
    matrix = matrix_from_estimates(ref, covs, bad, whitening_range=int(settings.whitening_range),
                                   nskip=int(settings.nskip), batch_size=int(settings.batch_size), windows=windows,
                                   eps=1e-6, symmetric=True, pairs=pairs)
    w = np.ascontiguousarray(matrix.values, dtype=np.float32)
    blocks = band_blocks(w)

    def fused(x: np.ndarray, start: int, pad_left: int, pad_right: int, at_start: bool, at_end: bool) -> np.ndarray:
        y = hp_run(x, start, pad_left, pad_right, at_start, at_end)
        # the halo rows are trimmed by dask afterwards; skip referencing/whitening them
        core = y[pad_left:len(y) - pad_right]
        if resolve_device(dev).type == "cpu":
            reference_whiten_inplace(core, w, blocks, median=do_car, threads=threads)
            return y
        if do_car:
            core = car_run(core, start + pad_left)
        y[pad_left:len(y) - pad_right] = whiten_block(core, w, blocks, device=dev, threads=threads)
        return y

    stages = []
    if settings.invert_sign:
        stages.append({"stage": "invert_sign"})
    stages += [hp_record] + ([car_record] if do_car else []) + [whiten_record(matrix)]
    out = map_time_overlap(fused, data, halo)
    if math.isfinite(threshold):
        # computed here, once: a lazy flag array shared by every output chunk would be recomputed (the whole
        # recording filtered again) by each window of chunks that the int16 copy computes
        flags = np.asarray(compute_tasks([artifact_batches(data, hp_run, halo, batch_size=batch_size,
                                                           threshold=threshold, do_car=do_car, device=dev,
                                                           threads=threads)], desc="artifacts")[0], dtype=bool)
        out = _zero_batches(out, flags, batch_size)
        stages.append({"stage": "artifact_zeroing", "artifact_threshold": threshold, "batch_size": batch_size,
                       "units": "uV"})
    attrs = derive_attrs(rec, units="whitened", stages=stages,
                         extra={"bad_channels": {"dead": bad["dead"], "noisy": bad["noisy"]}})
    return wrap_like(rec, out, attrs), matrix


def _window_estimates(data, windows: list[tuple[int, int]], hp_run, halo: int, *, do_car: bool, device, threads,
                      cov_blocks, artifact_threshold: float = math.inf) -> list:
    """One delayed task per sampled window: ``(X.T @ X of the referenced window, n_samples, robust SD of the filtered
    window per channel)``, or ``None`` for a window whose referenced data reach ``artifact_threshold`` (such a
    batch is zeroed in the output, so it must not shape the noise estimates either).

    Each task reads its window plus the filter halo straight from the recording and filters it once, whatever the
    chunking (the windows are in samples; going through the chunked filtered array would filter every chunk a
    window touches, and its neighbours' reads, several times over).
    """
    n_total = int(data.shape[0])

    def one(x: np.ndarray, start: int, pad_left: int, pad_right: int) -> tuple[np.ndarray, int, np.ndarray] | None:
        y = hp_run(x, start, pad_left, pad_right, start == 0, start + len(x) == n_total)
        core = y[pad_left:len(y) - pad_right]
        sd = robust_sd(core)
        if do_car:
            core = median_subtract(core, device=device, threads=threads, out=core)
        if math.isfinite(artifact_threshold) and core.size and np.abs(core).max() >= artifact_threshold:
            return None
        return covariance_block(core, device=device, threads=threads, blocks=cov_blocks), len(core), sd

    tasks = []
    for a, b in windows:
        pl, pr = min(halo, a), min(halo, n_total - b)
        tasks.append(dask.delayed(one)(data[a - pl:b + pr], a - pl, pl, pr))
    return tasks
