"""Seeded ground-truth recordings, numpy only: what the tests, the demo and the drift checks sort.

The generator plants units with spatially decaying multi-channel waveforms of varied shapes and amplitudes,
Poisson firing with a refractory period, spatially correlated noise, a common-mode slow signal plus per-channel
offsets (so high-pass and common reference have work to do), and optional rigid or non-rigid drift that moves
units along ``y``. Every sample is a pure function of ``(seed, sample index)``: noise comes from fixed
one-second generation blocks seeded by their index and spikes from a global spike table, so any chunking
gives bit-identical data.

The recording comes back as a lazy int16 DataArray (like a file opened with :func:`open_recording`) and can
be written as a SpikeGLX ``.bin`` + ``.meta`` pair with :func:`write_spikeglx`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import dask.array as da
import numpy as np
import xarray as xr

from .errors import SpikearrayError
from .io.probes import ProbeLayout
from .io.recording import make_recording

__all__ = ["generate_recording", "write_spikeglx", "probe_layout", "displacement_at"]

# SpikeGLX ADC constants of the two probe families the generator imitates (formats.md §1.4).
_ADC = {"np1": dict(range_max=0.6, max_int=512, gain=500.0, ptype=0, pn="NP1000", pitch=20.0),
        "np2": dict(range_max=0.5, max_int=8192, gain=80.0, ptype=21, pn="NP2000", pitch=15.0)}


#: Layouts besides the ADC kinds: a four-shank Neuropixels 2.0-like probe (shanks 250 µm apart, NP2.0 ADC)
_MULTI = {"np2-4shank": ("np2", 4, 250.0)}


def _adc(layout: str) -> dict:
    return _ADC[_MULTI[layout][0]] if layout in _MULTI else _ADC[layout]


def _uv_per_bit(layout: str) -> float:
    a = _adc(layout)
    return 1e6 * a["range_max"] / a["max_int"] / a["gain"]


def probe_layout(n_channels: int, layout: Literal["np1", "np2", "np2-4shank"] = "np1") -> ProbeLayout:
    """Contact positions of the first ``n_channels`` channels of a Neuropixels-like probe (bank 0).

    NP1.0: two contacts per 20 µm row, staggered (x 27/59 µm on even rows, 11/43 µm on odd rows). NP2.0: two
    aligned columns (x 27/59 µm), 15 µm rows. ``"np2-4shank"``: NP2.0 four-shank, the channels split evenly
    over shanks 0–3 whose columns sit 250 µm apart (x 27/59 µm + 250 µm × shank). Coordinates are SpikeGLX's
    (x from the first shank's edge, y above the lowest row), so a written ``.meta`` reproduces them.
    """
    if layout not in _ADC and layout not in _MULTI:
        raise SpikearrayError(f"layout={layout!r}; expected 'np1', 'np2' or 'np2-4shank'.")
    i = np.arange(n_channels)
    shank = np.zeros(n_channels, int)
    if layout in _MULTI:
        _, n_shanks, spacing = _MULTI[layout]
        if n_channels % (2 * n_shanks):
            raise SpikearrayError(f"layout={layout!r} needs n_channels divisible by {2 * n_shanks} (two columns on "
                                  f"each of {n_shanks} shanks); got {n_channels}.")
        per = n_channels // n_shanks
        shank, local = i // per, i % per
        row, col = local // 2, local % 2
        x = 27.0 + 32.0 * col + spacing * shank
    else:
        row, col = i // 2, i % 2
        x = np.where(row % 2 == 0, 27.0, 11.0) + 32.0 * col if layout == "np1" else 27.0 + 32.0 * col
    y = _adc(layout)["pitch"] * row
    ids = np.array([f"s{sh}e{k}" if layout in _MULTI else f"e{k}" for k, sh in zip(i, shank)])
    name = {"np1": "NP1.0-like", "np2": "NP2.0-like"}.get(layout, "NP2.0-4-shank-like")
    return ProbeLayout(i, x, y.astype(float), shank.astype(int), ids, name)


def _zigzag(t: np.ndarray, period: float, amplitude: float) -> np.ndarray:
    """Triangle wave of peak-to-peak ``amplitude`` (µm), 0 at t=0, rising first."""
    phase = np.mod(t / period + 0.25, 1.0)
    return amplitude * (2.0 * np.abs(phase - 0.5) - 0.5) * -1.0


def displacement_at(t: np.ndarray, y: np.ndarray, *, drift: str | None, drift_um: float, drift_period: float,
                    y_range: tuple[float, float]) -> np.ndarray:
    """True displacement (µm, towards larger y) at times ``t`` (s) for units at rest depth ``y`` (µm).

    Rigid: one zigzag for all depths. Non-rigid: the zigzag scaled linearly from 30 % at the bottom of the
    probe (``y_range[0]``) to 100 % at the top, as in the public GT-B set.
    """
    t = np.asarray(t, dtype=float)
    y = np.asarray(y, dtype=float)
    if drift is None:
        return np.zeros(np.broadcast_shapes(t.shape, y.shape))
    base = _zigzag(t, drift_period, drift_um)
    if drift == "rigid":
        return np.broadcast_to(base, np.broadcast_shapes(t.shape, y.shape)).copy()
    lo, hi = y_range
    frac = np.clip((y - lo) / max(hi - lo, 1e-9), 0.0, 1.0)
    return base * (0.3 + 0.7 * frac)


def _waveforms(rng: np.random.Generator, n_units: int, nt: int, nt0: int, fs: float) -> np.ndarray:
    """Unit-ptp single-channel waveforms (n_units, nt): a sharp trough and a slower, smaller repolarisation."""
    t = (np.arange(nt) - nt0) / fs * 1e3  # ms relative to the trough
    out = np.empty((n_units, nt))
    for u in range(n_units):
        s_n = rng.uniform(0.08, 0.20)
        r = rng.uniform(0.2, 0.55)
        d = rng.uniform(0.25, 0.6)
        s_p = rng.uniform(0.15, 0.45)
        pre = rng.uniform(0.0, 0.15)
        w = -np.exp(-0.5 * (t / s_n) ** 2) + r * np.exp(-0.5 * ((t - d) / s_p) ** 2)
        w += pre * np.exp(-0.5 * ((t + 0.25) / 0.1) ** 2)
        w -= np.linspace(w[0], w[-1], nt)  # zero at both ends so spikes add no steps
        out[u] = w / (w.max() - w.min())
    return out


def _footprint(ux: np.ndarray, uy: np.ndarray, uz: np.ndarray, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
    """Relative amplitude (n, C) of units at (ux, uy, uz) on contacts (cx, cy): a squared-monopole decay."""
    d2 = (ux[:, None] - cx[None, :]) ** 2 + (uy[:, None] - cy[None, :]) ** 2
    z2 = uz[:, None] ** 2
    return z2 / (z2 + d2)


def _spike_trains(rng: np.random.Generator, rates: np.ndarray, n_samples: int, fs: float, refractory_s: float,
                  margin: int) -> tuple[np.ndarray, np.ndarray]:
    times, units = [], []
    dur = n_samples / fs
    for u, rate in enumerate(rates):
        # Poisson process with dead time: ISI = refractory + exponential, mean ISI = 1/rate.
        scale = max(1.0 / rate - refractory_s, 1e-4)
        n_draw = int(dur * rate * 1.5) + 20
        isi = refractory_s + rng.exponential(scale, n_draw)
        t = np.cumsum(isi) + rng.uniform(0, 1.0 / rate)
        t = t[t < dur]
        s = np.round(t * fs).astype(np.int64)
        s = s[(s >= margin) & (s < n_samples - margin)]
        times.append(s)
        units.append(np.full(len(s), u, dtype=np.int64))
    t_all = np.concatenate(times) if times else np.zeros(0, np.int64)
    u_all = np.concatenate(units) if units else np.zeros(0, np.int64)
    order = np.lexsort((u_all, t_all))
    return t_all[order], u_all[order]


class _Renderer:
    """Computes any sample range of the synthetic recording (µV, float64) from global state."""

    BLOCK_S = 1.0

    def __init__(self, *, fs, n_samples, cx, cy, noise_uV, chol, seed, offsets, common_uV, spike_time, spike_unit,
                 spike_scale, waveforms, ux, uy, uz, amp, drift_kw, nt0):
        self.__dict__.update(locals())
        del self.__dict__["self"]
        self.block = int(round(self.BLOCK_S * fs))
        self.nt = waveforms.shape[1]

    def _noise_block(self, b: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 7, b])
        n = min(self.block, self.n_samples - b * self.block)
        white = rng.standard_normal((n, len(self.cx)))
        return (white @ self.chol.T) * self.noise_uV

    def render(self, s0: int, s1: int) -> np.ndarray:
        out = np.empty((s1 - s0, len(self.cx)))
        for b in range(s0 // self.block, (s1 - 1) // self.block + 1):
            nb = self._noise_block(b)
            b0 = b * self.block
            lo, hi = max(s0, b0), min(s1, b0 + len(nb))
            out[lo - s0:hi - s0] = nb[lo - b0:hi - b0]
        t = np.arange(s0, s1) / self.fs
        slow = self.common_uV * (np.sin(2 * np.pi * 1.3 * t) + 0.5 * np.sin(2 * np.pi * 7.1 * t + 1.0))
        out += slow[:, None] + self.offsets[None, :]
        i0 = np.searchsorted(self.spike_time, s0 - self.nt, side="left")
        i1 = np.searchsorted(self.spike_time, s1 + self.nt, side="right")
        if i1 > i0:
            st = self.spike_time[i0:i1]
            su = self.spike_unit[i0:i1]
            disp = displacement_at(st / self.fs, self.uy[su], **self.drift_kw)
            fp = _footprint(self.ux[su], self.uy[su] + disp, self.uz[su], self.cx, self.cy)
            fp *= (self.amp[su] * self.spike_scale[i0:i1])[:, None]
            for k in range(len(st)):
                a = st[k] - self.nt0 - s0
                w = self.waveforms[su[k]]
                lo, hi = max(a, 0), min(a + self.nt, s1 - s0)
                if lo < hi:
                    out[lo:hi] += np.outer(w[lo - a:hi - a], fp[k])
        return out


def generate_recording(duration: float = 30.0, n_channels: int = 32, n_units: int = 10, *,
                       layout: Literal["np1", "np2", "np2-4shank"] = "np1", noise_uV: float = 10.0,
                       drift: str | None = None,
                       drift_um: float = 30.0, drift_period: float | None = None, sampling_rate: float = 30000.0,
                       firing_rates: tuple[float, float] = (3.0, 12.0), amplitudes_uV: tuple[float, float] = (50.0, 400.0),
                       refractory_ms: float = 2.5, amplitude_jitter: float = 0.05, common_uV: float = 30.0,
                       noise_decay_um: float = 25.0, seed: int = 0,
                       chunk_seconds: float = 2.0) -> tuple[xr.DataArray, xr.Dataset]:
    """Make a synthetic recording and its ground truth.

    Parameters
    ----------
    duration : float
        Seconds.
    n_channels : int
        Contacts (2 per row, bank 0 of a Neuropixels-like probe).
    n_units : int
    layout : {"np1", "np2", "np2-4shank"}
        Probe geometry and ADC scale (NP1.0: 2.34375 µV/bit; NP2.0: 0.762939 µV/bit). ``"np2-4shank"``: the
        channels spread evenly over four NP2.0 shanks 250 µm apart, each unit beside one shank
        (``unit_shank`` in the truth).
    noise_uV : float
        RMS of the (spatially correlated, temporally white) noise, µV.
    drift : {None, "rigid", "nonrigid"}
        Zigzag drift along y; non-rigid scales it from 30 % (bottom) to 100 % (top of the probe).
    drift_um : float
        Peak-to-peak drift amplitude, µm.
    drift_period : float, optional
        Zigzag period, s (default: ``min(60, duration / 2)``).
    firing_rates : (float, float)
        Range of unit firing rates, Hz (uniform).
    amplitudes_uV : (float, float)
        Range of peak-to-peak amplitudes on the best channel at rest, µV (log-uniform).
    refractory_ms : float
        Dead time after each spike of a unit.
    amplitude_jitter : float
        Relative SD of per-spike amplitude variation.
    common_uV : float
        Amplitude of a slow (1.3 and 7.1 Hz) common-mode signal; per-channel DC offsets of up to ±200 µV are
        added too.
    noise_decay_um : float
        Spatial correlation length of the noise: covariance ``exp(-d / noise_decay_um)``.
    seed : int
    chunk_seconds : float
        Dask chunk length of the returned recording.

    Returns
    -------
    recording : xarray.DataArray
        Lazy int16 ``(time, channel)`` recording with ``gain_to_uV`` attr, like :func:`open_recording` gives.
    truth : xarray.Dataset
        ``spike_time`` (spike, samples of the trough), ``spike_unit``, ``unit_x``/``unit_y``/``unit_z`` (µm,
        at rest), ``unit_ptp_uV``, ``unit_best_channel``, ``unit_firing_rate`` (Hz), ``template``
        (unit, sample, channel) µV at rest, ``displacement`` (drift_time, depth) µm and
        ``unit_displacement`` (drift_time, unit) µm.

    Examples
    --------
    >>> rec, truth = generate_recording(duration=2.0, n_channels=16, n_units=3, seed=1)
    >>> rec.sizes["channel"], int(truth.sizes["unit"])
    (16, 3)
    """
    if duration <= 0 or n_channels < 1 or n_units < 0:
        raise SpikearrayError(
            f"generate_recording needs duration > 0, n_channels >= 1 and n_units >= 0; got {duration}, "
            f"{n_channels}, {n_units}."
        )
    if drift not in (None, "rigid", "nonrigid"):
        raise SpikearrayError(f"drift={drift!r}; expected None, 'rigid' or 'nonrigid'.")
    fs = float(sampling_rate)
    n_samples = int(round(duration * fs))
    nt = int(round(61 * fs / 30000)) | 1
    nt0 = int(20 * nt / 61)
    probe = probe_layout(n_channels, layout)
    cx, cy = probe.x, probe.y
    rng = np.random.default_rng([seed, 1])

    ylo, yhi = float(cy.min()), float(cy.max())
    margin_y = min(20.0, (yhi - ylo) / 4)
    # units sit beside a shank: x within the shank's 70 µm (one shank at x 0–70 µm unless multi-shank)
    # (the shank draw has its own stream, so single-shank recordings keep their bits)
    home = np.random.default_rng([seed, 4]).integers(0, int(probe.shank.max()) + 1, n_units)
    ux = rng.uniform(5.0, 65.0, n_units) + (_MULTI[layout][2] * home if layout in _MULTI else 0.0)
    uy = rng.uniform(ylo + margin_y, yhi - margin_y, n_units) if yhi > ylo else np.full(n_units, ylo)
    uz = rng.uniform(18.0, 35.0, n_units)
    ptp = np.exp(rng.uniform(np.log(amplitudes_uV[0]), np.log(amplitudes_uV[1]), n_units))
    rates = rng.uniform(firing_rates[0], firing_rates[1], n_units)
    waveforms = _waveforms(rng, n_units, nt, nt0, fs)
    rest_fp = _footprint(ux, uy, uz, cx, cy)
    amp = ptp / rest_fp.max(axis=1) if n_units else ptp  # best channel at rest has the planted ptp
    spike_time, spike_unit = _spike_trains(rng, rates, n_samples, fs, refractory_ms / 1e3, nt)
    spike_scale = 1.0 + amplitude_jitter * np.random.default_rng([seed, 2]).standard_normal(len(spike_time))
    d = np.sqrt((cx[:, None] - cx[None, :]) ** 2 + (cy[:, None] - cy[None, :]) ** 2)
    chol = np.linalg.cholesky(np.exp(-d / noise_decay_um) + 1e-9 * np.eye(n_channels))
    offsets = np.random.default_rng([seed, 3]).uniform(-200, 200, n_channels)
    period = float(drift_period) if drift_period else min(60.0, duration / 2)
    drift_kw = dict(drift=drift, drift_um=float(drift_um), drift_period=period, y_range=(ylo, yhi))

    renderer = _Renderer(fs=fs, n_samples=n_samples, cx=cx, cy=cy, noise_uV=float(noise_uV), chol=chol, seed=seed,
                         offsets=offsets, common_uV=float(common_uV), spike_time=spike_time, spike_unit=spike_unit,
                         spike_scale=spike_scale, waveforms=waveforms, ux=ux, uy=uy, uz=uz, amp=amp,
                         drift_kw=drift_kw, nt0=nt0)
    gain = _uv_per_bit(layout)
    rows = max(1, int(round(chunk_seconds * fs)))
    chunks = tuple(min(rows, n_samples - s) for s in range(0, n_samples, rows))

    def block(block_info=None):
        (s0, s1), _ = block_info[None]["array-location"]
        uv = renderer.render(s0, s1)
        return np.clip(np.rint(uv / gain), -32768, 32767).astype(np.int16)

    data = da.map_blocks(block, dtype=np.int16, chunks=(chunks, (n_channels,)),
                         name=f"synthetic-{seed}-{n_samples}-{n_channels}-{n_units}-{layout}-{drift}-"
                              f"{drift_um}-{period}-{noise_uV}-{rows}-{common_uV}")
    params = dict(duration=float(duration), n_channels=n_channels, n_units=n_units, layout=layout,
                  noise_uV=float(noise_uV), drift=str(drift), drift_um=float(drift_um), drift_period=period,
                  sampling_rate=fs, firing_rates=list(firing_rates), amplitudes_uV=list(amplitudes_uV),
                  refractory_ms=float(refractory_ms), amplitude_jitter=float(amplitude_jitter),
                  common_uV=float(common_uV), noise_decay_um=float(noise_decay_um), seed=int(seed))
    rec = make_recording(data, sampling_rate=fs, probe=probe, gain_to_uV=gain, source=f"synthetic(seed={seed})",
                         dtype_on_disk="int16", attrs={"format": "synthetic", "synthetic": str(params)})

    # Ground truth.
    templates = waveforms[:, :, None] * (amp[:, None] * rest_fp)[:, None, :]
    t_grid = np.arange(0.0, duration + 1e-9, 0.1)
    depth = np.linspace(ylo, yhi, max(2, int((yhi - ylo) // 10) + 1))
    disp = displacement_at(t_grid[:, None], depth[None, :], **drift_kw)
    unit_disp = displacement_at(t_grid[:, None], uy[None, :], **drift_kw)
    truth = xr.Dataset(
        {
            "spike_time": ("spike", spike_time),
            "spike_unit": ("spike", spike_unit),
            "spike_amplitude_scale": ("spike", spike_scale),
            "unit_x": ("unit", ux), "unit_y": ("unit", uy), "unit_z": ("unit", uz),
            "unit_shank": ("unit", home.astype(np.int64)),
            "unit_ptp_uV": ("unit", ptp),
            "unit_best_channel": ("unit", rest_fp.argmax(axis=1) if n_units else np.zeros(0, int)),
            "unit_firing_rate": ("unit", rates),
            "template": (("unit", "sample", "channel"), templates.astype(np.float32)),
            "displacement": (("drift_time", "depth"), disp),
            "unit_displacement": (("drift_time", "unit"), unit_disp),
        },
        coords={"unit": np.arange(n_units), "drift_time": t_grid, "depth": depth,
                "channel": probe.channel, "x": ("channel", cx), "y": ("channel", cy)},
        attrs={"sampling_rate": fs, "nt0": nt0, "n_samples": n_samples, "gain_to_uV": gain, **{
            k: v for k, v in params.items()}},
    )
    truth["template"].attrs["units"] = "uV"
    truth["displacement"].attrs["units"] = "um"
    return rec, truth


def write_spikeglx(recording: xr.DataArray, path: str | Path, *, layout: Literal["np1", "np2"] = "np1",
                   add_sync: bool = True, progress: bool = False) -> Path:
    """Write an int16 recording as a SpikeGLX ``.ap.bin`` + ``.meta`` pair.

    The ``.meta`` holds ``nSavedChans``, ``imSampRate``, ``fileSizeBytes``, ``snsApLfSy``, ``acqApLfSy``,
    ``snsSaveChanSubset``, the ADC range, ``~imroTbl`` (gains) and ``~snsGeomMap`` (geometry), so
    :func:`open_recording` reopens it with no other input. A sync column (square wave on bit 6, 1 s period) is
    appended when ``add_sync``.

    Parameters
    ----------
    recording : xarray.DataArray
        int16 ``(time, channel)`` recording whose gain matches ``layout`` (as :func:`generate_recording` gives).
    path : str or Path
        Target ``*.ap.bin`` (the ``.meta`` is written beside it).
    layout : {"np1", "np2"}
    add_sync : bool
    progress : bool
        Show a progress bar.

    Returns
    -------
    Path
        The ``.bin`` path. Both files are written under temporary names and renamed when complete.
    """
    path = Path(path)
    if recording.dtype != np.int16:
        raise SpikearrayError(f"write_spikeglx writes int16 counts; the recording is {recording.dtype}.")
    a = _ADC[layout]
    fs = float(recording.attrs["sampling_rate"])
    n, c = recording.shape
    n_saved = c + (1 if add_sync else 0)
    tmp_bin = path.with_name(path.name + ".partial")
    tmp_meta = path.with_suffix(".meta.partial")
    data = recording.data if isinstance(recording.data, da.Array) else da.from_array(recording.values)
    offsets = np.cumsum((0,) + data.chunks[0])
    from tqdm.auto import tqdm

    with open(tmp_bin, "wb") as f:
        for i in tqdm(range(len(data.chunks[0])), disable=not progress, desc="write .bin", unit="chunk"):
            blk = np.asarray(data.blocks[i, :].compute(), dtype="<i2")
            if add_sync:
                t = (np.arange(offsets[i], offsets[i + 1]) / fs) % 1.0
                sync = np.where(t < 0.5, 64, 0).astype("<i2")
                blk = np.concatenate([blk, sync[:, None]], axis=1)
            f.write(np.ascontiguousarray(blk).tobytes())
    size = tmp_bin.stat().st_size
    chans = np.asarray(recording["channel"].values)
    xs, ys = recording["x"].values, recording["y"].values
    if layout == "np1":
        imro = "(0,384)" + "".join(f"({k} 0 0 500 250 1)" for k in range(384))
        acq = "384,384,1"
        subset = f"0:{c - 1},768" if add_sync else f"0:{c - 1}"
    else:
        imro = "(21,384)" + "".join(f"({k} 1 0 {k})" for k in range(384))
        acq = "384,0,1"
        subset = f"0:{c - 1},384" if add_sync else f"0:{c - 1}"
    geom = f"({a['pn']},1,0,70)" + "".join(f"(0:{x:g}:{y:g}:1)" for x, y in zip(xs, ys))
    chanmap = f"(384,{384 if layout == 'np1' else 0},1)" + "".join(f"(AP{k};{k}:{k})" for k in chans)
    if add_sync:
        chanmap += f"(SY0;{768 if layout == 'np1' else 384}:{768 if layout == 'np1' else 384})"
    meta = {
        "acqApLfSy": acq,
        "appVersion": "20240129",
        "fileCreateTime": "2026-11-25T00:00:00",
        "fileName": str(path),
        "fileSizeBytes": str(size),
        "fileTimeSecs": f"{n / fs:.6f}",
        "firstSample": "0",
        "imAiRangeMax": str(a["range_max"]),
        "imAiRangeMin": str(-a["range_max"]),
        "imDatPrb_pn": a["pn"],
        "imDatPrb_type": str(a["ptype"]),
        "imMaxInt": str(a["max_int"]),
        "imSampRate": f"{fs:g}",
        "nSavedChans": str(n_saved),
        "snsApLfSy": f"{c},0,{1 if add_sync else 0}",
        "snsSaveChanSubset": subset,
        "syncSourcePeriod": "1",
        "typeThis": "imec",
        "userNotes": "written by spikearray.synthetic.write_spikeglx",
        "~imroTbl": imro,
        "~snsChanMap": chanmap,
        "~snsGeomMap": geom,
    }
    if layout == "np2":
        meta["imChan0apGain"] = "80"
    tmp_meta.write_text("".join(f"{k}={v}\r\n" for k, v in meta.items()))
    tmp_bin.replace(path)
    tmp_meta.replace(path.with_suffix(".meta"))
    return path
