"""``preprocess``: high-pass → common median reference → local whitening, fused into one pass per chunk."""

from __future__ import annotations

import dask
import numpy as np
import xarray as xr

from .._compute import default_torch_threads, resolve_device
from ..errors import SettingsError
from ..settings import Settings
from ._common import check_recording, derive_attrs
from ._graph import as_dask, map_time_blocks, map_time_overlap, sample_windows, wrap_like
from ._kernels import band_blocks, covariance_block, median_subtract, reference_whiten_inplace, whiten_block
from .bad_channels import classify_bad_channels, robust_sd, warn_bad_channels
from .filters import highpass_stage
from .reference import reference_stage
from .whitening import matrix_from_estimates, needed_pairs, neighbourhoods, whiten_record

__all__ = ["preprocess"]


def preprocess(rec: xr.DataArray, settings: Settings | None = None, *, dead_threshold: float = 0.1,
               noisy_threshold: float = 5.0) -> tuple[xr.DataArray, xr.DataArray]:
    """Kilosort4's preprocessing as one lazy stage: filtered, referenced, whitened traces and the matrix.

    Per chunk (one dask task, halo'd for the filter): scale counts to µV (× −1 if ``settings.invert_sign``),
    zero-phase Butterworth high-pass at ``settings.highpass_cutoff``, subtract the median across channels
    (``settings.do_CAR``), whiten with the local ZCA matrix. Before building that graph, the few global
    estimates are computed in one pass over a deterministic sample of ``batch_size`` windows (every
    ``nskip``-th, at least 4): per-channel robust noise of the filtered data (dead/noisy channels, see
    :func:`detect_bad_channels`) and the covariance of the referenced data (:func:`whitening_matrix`).

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
        Uses ``highpass_cutoff``, ``do_CAR``, ``invert_sign``, ``whitening_range``, ``nskip``, ``batch_size``,
        ``seed``, ``device``, ``torch_threads``.
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
    dev = resolve_device(settings.device)
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
    windows = sample_windows(rec.sizes["time"], batch_size=int(settings.batch_size), nskip=int(settings.nskip),
                             seed=int(settings.seed))
    pairs = needed_pairs(neighbourhoods(rec["x"].values, rec["y"].values, int(settings.whitening_range)))
    tasks = _window_estimates(data, windows, hp_run, halo, do_car=do_car, device=dev, threads=threads,
                              cov_blocks=band_blocks(pairs))
    results = dask.compute(*tasks)
    covs = [(cov, n) for cov, n, _ in results]
    sds = [sd for _, _, sd in results]
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
        if dev.type == "cpu":
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
    attrs = derive_attrs(rec, units="whitened", stages=stages,
                         extra={"bad_channels": {"dead": bad["dead"], "noisy": bad["noisy"]}})
    return wrap_like(rec, map_time_overlap(fused, data, halo), attrs), matrix


def _window_estimates(data, windows: list[tuple[int, int]], hp_run, halo: int, *, do_car: bool, device, threads,
                      cov_blocks) -> list:
    """One delayed task per sampled window: ``(X.T @ X of the referenced window, n_samples, robust SD of the filtered
    window per channel)``.

    Each task reads its window plus the filter halo straight from the recording and filters it once, whatever the
    chunking (the windows are in samples; going through the chunked filtered array would filter every chunk a
    window touches, and its neighbours' reads, several times over).
    """
    n_total = int(data.shape[0])

    def one(x: np.ndarray, start: int, pad_left: int, pad_right: int) -> tuple[np.ndarray, int, np.ndarray]:
        y = hp_run(x, start, pad_left, pad_right, start == 0, start + len(x) == n_total)
        core = y[pad_left:len(y) - pad_right]
        sd = robust_sd(core)
        if do_car:
            core = median_subtract(core, device=device, threads=threads, out=core)
        return covariance_block(core, device=device, threads=threads, blocks=cov_blocks), len(core), sd

    tasks = []
    for a, b in windows:
        pl, pr = min(halo, a), min(halo, n_total - b)
        tasks.append(dask.delayed(one)(data[a - pl:b + pr], a - pl, pl, pr))
    return tasks
