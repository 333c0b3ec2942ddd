"""``sort``: the whole pipeline, as one loop over the declarative stage table :data:`STAGES`.

Each stage is a public function of its own module; this module declares, in :data:`STAGES`, which function
each stage runs, which earlier results it takes, which settings it reads and whether its result is cached
with an output. From that one table come the order of the walk, each stage's cache hash (the settings it
reads plus its inputs' hashes, :func:`stage_hashes`), the resume behaviour (:class:`~spikearray.resume.StageStore`
wraps every cached stage the same way) and the stage table of ``docs/sorter.md`` (:func:`stage_table_markdown`).
The per-chunk work runs through the chunk engine (:mod:`spikearray._engine`) on dask's threaded scheduler or on
the current ``dask.distributed`` client.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import xarray as xr
from threadpoolctl import threadpool_limits

from ._compute import release_memory
from ._engine import show_progress
from ._lock import holds_output_lock, pid_alive
from ._version import __version__
from .errors import DataError, OutputExistsError, RecordingError
from .resume import StageStore, recording_identity
from .settings import IGNORED, PARAMETERS, Settings

__all__ = ["sort", "Stage", "STAGES", "stage_hashes", "stage_table_markdown"]


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



# ---------------------------------------------------------------------------------------------- the stage table
@dataclass(frozen=True)
class Run:
    """What every stage function gets besides its inputs: the settings and a folder for its files."""

    settings: Settings
    files: Path  # ``OUT/.stages`` with an output, else a temporary folder removed after the run


@dataclass(frozen=True)
class Stage:
    """One row of the stage table.

    Attributes
    ----------
    name : str
        Stage name (timings, ``stages_skipped``, progress lines, the cache store ``<name>.zarr``).
    function : callable
        ``function(*inputs, run=Run) -> xarray.Dataset | xarray.DataArray``.
    inputs : tuple of str
        Results it takes: ``"recording"`` or the ``output`` of an earlier stage.
    output : str
        Name of its result, for the stages after it.
    reads : tuple of str
        Every setting it reads (``Settings`` names). Those that change results enter its cache hash.
    cached : bool
        Saved in ``OUT/.stages`` and reused by a rerun whose hash matches.
    module : str
        Where the work is implemented (for the docs).
    does : str
        What it does (for the docs).
    work : str
        The kind of work: per chunk, sampled chunks, global (for the docs).
    ends_without_spikes : bool
        A :class:`~spikearray.errors.DataError` here means the recording has no spikes to sort: ``sort``
        returns an empty sorting instead of failing.
    """

    name: str
    function: Callable[..., Any]
    inputs: tuple[str, ...]
    output: str
    reads: tuple[str, ...]
    cached: bool
    module: str
    does: str
    work: str
    ends_without_spikes: bool = False


def _group(*groups: str) -> tuple[str, ...]:
    """Every setting whose owning stage (``Param.stage``) is one of ``groups``."""
    return tuple(p.name for p in PARAMETERS if p.stage in groups)


_SCALE = 200.0  # int16 = round(whitened × 200), Kilosort4's temp_wh.dat convention
_INT16 = "preprocessed.int16"


def _preprocess(rec: xr.DataArray, *, run: Run) -> xr.Dataset:
    from ._cache import write_int16
    from .preprocessing import preprocess

    white, whitening = preprocess(rec, run.settings)
    path = write_int16(white, run.files / _INT16, scale=_SCALE)
    # the traces' attrs and name travel as real (nested) attrs; ``files`` lets the store check the copy
    name = "" if white.name is None else str(white.name)
    return xr.Dataset({"whitening_matrix": whitening.variable}, coords=whitening.coords,
                      attrs={"traces_attrs": dict(white.attrs), "traces_name": name, "int16_scale": _SCALE,
                             "files": {_INT16: int(path.stat().st_size)}})


def _whitened(rec: xr.DataArray, preprocessed: xr.Dataset, *, run: Run) -> xr.DataArray:
    from ._cache import open_int16

    a = preprocessed.attrs
    white = open_int16(run.files / _INT16, rec, scale=float(a["int16_scale"]), attrs=dict(a["traces_attrs"]))
    return white.rename(a["traces_name"]) if a["traces_name"] else white


def _drift(white: xr.DataArray, *, run: Run) -> xr.Dataset:
    from .drift import estimate

    return estimate(white, run.settings)  # nblocks=0: a zero displacement marked drift_correction="off"


def _correct(white: xr.DataArray, drift: xr.Dataset, *, run: Run) -> xr.DataArray:
    from .drift import correct

    return correct(white, drift, device=run.settings.device)


def _bases(corrected: xr.DataArray, *, run: Run) -> xr.Dataset:
    from .detection import learn_bases

    return learn_bases(corrected, run.settings)


def _detect(corrected: xr.DataArray, bases: xr.Dataset, *, run: Run) -> xr.Dataset:
    from .detection import detect

    return detect(corrected, bases, run.settings)


def _cluster(spikes: xr.Dataset, bases: xr.Dataset, corrected: xr.DataArray, *, run: Run) -> xr.DataArray:
    from .clustering import cluster_spikes, full_templates

    clusters = cluster_spikes(spikes, bases, corrected, run.settings)
    return full_templates(corrected, spikes, clusters, run.settings)


def _match(corrected: xr.DataArray, templates: xr.DataArray, bases: xr.Dataset, *, run: Run) -> xr.Dataset:
    from .matching import match

    return match(corrected, templates, bases, run.settings)


def _recluster(matched: xr.Dataset, corrected: xr.DataArray, *, run: Run) -> xr.Dataset:
    from .clustering.final import drop_low_amplitude_mode, split_matched

    return drop_low_amplitude_mode(split_matched(matched, corrected, run.settings))


def _merge(matched: xr.Dataset, recording: xr.DataArray, corrected: xr.DataArray, preprocessed: xr.Dataset,
           drift: xr.Dataset, *, run: Run) -> xr.Dataset:
    from .metrics.sorting import build_sorting

    sorting = build_sorting(matched, recording=recording, white=corrected, whitening=preprocessed["whitening_matrix"],
                            drift=_drift_or_none(drift), settings=run.settings, timings={})
    sorting.attrs["n_low_mode_spikes"] = int(matched.attrs.get("n_low_mode_spikes", 0))
    return sorting


def _drift_or_none(drift: xr.Dataset | None) -> xr.Dataset | None:
    """The sorting carries no drift when correction was off (``nblocks=0``)."""
    return None if drift is None or drift.attrs.get("drift_correction") == "off" else drift


#: The stages of :func:`sort`, in order. Merges and metrics are cheap and always rerun.
STAGES: tuple[Stage, ...] = (
    Stage("preprocess", _preprocess, ("recording",), "preprocessed",
          _group("recording", "preprocessing") + ("chunk_seconds", "seed", "device", "torch_threads"), True,
          "spikearray.preprocessing, spikearray._cache",
          "zero-phase Butterworth high-pass, median common reference, local ZCA whitening (Kilosort4's "
          "semantics); the whitened traces are written once as int16 (×200, Kilosort4's `temp_wh.dat` "
          "convention) so later passes read them instead of re-filtering",
          "per chunk with a halo; one sampled estimate of the whitening matrix"),
    Stage("whitened", _whitened, ("recording", "preprocessed"), "white", (), False, "spikearray._cache",
          "the whitened traces, read lazily from the int16 copy", "per chunk (lazy)"),
    Stage("drift", _drift, ("white",), "drift",
          _group("drift") + ("batch_size", "device", "torch_threads"), True, "spikearray.drift",
          "peaks → depth × amplitude histograms per batch → decentralised registration (all batch pairs, "
          "robust least squares)", "per chunk → one global solve"),
    Stage("correct", _correct, ("white", "drift"), "corrected", ("device",), False, "spikearray.drift",
          "kriging interpolation of every channel by the displacement (`sig_interp`, saved with the drift)",
          "per chunk (lazy)"),
    Stage("bases", _bases, ("corrected",), "bases",
          ("nt", "nt0min", "n_pcs", "n_templates", "Th_single_ch", "batch_size", "batch_downsampling", "seed",
           "device"), True,
          "spikearray.detection.bases",
          "temporal PCs and prototype shapes from isolated single-channel peaks (Kilosort4's `wPCA`, `wTEMP`)",
          "sampled chunks", ends_without_spikes=True),
    Stage("detect", _detect, ("corrected", "bases"), "spikes",
          _group("detection") + ("device", "torch_threads"), True, "spikearray.detection.detect",
          "space-time matched filter, thresholded at `Th_universal`", "per chunk"),
    Stage("cluster", _cluster, ("spikes", "bases", "corrected"), "templates",
          _group("clustering") + ("nt", "nt0min", "dmin", "seed", "torch_threads"), True,
          "spikearray.clustering",
          "spikes grouped by depth (every `2·dmin`), each group clustered on its PCA features, templates "
          "de-duplicated, then full mean waveforms read back from the data", "per group; sampled chunks"),
    Stage("match", _match, ("corrected", "templates", "bases"), "matched",
          _group("matching") + ("nt", "nt0min", "nearest_chans", "n_pcs", "device", "torch_threads"), True,
          "spikearray.matching", "matching pursuit with the learned templates, thresholded at `Th_learned`",
          "per chunk"),
    Stage("recluster", _recluster, ("matched", "corrected"), "reclustered",
          ("seed", "cluster_init_seed", "nt", "nt0min", "acg_threshold", "torch_threads"), False,
          "spikearray.clustering.final",
          "each template's matched spikes split along their own PCs while the halves are bimodal (Kilosort4's "
          "final clustering, on one template at a time); the pieces' templates read back from the data; spikes "
          "a template fitted at a separate, much lower amplitude mode (other neurons') dropped",
          "per template; sampled chunks"),
    Stage("merge+metrics", _merge, ("reclustered", "recording", "corrected", "preprocessed", "drift"), "sorting",
          _group("merging", "metrics") + ("batch_size", "nearest_chans"), False,
          "spikearray.clustering.merge, spikearray.metrics",
          "merges, duplicate removal, µV templates and amplitudes, positions, contamination, labels",
          "global, on the spike table"),
)

# settings that change where the work runs, not what it computes: read, never hashed
_WHERE = frozenset({"device", "torch_threads"})


def _hashed(stage: Stage) -> list[str]:
    """The settings in ``stage``'s own hash: those it reads, less the ignored and the where-it-runs ones."""
    return sorted(set(stage.reads) - IGNORED - _WHERE)


def stage_hashes(settings: Settings, identity: dict[str, Any] | None) -> dict[str, str]:
    """sha256 (hex) of every stage: its name, the spikearray version, the settings it reads, its inputs' hashes.

    ``"recording"`` hashes the recording's identity (:func:`spikearray.resume.recording_identity`). A stage's
    hash changes exactly when a setting it reads or one of its inputs changes, so a rerun recomputes the
    stages a changed setting touches and the ones downstream of them, and reuses the rest.

    Examples
    --------
    >>> import spikearray as sa
    >>> a = stage_hashes(sa.Settings(), {"data": "x"})
    >>> b = stage_hashes(sa.Settings(Th_learned=7.0), {"data": "x"})
    >>> [st.name for st in STAGES if a[st.name] != b[st.name]]
    ['match', 'merge+metrics']
    """
    values = settings.to_dict()
    hashes = {"recording": _sha({"recording": identity})}
    by_output = {"recording": "recording"}
    for st in STAGES:
        payload = {"stage": st.name, "version": __version__, "settings": {k: values[k] for k in _hashed(st)},
                   "inputs": {i: hashes[by_output[i]] for i in st.inputs}}
        hashes[st.name] = _sha(payload)
        by_output[st.output] = st.name
    return hashes


def _sha(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def stage_table_markdown() -> str:
    """The stage table of ``docs/sorter.md``, generated from :data:`STAGES` (``docs/_gen_stages.py`` writes it)."""
    rows = ["| stage | module | what it does | kind of work | takes → gives | cached |",
            "| --- | --- | --- | --- | --- | --- |"]
    for st in STAGES:
        mods = ", ".join(f"`{m.strip()}`" for m in st.module.split(","))
        rows.append(f"| {st.name} | {mods} | {st.does} | {st.work} | {', '.join(st.inputs)} → {st.output} | "
                    f"{'yes' if st.cached else 'no'} |")
    return "\n".join(rows) + "\n"


def _walk(rec: xr.DataArray, s: Settings, timer: _Timer, files: Path, store: StageStore,
          hashes: dict[str, str]) -> xr.Dataset:
    """The recording through :data:`STAGES`: each stage's inputs from the results so far, its output added."""
    run = Run(settings=s, files=files)
    results: dict[str, Any] = {"recording": rec}
    for st in STAGES:
        args = [results[i] for i in st.inputs]
        try:
            with timer.stage(st.name):
                if st.cached:
                    results[st.output] = store.run(st.name, hashes[st.name], lambda: st.function(*args, run=run))
                else:
                    results[st.output] = st.function(*args, run=run)
        except DataError as e:
            if not st.ends_without_spikes:
                raise
            warnings.warn(f"no spikes found: {e} Returning an empty sorting.", stacklevel=3)
            return _empty(results, s, timer)
    sorting = results["sorting"]
    if sorting.sizes["unit"] == 0:
        warnings.warn("the sorting found no units; check the recording and thresholds.", stacklevel=3)
    return sorting


def _empty(results: dict[str, Any], s: Settings, timer: _Timer) -> xr.Dataset:
    from .metrics.sorting import empty_sorting

    rec = results["recording"]
    return empty_sorting(rec, results["white"], results["preprocessed"]["whitening_matrix"],
                         _drift_or_none(results.get("drift")), s, timer.timings, s.nt, s.n_pcs,
                         min(s.nearest_chans, rec.sizes["channel"]))


@holds_output_lock  # one run per output folder: a second sort into it refuses (OutputLockedError)
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
        Run the per-chunk stages on this cluster (default: the current ``dask.distributed`` client if there is
        one, else dask's threaded scheduler; see :mod:`spikearray._engine`).
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
    store = StageStore(output, progress=progress)
    hashes = stage_hashes(s, recording_identity(recording) if output is not None else None)
    if store.enabled:
        if overwrite and store.root.exists():
            shutil.rmtree(store.root)  # overwrite = recompute everything
        store.clean_partials()
    rec, offset = _time_range(recording, s)
    rec = rec.chunk({"time": max(1, int(round(s.chunk_seconds * rec.attrs["sampling_rate"])))})
    if store.enabled and not store.complete("preprocess", hashes["preprocess"]):
        from ._cache import require_space_for_int16  # say "disk too small" now, not after hours of work

        require_space_for_int16(store.root / _INT16, rec.shape)
    timer = _Timer(progress)
    # dask's threads already use every core: BLAS threads inside them would oversubscribe (and OpenBLAS's
    # thread start-up dominates the many small SVDs and eigendecompositions of clustering and matching). The
    # chunk engine reads the progress flag and the current client: a given client is made current for the run.
    with _scratch(store.root if store.enabled else None) as files, threadpool_limits(limits=1, user_api="blas"), \
            show_progress(progress), (client.as_current() if client is not None else nullcontext()):
        sorting = _walk(rec, s, timer, files, store, hashes)
    if offset:
        sorting["spike_time"] = sorting["spike_time"] + offset
    sorting.attrs["time_offset_samples"] = int(offset)
    sorting.attrs["timings"] = json.dumps({k: round(v, 3) for k, v in timer.timings.items()})
    sorting.attrs["stages_skipped"] = json.dumps(store.skipped)
    if output is not None:
        _write_outputs(sorting, recording, Path(output), overwrite=overwrite, report=report, progress=progress)
        shutil.rmtree(store.root, ignore_errors=True)  # complete: the stage caches (and int16 copy) are spent
    return sorting


#: Marker in a sort's scratch folder: ``host pid`` of the process that owns it.
_SCRATCH_OWNER = "owner.pid"


def clean_stale_scratch(root: str | Path | None = None) -> list[Path]:
    """Remove scratch folders (``spikearray-*`` in the temporary directory) left by sorts that were killed.

    A sort without an ``output`` writes its preprocessed int16 copy (2 bytes per sample and channel: 13 GB for
    600 s of 384 channels) into a temporary folder, removed when the sort ends, even on an error; a process
    killed outright (SIGKILL, out of memory, power) cannot remove it. Each such folder names its owner (host
    and process id); a folder of this host whose process no longer runs is removed. Folders of live
    processes, of other hosts, and without the marker (older versions, the demo's output) are kept.

    Returns
    -------
    list of Path
        The folders removed.
    """
    removed = []
    for d in sorted(Path(root or tempfile.gettempdir()).glob("spikearray-*")):
        try:
            host, pid = (d / _SCRATCH_OWNER).read_text().split()
            pid_ = int(pid)
        except (OSError, ValueError):
            continue
        if host != socket.gethostname() or pid_ == os.getpid() or pid_alive(pid_):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


@contextmanager
def _scratch(folder: Path | None) -> Iterator[Path]:
    """The folder a sort writes its intermediate files to: ``folder`` (the output's stage store) or, without
    one, a temporary folder that names its owner, after removing those of killed sorts."""
    if folder is not None:
        yield folder
        return
    clean_stale_scratch()
    with tempfile.TemporaryDirectory(prefix="spikearray-") as tmp:
        (Path(tmp) / _SCRATCH_OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        yield Path(tmp)


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
