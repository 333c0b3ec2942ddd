"""Dead and very noisy channels, from a robust noise level measured on a deterministic sample of the recording."""

from __future__ import annotations

import warnings

import dask
import numpy as np
import xarray as xr

from ..errors import SettingsError
from ._common import check_recording, json_friendly
from .._engine import compute_tasks
from ._graph import as_dask, sample_windows

__all__ = ["detect_bad_channels", "BadChannelWarning", "bad_channel_tasks", "classify_bad_channels",
           "warn_bad_channels"]


class BadChannelWarning(UserWarning):
    """Dead or very noisy channels were found (they are listed in the output's ``bad_channels`` attr)."""


def robust_sd(x: np.ndarray) -> np.ndarray:
    """Per-channel robust noise SD ``median(|x|) / 0.6745`` of a ``(n, c)`` block (every 8th sample), µV."""
    # every 8th sample is plenty for a per-channel median and keeps this cheap next to the filtering itself
    sub = np.abs(np.asarray(x[::8], dtype=np.float32)).T.copy()  # channel-major: median along contiguous rows
    return np.median(sub, axis=1) / 0.6745


def bad_channel_tasks(rec: xr.DataArray, windows: list[tuple[int, int]]) -> list:
    """Delayed per-window robust SDs ``(n_channels,)`` of ``rec`` (already high-passed)."""
    data = as_dask(rec)
    return [dask.delayed(robust_sd)(data[a:b]) for a, b in windows]


def classify_bad_channels(rec: xr.DataArray, sds: list[np.ndarray], *, dead_threshold: float,
                          noisy_threshold: float) -> dict:
    """Turn per-window robust SDs into the report of :func:`detect_bad_channels`."""
    noise = np.median(np.stack(sds), axis=0) if sds else np.zeros(rec.sizes["channel"])
    ref = float(np.median(noise))
    ids = rec["channel"].values
    dead = noise <= dead_threshold * ref
    noisy = (noise >= noisy_threshold * ref) & ~dead
    return json_friendly({
        "dead": ids[dead].tolist(),
        "noisy": ids[noisy].tolist(),
        "noise": noise.astype(float).round(6).tolist(),
        "median_noise": ref,
        "units": rec.attrs.get("units", ""),
        "measure": "robust SD (median |x| / 0.6745) of the high-passed signal on sampled windows",
        "dead_threshold": float(dead_threshold),
        "noisy_threshold": float(noisy_threshold),
    })


def detect_bad_channels(rec: xr.DataArray, *, dead_threshold: float = 0.1, noisy_threshold: float = 5.0,
                        batch_size: int = 60000, nskip: int = 25, seed: int = 0, cutoff: float = 300.0,
                        device: str = "auto") -> dict:
    """Find dead (flat or all-zero) and very noisy channels.

    The measure is each channel's robust noise SD (``median(|x|)/0.6745``, insensitive to spikes) of the
    high-passed signal, on the same deterministic sample of ``batch_size`` windows that the whitening uses. A
    recording that is not high-passed yet (no ``highpass`` in ``attrs["stages"]``) is filtered at ``cutoff``
    first, lazily, for the sampled windows only.

    Parameters
    ----------
    rec : xarray.DataArray, dims (time, channel)
    dead_threshold : float
        Dead if the noise is at most this fraction of the median channel noise (a constant or all-zero channel
        has noise 0).
    noisy_threshold : float
        Noisy if the noise is at least this multiple of the median channel noise.
    batch_size, nskip, seed : int
        Window length (samples) and sampling stride, see :func:`whitening_matrix`.

    Returns
    -------
    dict
        ``dead`` and ``noisy`` (lists of channel ids), ``noise`` (per channel, input units: µV for raw or
        filtered data), ``median_noise``, ``measure``, the thresholds. JSON-friendly.

    Notes
    -----
    Apply it before the common reference: after subtracting the median across channels a dead channel carries
    minus the median and is no longer flat (:func:`preprocess` does this in the right order).
    """
    rec = check_recording(rec, "detect_bad_channels")
    if not (0 <= dead_threshold < 1) or noisy_threshold <= 1:
        raise SettingsError(f"dead_threshold={dead_threshold!r}, noisy_threshold={noisy_threshold!r}; expected "
                            "0 <= dead_threshold < 1 < noisy_threshold (defaults 0.1 and 5).")
    if not any(s.get("stage") == "highpass" for s in rec.attrs.get("stages", [])):
        from .filters import highpass

        rec = highpass(rec, cutoff, device=device)
    windows = sample_windows(rec.sizes["time"], batch_size=batch_size, nskip=nskip, seed=seed)
    sds = compute_tasks(bad_channel_tasks(rec, windows), desc="bad channels")
    return classify_bad_channels(rec, sds, dead_threshold=dead_threshold, noisy_threshold=noisy_threshold)


def warn_bad_channels(report: dict, *, what: str) -> None:
    """One :class:`BadChannelWarning` listing dead and noisy channels, if any."""
    if report["dead"] or report["noisy"]:
        warnings.warn(f"{what}: dead channels {report['dead']} (left out of every whitening neighbourhood and "
                      f"passed through with weight 1), very noisy channels {report['noisy']} (noise ≥ "
                      f"{report['noisy_threshold']:g}× the median {report['median_noise']:.3g}; kept). Consider "
                      "dropping them with rec.drop_sel(channel=[...]).", BadChannelWarning, stacklevel=3)
