"""Template matching (matching pursuit with learned templates), per chunk in torch.

Kilosort4 (§2.8) correlates the data with every template, then repeatedly accepts the time points where the
best template explains a local maximum of variance above ``Th_learned²`` and subtracts the fitted templates
(from the data and, through precomputed template cross-correlations, from the correlation scores), up to
``max_peels`` times. We do the same with two changes that make it cheap on a CPU:

* each template is stored in low-rank spatio-temporal form (SVD, as few components as leave less than one
  noise SD out), so the correlation is one small matrix product over channels, one FFT per component and
  one inverse FFT per template, instead of a projection of every channel on every temporal basis;
* subtraction from the score array uses the exact template cross-correlations of the low-rank templates
  (consistent algebra: what is subtracted is what was fitted).

Every accepted spike gets its sample time (trough), template id, amplitude scale ``B/|U|²`` and score
``sqrt(Cf)``; its PC features are computed from the residual plus its own fitted template on the
``nearest_chans`` channels around the template's peak channel (Kilosort4's ``tF``), and the chunk also returns
the per-template sums of (residual + own template) waveforms on all channels, from which the final templates
are the means.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from .._blocks import ChunkInfo, compute_tasks, map_chunks
from .._compute import default_torch_threads, resolve_device, torch_threads
from ..detection.detect import fast_len
from ..geometry import nearest_channels, positions
from ..settings import Settings

__all__ = ["match", "low_rank"]


def low_rank(templates: np.ndarray, rank: int, tol: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spatio-temporal factors of each template ``(K, C, nt)``, as few as needed.

    Template ``k`` keeps the smallest number of SVD components (at most ``rank``) whose residual norm is at
    most ``tol`` (whitened SD). :func:`match` uses half the matching threshold: what is left out of a fitted
    spike can then never pass the threshold on its own (the left-out part of a mean template is mostly the
    estimation noise of the mean, which has high rank and does not need fitting).

    Returns
    -------
    spatial : ndarray (n_rows, C)
        Spatial factors scaled by their singular values.
    temporal : ndarray (n_rows, nt)
    row_template : ndarray (n_rows,) int64
        The template of each row.
    """
    K, C, nt = templates.shape
    R = min(rank, C, nt)
    u, sv, vh = np.linalg.svd(templates.astype(np.float64), full_matrices=False)
    tail = np.sqrt(np.maximum((sv ** 2).sum(1, keepdims=True) - np.cumsum(sv ** 2, axis=1), 0.0))  # (K, min(C,nt))
    keep = np.minimum(1 + (tail > tol).sum(1), R)
    rows_k = np.repeat(np.arange(K), keep)
    rows_r = np.concatenate([np.arange(n) for n in keep]) if K else np.zeros(0, int)
    spatial = u[rows_k, :, rows_r] * sv[rows_k, rows_r][:, None]
    temporal = vh[rows_k, rows_r, :]
    return spatial.astype(np.float32), temporal.astype(np.float32), rows_k.astype(np.int64)


_ROW_GROUP = 48


def _match_block(block: np.ndarray, info: ChunkInfo, ctx: dict) -> dict[str, Any]:
    dev = ctx["device"]
    with torch_threads(ctx["threads"]):
        x = torch.from_numpy(np.ascontiguousarray(block.T, dtype=np.float32)).to(dev)  # (C, L)
        C, L = x.shape
        nt, nt0 = ctx["nt"], ctx["nt0"]
        S, Ur, nm, ctc, rows = (ctx[k].to(dev) for k in ("S", "Ur", "nm", "ctc", "rows"))
        K = Ur.shape[0]
        # B[k, t] = Σ_rows(k) (S_row · x) ⋆ T_row: one matrix product over channels, the rows' FFTs, and the
        # sum over each template's rows in the frequency domain (K inverse FFTs instead of one per row)
        n = fast_len(L + nt)
        filt = _filter_spectrum(ctx, n, dev)
        Bf = torch.zeros((K, n // 2 + 1), dtype=filt.dtype, device=dev)
        for g in range(0, len(rows), _ROW_GROUP):  # row groups keep the (rows, frequency) arrays small
            sl = slice(g, g + _ROW_GROUP)
            Bf.index_add_(0, rows[sl], torch.fft.rfft(S[sl] @ x, n=n) * filt[sl])
        shift = nt - 1 - nt0
        B = torch.fft.irfft(Bf, n=n)[:, shift:shift + L].contiguous()  # (K, L)
        th2 = ctx["th"] ** 2
        lo, hi = nt, L - nt
        D = 2 * nt - 1
        dl = torch.arange(-(nt - 1), nt, device=dev)
        tau = torch.arange(nt, device=dev)
        times, ids, amps, scores = [], [], [], []
        for _ in range(ctx["max_peels"]):
            Cf = torch.relu(B) ** 2 / nm[:, None]
            Cfmax, kbest = Cf.max(0)
            Cfmax[:lo] = 0
            Cfmax[hi:] = 0
            pooled = F.max_pool1d(Cfmax[None, None], 2 * nt + 1, stride=1, padding=nt)[0, 0]
            t = torch.nonzero((Cfmax >= pooled) & (Cfmax > th2), as_tuple=True)[0]
            if len(t) == 0:
                break
            k = kbest[t]
            a = B[k, t] / nm[k]
            # scores: B[j, t+δ] -= a · ctc[k, j, δ]
            pos = (t[:, None] + dl[None, :]).reshape(-1)
            vals = (a[:, None, None] * ctc[k]).permute(1, 0, 2).reshape(K, -1)
            B.index_add_(1, pos, -vals)
            # residual data: x[:, t - nt0 + τ] -= a · Ur[k]
            pos_x = (t[:, None] - nt0 + tau[None, :]).reshape(-1)
            vals_x = (a[:, None, None] * Ur[k]).permute(1, 0, 2).reshape(C, -1)
            x.index_add_(1, pos_x, -vals_x)
            times.append(t)
            ids.append(k)
            amps.append(a)
            scores.append(Cfmax[t].sqrt())
        if not times:
            return _empty(ctx)
        t = torch.cat(times)
        k = torch.cat(ids)
        a = torch.cat(amps)
        sc = torch.cat(scores)
        t_glob = info.start - info.left + t
        core = (t_glob >= info.start) & (t_glob < info.stop)
        t, k, a, sc, t_glob = t[core], k[core], a[core], sc[core], t_glob[core]
        win = t[:, None] - nt0 + tau[None, :]  # (n, nt)
        own = a[:, None, None] * Ur[k]  # (n, C, nt)
        full = x[:, win].permute(1, 0, 2) + own  # residual + own template, all channels
        chans = ctx["nearU"].to(dev)[k]  # (n, nC)
        feat = torch.gather(full, 1, chans[:, :, None].expand(-1, -1, nt)) @ ctx["pcs"].to(dev).T  # (n, nC, P)
        sums = torch.zeros((K, C, nt), device=dev).index_add_(0, k, full)
        counts = torch.bincount(k, minlength=K)
        return {
            "time": t_glob.cpu().numpy().astype(np.int64),
            "template": k.cpu().numpy().astype(np.int64),
            "amplitude": a.cpu().numpy().astype(np.float32),
            "score": sc.cpu().numpy().astype(np.float32),
            "features": feat.cpu().numpy().astype(np.float32),
            "sums": sums.cpu().numpy(),
            "counts": counts.cpu().numpy(),
        }


def _filter_spectrum(ctx: dict, n: int, dev: torch.device) -> torch.Tensor:
    """FFT of the reversed temporal factors at length ``n`` (cached per length and device)."""
    key = ("spec", n, str(dev))
    spec = ctx.get(key)
    if spec is None:
        spec = torch.fft.rfft(torch.flip(ctx["Tm"].to(dev), dims=(-1,)), n=n)
        ctx[key] = spec
    return spec


def _empty(ctx: dict) -> dict[str, Any]:
    K, C, nt = ctx["Ur"].shape
    nC = ctx["nearU"].shape[1]
    P = ctx["pcs"].shape[0]
    return {"time": np.zeros(0, np.int64), "template": np.zeros(0, np.int64), "amplitude": np.zeros(0, np.float32),
            "score": np.zeros(0, np.float32), "features": np.zeros((0, nC, P), np.float32),
            "sums": np.zeros((K, C, nt), np.float32), "counts": np.zeros(K, np.int64)}


def match(white: xr.DataArray, templates: np.ndarray, bases: xr.Dataset, settings: Settings | None = None, *,
          rank: int | None = None, progress: bool = False, client: Any = None) -> xr.Dataset:
    """Find every spike of every template by matching pursuit.

    Parameters
    ----------
    white : xarray.DataArray (time, channel)
        Whitened, drift-corrected recording.
    templates : ndarray (K, C, nt) float32
        Whitened templates, trough at ``nt0min``.
    bases : xarray.Dataset
        Temporal PCs (``pc``) for the spike features.
    settings : Settings
        Uses ``Th_learned``, ``max_peels``, ``nt``, ``nt0min``, ``nearest_chans``, ``device``, ``torch_threads``.
    rank : int, optional
        Largest rank of the spatio-temporal template approximation (default ``n_pcs``); each template uses
        the fewest components that leave less than one noise SD out (see :func:`low_rank`). What is fitted
        is exactly what is subtracted, so nothing of a fitted spike is left for other templates to "find".

    Returns
    -------
    xarray.Dataset
        Per spike (sorted by time): ``spike_time`` (int64 samples), ``spike_template`` (int64),
        ``spike_scale`` (fitted amplitude relative to the template), ``spike_score`` (sqrt of explained
        variance, whitened SD units), ``spike_features`` (spike, nearest, pc); per template:
        ``template_mean`` (template, channel, sample) mean of residual + own fit over its spikes,
        ``template_count``, ``template_channels`` (template, nearest) the feature channels (positions).
    """
    s = Settings.coerce(settings)
    K, C, nt = templates.shape
    pos = positions(white)
    shank = np.asarray(white["shank"].values) if "shank" in white.coords else np.zeros(C, int)
    nC = min(s.nearest_chans, C)
    rank = rank or s.n_pcs
    spatial, temporal, rows = low_rank(templates, rank, tol=0.5 * float(s.Th_learned))
    Ur = np.zeros((K, C, nt), np.float64)
    np.add.at(Ur, rows, spatial[:, :, None].astype(np.float64) * temporal[:, None, :])
    Ur = Ur.astype(np.float32)
    nm = (Ur.astype(np.float64) ** 2).sum((1, 2))
    Ut = torch.from_numpy(Ur)
    ctc = F.conv1d(F.pad(Ut, (nt - 1, nt - 1)), Ut) if K else torch.zeros((0, 0, 2 * nt - 1))  # (K, K, 2nt-1)
    best = (Ur ** 2).sum(2).argmax(1) if K else np.zeros(0, int)
    near = nearest_channels(pos, nC, shank)
    nearU = near[best] if K else np.zeros((0, nC), int)
    ctx = {
        "device": resolve_device(s.device), "threads": s.torch_threads or default_torch_threads(),
        "nt": nt, "nt0": s.nt0min_, "th": float(s.Th_learned), "max_peels": int(s.max_peels),
        "S": torch.from_numpy(spatial), "Tm": torch.from_numpy(temporal), "rows": torch.from_numpy(rows), "Ur": Ut,
        "nm": torch.from_numpy(nm.astype(np.float32)), "ctc": ctc.contiguous(),
        "nearU": torch.from_numpy(nearU), "pcs": torch.from_numpy(bases["pc"].values.astype(np.float32)),
    }
    if K == 0:
        parts = []
    else:
        tasks = map_chunks(white.data, _match_block, halo=3 * nt, args=(ctx,), name="match")
        parts = compute_tasks(tasks, progress=progress, desc="match", client=client, prefix="match")
    empty = _empty(ctx)
    cat = {k: np.concatenate([p[k] for p in parts]) if parts else empty[k]
           for k in ("time", "template", "amplitude", "score", "features")}
    sums = sum((p["sums"] for p in parts), np.zeros((K, C, nt), np.float64))
    counts = sum((p["counts"] for p in parts), np.zeros(K, np.int64))
    order = np.lexsort((cat["template"], cat["time"]))
    mean = (sums / np.maximum(counts, 1)[:, None, None]).astype(np.float32)
    return xr.Dataset(
        {
            "spike_time": ("spike", cat["time"][order]),
            "spike_template": ("spike", cat["template"][order]),
            "spike_scale": ("spike", cat["amplitude"][order]),
            "spike_score": ("spike", cat["score"][order]),
            "spike_features": (("spike", "nearest", "pc"), cat["features"][order]),
            "template_mean": (("template", "channel", "sample"), mean),
            "template_count": ("template", counts.astype(np.int64)),
            "template_channels": (("template", "nearest"), nearU.astype(np.int64)),
        },
        attrs={"threshold": float(s.Th_learned), "rank": int(rank)},
    )
