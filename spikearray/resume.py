"""Resumable runs: each finished cached stage of :func:`spikearray.sort` is saved with a hash of what produced it.

With ``sort(..., output=DIR)`` every cached stage of the stage table (:data:`spikearray.pipeline.STAGES`) goes
to ``DIR/.stages/<stage>.zarr``, written under a temporary name and renamed into place (a killed run never
leaves a store that looks finished), with the attr ``stage_hash`` (:func:`spikearray.pipeline.stage_hashes`:
the settings the stage reads plus its inputs' hashes). A stage may also write files of its own into
``DIR/.stages`` (the preprocess stage's int16 copy of the whitened traces); it lists them with their sizes in
its Dataset's ``files`` attr, and since the store is saved only after the stage returned, a store that loads
vouches for its files. A rerun reuses every stage whose store loads with the expected hash and intact files,
and recomputes the others; a stage's old store is removed before it is recomputed, so it never vouches for
files being rewritten.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import xarray as xr

__all__ = ["StageStore", "recording_identity", "STAGES_DIR"]

STAGES_DIR = ".stages"


def recording_identity(recording: xr.DataArray) -> dict[str, Any]:
    """What identifies a recording's samples without reading them.

    File-backed recordings: resolved path, size, modification time (ns), header offset; in-memory ones (e.g.
    the synthetic generator) the dask graph name, which dask derives from the inputs. Both add the shape,
    sampling rate, gains and the channel layout (file rows and µm positions).
    """
    a = recording.attrs
    ident: dict[str, Any] = {
        "shape": [int(v) for v in recording.shape],
        "sampling_rate": float(a.get("sampling_rate", 0.0)),
        "channel": np.asarray(recording["channel"].values).tolist() if "channel" in recording.coords else None,
        "x": np.asarray(recording["x"].values, float).tolist() if "x" in recording.coords else None,
        "y": np.asarray(recording["y"].values, float).tolist() if "y" in recording.coords else None,
        "gain_to_uV": np.asarray(recording["gain_to_uV"].values, float).tolist()
        if "gain_to_uV" in recording.coords else a.get("gain_to_uV"),
        "dtype_on_disk": str(a.get("dtype_on_disk", recording.dtype)),
    }
    source = a.get("source")
    if source and os.path.isfile(str(source)):
        st = os.stat(str(source))
        ident.update(source=os.path.realpath(str(source)), size=int(st.st_size), mtime_ns=int(st.st_mtime_ns),
                     offset=int(a.get("offset", 0)))
    else:
        from dask.base import tokenize

        data = recording.data
        ident["data"] = getattr(data, "name", None) or tokenize(np.asarray(data))
    return ident


class StageStore:
    """The ``DIR/.stages`` folder of one output: load a finished stage, or compute and save it.

    Every cached stage goes through :meth:`run` the same way. A stage's result is an ``xarray.Dataset`` or a
    named ``xarray.DataArray`` (saved as a one-variable Dataset and given back as the DataArray).

    Parameters
    ----------
    output : path or None
        The sorting's output folder; ``None`` disables caching (:meth:`run` just computes).
    progress : bool
        Print ``skipped <stage> (cached)`` for each stage read back.

    Attributes
    ----------
    skipped : list of str
        Stages read back instead of computed during this run, in order.

    Examples
    --------
    >>> import tempfile, xarray as xr
    >>> store = StageStore(tempfile.mkdtemp())
    >>> first = store.run("drift", "h1", lambda: xr.Dataset({"v": ("n", [1, 2])}))
    >>> again = store.run("drift", "h1", lambda: 1 / 0)  # read back, not computed
    >>> store.skipped
    ['drift']
    """

    def __init__(self, output: str | os.PathLike | None, *, progress: bool = False) -> None:
        self.enabled = output is not None
        self.root = Path(output) / STAGES_DIR if output is not None else None
        self.progress = progress
        self.skipped: list[str] = []

    def run(self, stage: str, h: str, compute: Callable[[], xr.Dataset | xr.DataArray]) -> xr.Dataset | xr.DataArray:
        """The stage's result: read back when complete with hash ``h``, else computed and saved (then read back:
        what a resumed run would see)."""
        if not self.enabled:
            return compute()
        ds = self.load(stage, h)
        if ds is None:
            self.discard(stage)  # an old store must never vouch for files the stage is about to rewrite
            ds = self.save(stage, h, compute())
        else:
            self._skip(stage)
        return _unwrap(ds)

    def complete(self, stage: str, h: str) -> bool:
        """True iff ``stage`` is saved with hash ``h`` and its files are intact (nothing is read but metadata)."""
        return self.enabled and self._open(stage, h) is not None

    # ------------------------------------------------------------------ Datasets
    def path(self, stage: str) -> Path:
        return self.root / f"{stage}.zarr"

    def load(self, stage: str, h: str) -> xr.Dataset | None:
        """The stage's Dataset (in memory, ``stage_hash`` attr removed) if complete with hash ``h``, else None."""
        from .errors import DamagedCacheWarning, SpikearrayError

        ds = self._open(stage, h)
        if ds is None:
            return None
        try:
            ds = ds.load()
        except SpikearrayError as e:  # damaged (stores are renamed into place only when complete): recompute
            warnings.warn(f"the cached {stage} stage {str(self.path(stage))!r} is damaged and is recomputed: {e}",
                          DamagedCacheWarning, stacklevel=3)
            return None
        del ds.attrs["stage_hash"]
        return ds

    def _open(self, stage: str, h: str) -> xr.Dataset | None:
        """The stage's store, lazily, if it has hash ``h`` and the files it lists are there in full."""
        from .errors import DamagedCacheWarning, SpikearrayError
        from .export.zarr_store import open_dataset

        p = self.path(stage)
        if not p.is_dir():
            return None
        try:
            ds = open_dataset(p)
        except SpikearrayError as e:
            warnings.warn(f"the cached {stage} stage {str(p)!r} is damaged and is recomputed: {e}",
                          DamagedCacheWarning, stacklevel=4)
            return None
        if ds.attrs.get("stage_hash") != h:
            return None
        for name, size in dict(ds.attrs.get("files", {})).items():
            f = self.root / name
            got = f.stat().st_size if f.is_file() else None
            if got != int(size):
                state = "missing" if got is None else f"{got} bytes instead of {int(size)}"
                warnings.warn(f"{str(f)!r}, a file of the cached {stage} stage, is {state} (cut short?); the "
                              "stage is recomputed.", DamagedCacheWarning, stacklevel=4)
                return None
        return ds

    def save(self, stage: str, h: str, result: xr.Dataset | xr.DataArray) -> xr.Dataset:
        """Write ``result`` atomically with its hash; return it as read back."""
        from .export.zarr_store import open_dataset, write_dataset_atomic

        self.root.mkdir(parents=True, exist_ok=True)
        if isinstance(result, xr.DataArray):
            out = result.to_dataset()
            out.attrs = {"stage_result": "DataArray"}
        else:
            out = result.copy()
            out.attrs = dict(result.attrs)
        out.attrs["stage_hash"] = h
        write_dataset_atomic(out, self.path(stage), overwrite=True)
        back = open_dataset(self.path(stage)).load()
        del back.attrs["stage_hash"]
        return back

    def discard(self, stage: str) -> None:
        """Remove the stage's store (before it is recomputed)."""
        if self.enabled:
            shutil.rmtree(self.path(stage), ignore_errors=True)

    def _skip(self, stage: str) -> None:
        self.skipped.append(stage)
        if self.progress:
            print(f"[spikearray] skipped {stage} (cached)", flush=True)

    def clean_partials(self) -> None:
        """Delete unfinished writes left by a killed run (``*.partial*`` beside the stage stores)."""
        if not self.root.is_dir():
            return
        for p in self.root.iterdir():
            if ".partial" in p.name or ".old-" in p.name:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _unwrap(ds: xr.Dataset) -> xr.Dataset | xr.DataArray:
    """A saved DataArray result is given back as the DataArray (its name, attrs and coords)."""
    if ds.attrs.get("stage_result") == "DataArray":
        (name,) = ds.data_vars
        return ds[name]
    return ds
