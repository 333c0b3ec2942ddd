"""Per-unit quantities in physical units: µV templates and amplitudes, positions, rates, contamination, labels."""

from __future__ import annotations

import numpy as np

from .refractory import is_refractory

__all__ = ["unwhiten_templates", "unit_positions", "spike_positions", "refractory_labels", "ptp_best"]


def unwhiten_templates(templates_whitened: np.ndarray, whitening: np.ndarray) -> np.ndarray:
    """µV templates ``(K, nt, C)`` from whitened ``(K, nt, C)``: whitened = W·µV, so µV = W⁻¹·whitened."""
    Winv = np.linalg.pinv(whitening.astype(np.float64))
    return np.einsum("ij,ktj->kti", Winv, templates_whitened.astype(np.float64)).astype(np.float32)


def ptp_best(templates_uV: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best channel (position index) and its peak-to-peak (µV) of each ``(K, nt, C)`` template."""
    ptp = templates_uV.max(1) - templates_uV.min(1)  # (K, C)
    best = ptp.argmax(1) if len(ptp) else np.zeros(0, np.int64)
    return best.astype(np.int64), ptp[np.arange(len(best)), best].astype(np.float32)


def unit_positions(templates_uV: np.ndarray, pos: np.ndarray, best: np.ndarray, limit: float) -> np.ndarray:
    """Template centre of mass ``(K, 2)`` µm: channels within ``limit`` of the best one, weighted by ptp²."""
    ptp = templates_uV.max(1) - templates_uV.min(1)
    out = np.zeros((len(best), 2))
    for k, b in enumerate(best):
        near = np.linalg.norm(pos - pos[b], axis=1) <= limit
        w = ptp[k] ** 2 * near
        out[k] = (w[:, None] * pos).sum(0) / max(w.sum(), 1e-12)
    return out


def spike_positions(features: np.ndarray, channels: np.ndarray, pos: np.ndarray, limit: float) -> np.ndarray:
    """Per-spike (x, y) µm: feature norms on its channels (within ``limit`` of the first one) as weights.

    Parameters
    ----------
    features : ndarray (n, nC, P)
    channels : ndarray (n, nC)
        Channel positions (indices) of the features; the first is the unit's peak channel.
    """
    if len(features) == 0:
        return np.zeros((0, 2), np.float32)
    w = np.linalg.norm(features, axis=2)  # (n, nC)
    p = pos[channels]  # (n, nC, 2)
    near = np.linalg.norm(p - p[:, :1], axis=2) <= limit
    w = w * near
    return ((w[:, :, None] * p).sum(1) / np.maximum(w.sum(1), 1e-12)[:, None]).astype(np.float32)


def refractory_labels(spike_time: np.ndarray, spike_unit: np.ndarray, n_units: int, sampling_rate: float,
                      acg_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Kilosort4's contamination (``R12``) and label ("good" when refractory, else "mua") of each unit."""
    contam = np.zeros(n_units)
    label = np.empty(n_units, dtype=object)
    order = np.argsort(spike_unit, kind="stable")
    bounds = np.searchsorted(spike_unit[order], np.arange(n_units + 1))
    for k in range(n_units):
        t = spike_time[order[bounds[k]:bounds[k + 1]]] / sampling_rate
        ref, r12 = is_refractory(t, acg_threshold)
        contam[k] = r12
        label[k] = "good" if ref else "mua"
    return contam, label.astype(str)
