"""A hand-made, realistic Sorting Dataset built from synthetic ground truth.

Reusable by any test that needs a sorting without running the sorter: spikes = planted spikes, templates = planted
templates (µV), a symmetric (ZCA) whitening matrix from the generator's noise covariance, seeded PC features,
contamination and labels. Names, dims, dtypes and attrs come from :data:`spikearray.outputs.OUTPUTS` (through
:func:`spikearray.outputs.sorting_dataset`), the same table the sorter builds its output from.
"""

from __future__ import annotations

import json

import numpy as np
import xarray as xr

from spikearray import __version__
from spikearray.outputs import sorting_dataset
from spikearray.settings import Settings


def zca_whitening(x: np.ndarray, y: np.ndarray, noise_uV: float, decay_um: float) -> np.ndarray:
    """Symmetric whitening matrix W (C, C) for noise covariance ``noise_uV² exp(-d / decay_um)``."""
    d = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :])
    cov = noise_uV**2 * np.exp(-d / decay_um)
    lam, vec = np.linalg.eigh(cov)
    return ((vec / np.sqrt(lam + 1e-6 * lam.max())) @ vec.T).astype(np.float32)


def make_sorting(rec: xr.DataArray, truth: xr.Dataset, *, seed: int = 0, with_pc: bool = True,
                 with_similarity: bool = False, nearest: int = 8, n_pcs: int = 3,
                 object_labels: bool = False) -> xr.Dataset:
    """Sorting Dataset whose spikes and templates are the ground truth of ``generate_recording``.

    Parameters
    ----------
    rec, truth : the pair returned by ``generate_recording`` (or ``rec`` reopened from a SpikeGLX copy).
    with_pc : include ``spike_pc`` / ``unit_pc_channel``.
    with_similarity : include ``similarity`` (otherwise exporters must compute it).
    object_labels : store ``label`` as object strings instead of ``<U4``.
    """
    rng = np.random.default_rng(seed)
    fs = float(rec.attrs["sampling_rate"])
    n_samples = int(rec.sizes["time"])
    st = truth["spike_time"].values.astype(np.int64)
    su = truth["spike_unit"].values.astype(np.int64)
    order = np.lexsort((su, st))
    st, su = st[order], su[order]
    scale = truth["spike_amplitude_scale"].values[order]
    K = int(truth.sizes["unit"])
    C = int(rec.sizes["channel"])
    x, y = rec["x"].values, rec["y"].values
    template = truth["template"].values.astype(np.float32)
    W = zca_whitening(x, y, float(truth.attrs["noise_uV"]), float(truth.attrs["noise_decay_um"]))
    template_w = np.einsum("ktj,ij->kti", template, W).astype(np.float32)
    energy = (template**2).sum(axis=1)
    best_pos = energy.argmax(axis=1)
    ptp = np.ptp(template, axis=1)[np.arange(K), best_pos].astype(np.float32)
    n_spikes = np.bincount(su, minlength=K).astype(np.int64)
    contamination = rng.uniform(0.0, 0.3, K)
    label = np.where(contamination < 0.1, "good", "mua")
    if object_labels:
        label = label.astype(object)
    ux, uy = truth["unit_x"].values, truth["unit_y"].values
    S = len(st)
    data = {
        "spike_time": ("spike", st),
        "spike_unit": ("spike", su),
        "spike_amplitude": ("spike", (scale * ptp[su]).astype(np.float32)),
        "spike_x": ("spike", (ux[su] + rng.normal(0, 3, S)).astype(np.float32)),
        "spike_depth": ("spike", (uy[su] + rng.normal(0, 3, S)).astype(np.float32)),
        "template": (("unit", "sample", "channel"), template),
        "template_whitened": (("unit", "sample", "channel"), template_w),
        "best_channel": ("unit", rec["channel"].values[best_pos].astype(np.int64)),
        "unit_x": ("unit", ux.astype(np.float64)),
        "depth": ("unit", uy.astype(np.float64)),
        "amplitude": ("unit", ptp),
        "firing_rate": ("unit", n_spikes / (n_samples / fs)),
        "n_spikes": ("unit", n_spikes),
        "contamination": ("unit", contamination),
        "label": ("unit", label),
        "whitening_matrix": (("channel", "channel_out"), W),
        "displacement": (("time", "block"), np.zeros((2, 1), np.float32)),
    }
    if with_pc:
        dist = np.hypot(x[best_pos][:, None] - x[None, :], y[best_pos][:, None] - y[None, :])
        pc_chan = np.argsort(dist, axis=1, kind="stable")[:, :nearest].astype(np.int64)
        data["spike_pc"] = (("spike", "pc", "nearest"), rng.normal(0, 1, (S, n_pcs, nearest)).astype(np.float32))
        data["unit_pc_channel"] = (("unit", "nearest"), pc_chan)
    if with_similarity:
        flat = template_w.reshape(K, -1)
        nrm = flat / np.linalg.norm(flat, axis=1, keepdims=True)
        data["similarity"] = (("unit", "unit_b"), (nrm @ nrm.T).astype(np.float32))
    coords = {
        "unit": np.arange(K),
        "channel": rec["channel"].values,
        "x": x,
        "y": y,
        "shank": rec["shank"].values,
        "contact_id": rec["contact_id"].values,
        "time": np.array([n_samples / fs / 4, 3 * n_samples / fs / 4]),
        "block_depth": np.array([float(y.mean())]),
    }
    gain = rec.attrs.get("gain_to_uV", 1.0)
    attrs = {
        "spikearray_version": __version__,
        "settings": Settings().to_json(),
        "source": str(rec.attrs.get("source", "")),
        "sampling_rate": fs,
        "n_samples": n_samples,
        "duration_s": n_samples / fs,
        "time_start": float(rec.attrs.get("time_start", 0.0)),
        "dtype_on_disk": str(rec.attrs.get("dtype_on_disk", "int16")),
        "n_file_channels": int(rec.attrs.get("n_file_channels", C)),
        "offset": int(rec.attrs.get("offset", 0)),
        "gain_to_uV": gain,
        "timings": json.dumps({"preprocess": 1.5, "detect": 2.25}),
        "n_units_good": int((label == "good").sum()),
    }
    return sorting_dataset(data, coords, attrs)
