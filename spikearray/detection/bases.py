"""Learning the single-channel waveform bases (temporal PCs and prototype shapes) from the data.

Kilosort4 (``templates_from_data=True``) collects isolated single-channel peaks above ``Th_single_ch`` on
every 25th batch, normalises the snippets to unit norm, and keeps their top ``n_pcs`` right singular vectors
(``wPCA``) and ``n_templates`` k-means centroids (``wTEMP``). We do the same on a deterministic sample of
chunks, vectorised in torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from .._compute import channels_first, resolve_device, torch_threads
from .._engine import ChunkInfo, as_dask, chunk_kernel, run_chunks
from ..errors import DataError
from ..settings import Settings

__all__ = ["learn_bases", "isolated_peaks", "sample_chunks"]


def sample_chunks(n_chunks: int, n_wanted: int) -> np.ndarray:
    """Evenly spaced chunk indices (deterministic), at most ``n_wanted``."""
    if n_chunks <= n_wanted:
        return np.arange(n_chunks)
    return np.unique(np.round(np.linspace(0, n_chunks - 1, n_wanted)).astype(int))


def isolated_peaks(x: torch.Tensor, threshold: float, nt: int, nt0min: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-channel peaks of ``|x|`` that dominate ±4 channels × ±5 samples and are alone in ±6 ch × ±30 samples.

    Parameters
    ----------
    x : tensor (C, T)
        Whitened data.

    Returns
    -------
    channels, times : tensors of int64
    """
    a = x.abs()
    # separable max pooling: channels first, then time (same result as the 2-D window, far cheaper)
    local = F.max_pool1d(a.T[None], 9, stride=1, padding=4)[0].T
    local = F.max_pool1d(local[None], 11, stride=1, padding=5)[0]
    c, t = torch.nonzero((a == local) & (a > threshold), as_tuple=True)
    # alone: no other peak within ±6 channels × ±30 samples, tested on the (few) peaks themselves. Two box sums
    # over the whole chunk cost 2.4 s of a 2 s, 384-channel chunk for a sparse 0/1 array (this: milliseconds).
    alone = _alone(c, t, 6, 30)
    inside = (t >= nt) & (t < a.shape[1] - nt)
    keep = alone & inside
    return c[keep], t[keep]  # channel-major, as torch.nonzero lists them


def _alone(c: torch.Tensor, t: torch.Tensor, dc: int, dt: int) -> torch.Tensor:
    """Which of the points ``(c, t)`` have no other point within ``|Δc| <= dc`` and ``|Δt| <= dt``."""
    alone = torch.ones(len(t), dtype=torch.bool, device=t.device)
    if len(t) < 2:
        return alone
    order = torch.argsort(t, stable=True)
    ts, cs = t[order], c[order]
    hi = torch.searchsorted(ts, ts + dt, right=True)  # points i+1 .. hi-1 are within dt after point i
    crowded = torch.zeros(len(ts), dtype=torch.bool, device=t.device)
    idx = torch.arange(len(ts), device=t.device)
    for k in range(1, int((hi - idx).max())):
        i = idx[:-k][(idx[:-k] + k) < hi[:-k]]
        near = (cs[i] - cs[i + k]).abs() <= dc
        crowded[i[near]] = True
        crowded[i[near] + k] = True
    alone[order] = ~crowded
    return alone


@dataclass(frozen=True, eq=False)
class _SnippetContext:
    device: str  # the settings' device; "auto" is resolved where the chunk runs
    threshold: float
    nt: int
    nt0: int


@chunk_kernel(halo=lambda ctx: 0)  # peaks whose window leaves the chunk are skipped: no halo needed
def _snippet_block(block: np.ndarray, info: ChunkInfo, ctx: _SnippetContext) -> np.ndarray:
    """Unit-free snippets ``(n, nt)`` float32 of the chunk's isolated single-channel peaks."""
    dev = resolve_device(ctx.device)
    x = channels_first(block, dev)
    c, t = isolated_peaks(x, ctx.threshold, ctx.nt, ctx.nt0)
    win = t[:, None] - ctx.nt0 + torch.arange(ctx.nt, device=dev)[None, :]
    return x[c[:, None], win].cpu().numpy()


def learn_bases(white: xr.DataArray, settings: Settings | None = None, *, max_snippets: int = 50_000,
                n_chunks: int = 12) -> xr.Dataset:
    """Learn temporal PCs and prototype waveforms from isolated peaks of the whitened recording.

    Parameters
    ----------
    white : xarray.DataArray (time, channel)
        Preprocessed (whitened) recording.
    settings : Settings
        Uses ``nt``, ``nt0min``, ``n_pcs``, ``n_templates``, ``Th_single_ch``, ``seed``, ``device``, and
        ``batch_downsampling``/``batch_size``: with ``batch_downsampling = k`` only chunks starting in batches
        ``0, k, 2k, ...`` (of ``batch_size`` samples) are sampled, as Kilosort4 uses only every k-th batch.
    max_snippets : int
        Cap on snippets used.
    n_chunks : int
        Number of chunks sampled (evenly spaced among the candidates).

    Returns
    -------
    xarray.Dataset
        ``pc`` (pc, sample): orthonormal temporal PCs, the first with its trough at ``nt0min``;
        ``shape`` (shape, sample): unit-norm prototype waveforms; attr ``n_snippets``.

    Raises
    ------
    DataError
        When no isolated peak exists (e.g. a flat recording) — the message suggests lowering ``Th_single_ch``.
    """
    s = Settings.coerce(settings)
    nt, nt0 = s.nt, s.nt0min_
    data = as_dask(white)
    starts = np.concatenate([[0], np.cumsum(data.chunks[0])[:-1]]).astype(np.int64)
    candidates = np.flatnonzero((starts // int(s.batch_size)) % int(s.batch_downsampling) == 0)
    idx = candidates[sample_chunks(len(candidates), n_chunks)]
    ctx = _SnippetContext(device=s.device, threshold=float(s.Th_single_ch), nt=nt, nt0=nt0)
    snips = []
    # the sampled chunks in parallel; snippets taken in chunk order until max_snippets
    for part in run_chunks(_snippet_block, data, ctx, name="bases", select=idx):
        if len(part) == 0:
            continue
        snips.append(torch.from_numpy(part))
        if sum(len(q) for q in snips) >= max_snippets:
            break
    if not snips:
        raise DataError(
            f"no isolated spikes above Th_single_ch={s.Th_single_ch} in {len(idx)} sampled chunks, so waveform "
            "shapes cannot be learned. The recording may be flat or very short; lower Th_single_ch or check the data."
        )
    S = torch.cat(snips)[:max_snippets].double()
    S = S / S.norm(dim=1, keepdim=True).clamp_min(1e-12)
    # one thread: LAPACK's SVD of the tall snippet matrix and the k-means sums split their reductions between
    # threads, and the PCs feed every later stage (the same bits for any torch.set_num_threads)
    with torch_threads(1):
        _, _, vh = torch.linalg.svd(S, full_matrices=False)
        n_pcs = min(s.n_pcs, nt, len(S))
        pcs = vh[:n_pcs].clone()
        for k in range(n_pcs):  # fix the arbitrary SVD sign: largest |value| negative (a trough)
            j = torch.argmax(pcs[k].abs())
            if pcs[k, j] > 0:
                pcs[k] = -pcs[k]
        shapes = _kmeans_shapes(S, s.n_templates, s.seed)
    ds = xr.Dataset(
        {"pc": (("pc", "sample"), pcs.float().numpy()), "shape": (("shape", "sample"), shapes.float().numpy())},
        attrs={"n_snippets": int(len(S)), "nt0min": nt0},
    )
    return ds


def _kmeans_shapes(S: torch.Tensor, k: int, seed: int, iters: int = 30) -> torch.Tensor:
    """Unit-norm k-means centroids of unit-norm snippets (cosine k-means, deterministic init)."""
    g = torch.Generator().manual_seed(int(seed))
    S = S.float()
    k = min(k, len(S))
    # k-means++ style seeding on signed snippets (a negative and a positive spike are different shapes).
    centres = [S[torch.randint(len(S), (1,), generator=g)].squeeze(0)]
    for _ in range(1, k):
        d = 1 - torch.stack([S @ c for c in centres], 1).max(1).values
        p = d.clamp_min(0) ** 2
        p = p / p.sum() if p.sum() > 0 else torch.full_like(p, 1 / len(p))
        centres.append(S[torch.multinomial(p, 1, generator=g)].squeeze(0))
    C = torch.stack(centres)
    for _ in range(iters):
        lab = (S @ C.T).argmax(1)
        newC = torch.zeros_like(C).index_add_(0, lab, S)
        empty = newC.norm(dim=1) == 0
        newC[empty] = C[empty]
        C = newC / newC.norm(dim=1, keepdim=True)
    return C
