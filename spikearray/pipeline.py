"""``sort``: the whole pipeline, preprocess → drift → detect → cluster → match → merge → metrics.

Each stage is a public function of its own module; this module only chains them, times them, shows
progress and writes the outputs. The heavy per-chunk stages run as dask tasks on the threaded scheduler or
on a ``dask.distributed`` client.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import xarray as xr
from threadpoolctl import threadpool_limits

from ._compute import release_memory
from .errors import DataError, OutputExistsError, RecordingError
from .resume import StageStore, recording_identity
from .settings import Settings

__all__ = ["sort"]


class _Timer:
    def __init__(self, progress: bool) -> None:
        self.timings: dict[str, float] = {}
        self.progress = progress

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.progress:
            print(f"[spikearray] {name} …", flush=True)
        t0 = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - t0
        release_memory()
        if self.progress:
            print(f"[spikearray] {name} done in {self.timings[name]:.1f} s", flush=True)


def _time_range(rec: xr.DataArray, s: Settings) -> tuple[xr.DataArray, int]:
    fs = float(rec.attrs["sampling_rate"])
    n = rec.sizes["time"]
    i0 = int(round(s.tmin * fs))
    i1 = n if not np.isfinite(s.tmax) else min(n, int(round(s.tmax * fs)))
    if i0 >= i1:
        raise RecordingError(
            f"tmin={s.tmin} s and tmax={s.tmax} s leave no samples of a {n / fs:.3f} s recording; "
            "choose 0 <= tmin < tmax <= duration."
        )
    if i0 == 0 and i1 == n:
        return rec, 0
    return rec.isel(time=slice(i0, i1)), i0


def _check_settings_against(rec: xr.DataArray, s: Settings) -> None:
    if s.n_chan_bin is not None:
        n_file = int(rec.attrs.get("n_file_channels", rec.sizes["channel"]))
        if s.n_chan_bin != n_file:
            raise RecordingError(
                f"settings n_chan_bin={s.n_chan_bin} but the recording's file has {n_file} channels; spikearray "
                "reads the channel count from the file, so leave n_chan_bin out (or fix it)."
            )


def sort(recording: xr.DataArray, settings: Settings | dict | None = None, *, output: str | Path | None = None,
         progress: bool = True, client: Any = None, overwrite: bool = False, report: bool = False) -> xr.Dataset:
    """Spike-sort a recording.

    Parameters
    ----------
    recording : xarray.DataArray (time, channel)
        From :func:`spikearray.open_recording` (or :func:`spikearray.synthetic.generate_recording`).
    settings : Settings or dict, optional
        Kilosort4 parameter names and defaults, plus spikearray's own; a Kilosort4 settings dict works.
    output : path, optional
        Folder to write ``sorting.zarr`` and the Phy folder ``phy/`` into (atomically).
    progress : bool
        Print stage progress and show progress bars over chunks.
    client : dask.distributed.Client, optional
        Run the per-chunk stages on this cluster (default: dask's threaded scheduler).
    overwrite : bool
        Replace an existing output.
    report : bool
        Also write the HTML report into ``output/report``.

    Returns
    -------
    xarray.Dataset
        The Sorting Dataset (``docs/outputs.md``): per spike ``spike_time`` (int64 samples), ``spike_unit``,
        ``spike_amplitude`` (µV), ``spike_x``/``spike_depth`` (µm), ``spike_pc``; per unit ``template`` (µV),
        ``best_channel``, ``depth``, ``amplitude`` (µV), ``firing_rate`` (Hz), ``n_spikes``,
        ``contamination``, ``label``; ``displacement`` (µm); attrs with settings, version, timings.

    Examples
    --------
    >>> from spikearray.synthetic import generate_recording
    >>> rec, truth = generate_recording(duration=10, n_channels=32, n_units=5, seed=0)  # doctest: +SKIP
    >>> sorting = sort(rec, progress=False)  # doctest: +SKIP
    >>> sorting.sizes["unit"]  # doctest: +SKIP
    5
    """
    s = Settings.coerce(settings)
    _check_settings_against(recording, s)
    if output is not None and not overwrite and (Path(output) / "sorting.zarr").exists():
        raise OutputExistsError(
            f"{Path(output) / 'sorting.zarr'} already exists; pass overwrite=True (--overwrite) to replace it, "
            "or choose another output folder."
        )
    client = _current_client(client)
    store = StageStore(output, settings=s, identity=recording_identity(recording) if output is not None else None,
                       progress=progress)
    if store.enabled:
        if overwrite and store.root.exists():
            shutil.rmtree(store.root)  # overwrite = recompute everything
        store.clean_partials()
    rec, offset = _time_range(recording, s)
    rec = rec.chunk({"time": max(1, int(round(s.chunk_seconds * rec.attrs["sampling_rate"])))})
    timer = _Timer(progress)
    # dask's threads already use every core: BLAS threads inside them would oversubscribe (and OpenBLAS's
    # thread start-up dominates the many small SVDs and eigendecompositions of clustering and matching)
    with tempfile.TemporaryDirectory(prefix="spikearray-") as tmp, threadpool_limits(limits=1, user_api="blas"):
        sorting = _run(rec, s, timer, Path(tmp), progress=progress, client=client, store=store)
    if offset:
        sorting["spike_time"] = sorting["spike_time"] + offset
    sorting.attrs["time_offset_samples"] = int(offset)
    sorting.attrs["timings"] = json.dumps({k: round(v, 3) for k, v in timer.timings.items()})
    sorting.attrs["stages_skipped"] = json.dumps(store.skipped)
    if output is not None:
        _write_outputs(sorting, recording, Path(output), overwrite=overwrite, report=report, progress=progress)
        shutil.rmtree(store.root, ignore_errors=True)  # complete: the stage caches (and int16 copy) are spent
    return sorting


def _current_client(client: Any) -> Any:
    """The given client, else the current ``dask.distributed`` client if there is one, else None (threads)."""
    if client is not None:
        return client
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def _preprocess(rec: xr.DataArray, s: Settings, workdir: Path, store: StageStore, *, progress: bool,
                client: Any) -> tuple[xr.DataArray, xr.DataArray]:
    """Preprocessed traces (lazy, over an int16 copy) and the whitening matrix; cached with ``output``."""
    from ._cache import materialize, open_int16, write_int16
    from .preprocessing import preprocess

    if not store.enabled:
        white, whitening = preprocess(rec, s)
        return materialize(white, workdir / "preprocessed.int16", client=client, progress=progress), whitening
    h = store.hash("preprocess")
    meta = store.load("preprocess", h) if store.preprocessed_ready(h, rec.shape) else None
    if meta is None:
        white, whitening = preprocess(rec, s)
        store.invalidate_preprocessed()
        write_int16(white, store.preprocessed_path, scale=_SCALE, client=client, progress=progress)
        store.mark_preprocessed(h, white.shape, _SCALE)
        name = "" if white.name is None else str(white.name)
        packed = xr.Dataset({"whitening_matrix": whitening.variable}, coords=whitening.coords,
                            attrs={"white_attrs": json.dumps(white.attrs), "white_name": name})
        meta = store.save("preprocess", h, packed)
    whitening = meta["whitening_matrix"]
    white = open_int16(store.preprocessed_path, rec, scale=_SCALE, attrs=json.loads(meta.attrs["white_attrs"]))
    return (white.rename(meta.attrs["white_name"]) if meta.attrs["white_name"] else white), whitening


_SCALE = 200.0  # int16 = round(whitened × 200), Kilosort4's temp_wh.dat convention


def _run(rec: xr.DataArray, s: Settings, timer: _Timer, workdir: Path, *,
         progress: bool, client: Any, store: StageStore) -> xr.Dataset:
    """The stages, in order; ``workdir`` holds the preprocessed copy for the duration of an uncached run.

    With an output, each stage goes through ``store``: read back when finished earlier with the same inputs,
    else computed and saved (so a killed run resumes from its last finished stage).
    """
    from .clustering import cluster_spikes, full_templates
    from .detection import detect, learn_bases
    from .matching import match
    from .metrics.sorting import build_sorting, empty_sorting

    with timer.stage("preprocess"):
        white, whitening = _preprocess(rec, s, workdir, store, progress=progress, client=client)
    drift = None
    with timer.stage("drift"):
        if s.nblocks > 0:
            from .drift import correct, estimate

            drift = store.run("drift", lambda: estimate(white, s))
            corrected = correct(white, drift, device=s.device)
        else:
            corrected = white
    P, nC = s.n_pcs, min(s.nearest_chans, rec.sizes["channel"])
    try:
        with timer.stage("bases"):
            bases = store.run("bases", lambda: learn_bases(corrected, s))
    except DataError as e:
        warnings.warn(f"no spikes found: {e} Returning an empty sorting.", stacklevel=3)
        sorting = empty_sorting(rec, white, whitening, drift, s, timer.timings, s.nt, P, nC)
    else:
        with timer.stage("detect"):
            spikes = store.run("detect", lambda: detect(corrected, bases, s, progress=progress, client=client))
        with timer.stage("cluster"):
            def _cluster() -> xr.Dataset:
                clusters = cluster_spikes(spikes, bases, corrected, s)
                templates = full_templates(corrected, spikes, clusters, s, client=client)
                return clusters.assign({_TEMPLATES: (_TEMPLATE_DIMS, templates)})

            packed = store.run("cluster", _cluster)
            templates = packed[_TEMPLATES].values
        with timer.stage("match"):
            matched = store.run("match", lambda: match(corrected, templates, bases, s, progress=progress,
                                                       client=client))
        with timer.stage("merge+metrics"):
            sorting = build_sorting(matched, recording=rec, white=corrected, whitening=whitening, drift=drift,
                                    settings=s, timings=timer.timings)
        if sorting.sizes["unit"] == 0:
            warnings.warn("the sorting found no units; check the recording and thresholds.", stacklevel=3)
    return sorting


# the full templates (K, C, nt) travel in the cluster stage's Dataset under private names
_TEMPLATES = "_full_templates"
_TEMPLATE_DIMS = ("_template", "_template_channel", "_template_sample")


def _write_outputs(sorting: xr.Dataset, recording: xr.DataArray, out: Path, *, overwrite: bool, report: bool,
                   progress: bool) -> None:
    from .export.phy import export_phy
    from .export.zarr_store import write_sorting

    out.mkdir(parents=True, exist_ok=True)
    write_sorting(sorting, out, overwrite=overwrite)
    export_phy(sorting, recording, out / "phy", overwrite=overwrite)
    if report:
        from .report import write_report

        write_report(out, progress=progress)
