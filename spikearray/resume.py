"""Resumable runs: each finished stage of :func:`spikearray.sort` is saved with a hash of what produced it.

With ``sort(..., output=DIR)`` every stage result goes to ``DIR/.stages/<stage>.zarr`` (written under a
temporary name and renamed into place, so a killed run never leaves a store that looks finished), with the
attr ``stage_hash``. The preprocessed int16 copy of the recording lives in ``DIR/.stages/preprocessed.int16``
with a JSON marker ``preprocessed.int16.json`` written only after the file is complete.

A stage's hash covers the stage name, the spikearray version, the settings that can change its result (its own
parameter group and, through the parent hash, every earlier group), the recording's identity (path, size,
modification time, shape, channel layout) and the hash of the stage before it. A rerun therefore skips every
stage whose hash matches and recomputes from the first stage touched by a changed setting onwards. Purely
computational settings (``device``, ``torch_threads``) are left out: they change where the work runs, not what
it computes.

Stage chain (parent → child)::

    preprocess → drift → bases → detect → cluster → match      (merges + metrics are cheap and always rerun)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import xarray as xr

from ._version import __version__
from .settings import PARAMETERS, Settings

__all__ = ["STAGES", "StageStore", "stage_hash", "recording_identity", "STAGES_DIR"]

STAGES_DIR = ".stages"
#: the cached stages, in order
STAGES = ("preprocess", "drift", "bases", "detect", "cluster", "match")
# Parameter groups (``Param.stage``) whose values enter each stage's hash; earlier groups enter through the
# parent hash. ``merging`` and ``metrics`` are only read after matching, by the step that is never cached.
_GROUPS = {
    "preprocess": ("recording", "preprocessing"),
    "drift": ("drift",),
    "bases": ("detection",),
    "detect": ("detection",),
    "cluster": ("clustering",),
    "match": ("matching",),
}
_LATE_GROUPS = ("merging", "metrics")
# compute-group settings that do change results (chunk boundaries, random choices); the rest do not
_RESULT_COMPUTE = ("chunk_seconds", "seed")
_KNOWN = {g for gs in _GROUPS.values() for g in gs} | set(_LATE_GROUPS) | {"compute"}


def _stage_params(stage: str) -> list[str]:
    """Setting names hashed into ``stage`` (besides those reaching it through its parent).

    Parameters marked ``Param.ignored`` (accepted for Kilosort4 compatibility, read by no stage) are left out:
    changing one must not invalidate a cached stage.
    """
    names = [p.name for p in PARAMETERS if p.stage in _GROUPS[stage] and not p.ignored]
    if stage == "preprocess":
        # a parameter group this module does not know yet is hashed at the root: safe (recomputes everything)
        names += [p.name for p in PARAMETERS if p.stage not in _KNOWN and not p.ignored] + list(_RESULT_COMPUTE)
    return names


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


def stage_hash(stage: str, settings: Settings, parent: str | None = None,
               identity: dict[str, Any] | None = None) -> str:
    """sha256 (hex) of a stage's inputs: name, version, its settings, the recording identity, the parent hash."""
    if stage not in _GROUPS:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}.")
    values = settings.to_dict()
    payload = {
        "stage": stage,
        "version": __version__,
        "settings": {k: values[k] for k in sorted(_stage_params(stage))},
        "parent": parent,
        "recording": identity,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class StageStore:
    """The ``DIR/.stages`` folder of one output: load a finished stage, or save one.

    Parameters
    ----------
    output : path or None
        The sorting's output folder; ``None`` disables caching (:meth:`run` just computes).
    settings : Settings
        The run's settings (hashed per stage).
    identity : dict, optional
        :func:`recording_identity` of the recording (hashed into the first stage).
    progress : bool
        Print ``skipped <stage> (cached)`` for each stage read back.

    Attributes
    ----------
    skipped : list of str
        Stages read back instead of computed during this run, in order.
    """

    def __init__(self, output: str | os.PathLike | None, *, settings: Settings, identity: dict[str, Any] | None = None,
                 progress: bool = False) -> None:
        self.enabled = output is not None
        self.root = Path(output) / STAGES_DIR if output is not None else None
        self.settings = settings
        self.identity = identity
        self.progress = progress
        self.skipped: list[str] = []
        self.hashes: dict[str, str] = {}

    def hash(self, stage: str) -> str:
        """The hash of ``stage`` for this run (parent: the previous stage in :data:`STAGES`)."""
        if stage not in self.hashes:
            i = STAGES.index(stage)
            parent = self.hash(STAGES[i - 1]) if i else None
            self.hashes[stage] = stage_hash(stage, self.settings, parent, self.identity if i == 0 else None)
        return self.hashes[stage]

    def run(self, stage: str, compute: Callable[[], xr.Dataset]) -> xr.Dataset:
        """The stage's result: read back when complete with a matching hash, else computed (and saved)."""
        if not self.enabled:
            return compute()
        h = self.hash(stage)
        ds = self.load(stage, h)
        return ds if ds is not None else self.save(stage, h, compute())

    # ------------------------------------------------------------------ Datasets
    def path(self, stage: str) -> Path:
        return self.root / f"{stage}.zarr"

    def load(self, stage: str, h: str) -> xr.Dataset | None:
        """The stage's Dataset (in memory, ``stage_hash`` attr removed) if complete with hash ``h``, else None."""
        from .errors import SpikearrayError
        from .export.zarr_store import open_dataset

        p = self.path(stage)
        if not p.is_dir():
            return None
        try:
            ds = open_dataset(p)
            if ds.attrs.get("stage_hash") != h:
                return None
            ds = ds.load()
        except SpikearrayError as e:  # damaged (stores are renamed into place only when complete): recompute
            import warnings

            from .errors import DamagedCacheWarning

            warnings.warn(f"the cached {stage} stage {str(p)!r} is damaged and is recomputed: {e}",
                          DamagedCacheWarning, stacklevel=3)
            return None
        del ds.attrs["stage_hash"]
        self._skip(stage)
        return ds

    def save(self, stage: str, h: str, ds: xr.Dataset) -> xr.Dataset:
        """Write ``ds`` atomically with its hash; return it as read back (what a resumed run would see)."""
        from .export.zarr_store import open_dataset, write_dataset_atomic

        self.root.mkdir(parents=True, exist_ok=True)
        out = ds.copy()
        out.attrs = dict(ds.attrs, stage_hash=h)
        write_dataset_atomic(out, self.path(stage), overwrite=True)
        back = open_dataset(self.path(stage)).load()
        del back.attrs["stage_hash"]
        return back

    def _skip(self, stage: str) -> None:
        self.skipped.append(stage)
        if self.progress:
            print(f"[spikearray] skipped {stage} (cached)", flush=True)

    # ------------------------------------------------------------------ the preprocessed int16 copy
    @property
    def preprocessed_path(self) -> Path:
        return self.root / "preprocessed.int16"

    @property
    def _marker(self) -> Path:
        return self.root / "preprocessed.int16.json"

    def preprocessed_ready(self, h: str, shape: tuple[int, int]) -> bool:
        """True iff the int16 copy is complete (marker written after it) for hash ``h`` and ``shape``."""
        try:
            meta = json.loads(self._marker.read_text())
        except (OSError, ValueError):
            return False
        n, c = (int(v) for v in shape)
        if not (meta.get("stage_hash") == h and meta.get("shape") == [n, c]):
            return False
        f = self.preprocessed_path
        size = f.stat().st_size if f.is_file() else None
        if size == 2 * n * c:
            return True
        if str(f) not in getattr(self, "_warned", set()):  # its marker vouched for it: damage, say so once
            import warnings

            from .errors import DamagedCacheWarning

            self._warned = getattr(self, "_warned", set()) | {str(f)}
            state = "missing" if size is None else f"{size} bytes instead of 2 x {n} x {c} = {2 * n * c}"
            warnings.warn(f"the preprocessed int16 copy {str(f)!r} is {state} (cut short?); it is recomputed.",
                          DamagedCacheWarning, stacklevel=2)
        return False

    def invalidate_preprocessed(self) -> None:
        """Remove the marker before a new copy is written, so an old marker never vouches for a new file."""
        self._marker.unlink(missing_ok=True)

    def mark_preprocessed(self, h: str, shape: tuple[int, int], scale: float) -> None:
        """Write the marker (atomically) once the int16 copy is complete."""
        tmp = self._marker.with_name(self._marker.name + ".partial")
        tmp.write_text(json.dumps({"stage_hash": h, "shape": [int(v) for v in shape], "scale": float(scale)}))
        os.replace(tmp, self._marker)

    def clean_partials(self) -> None:
        """Delete unfinished writes left by a killed run (``*.partial*`` beside the stage stores)."""
        if not self.root.is_dir():
            return
        for p in self.root.iterdir():
            if ".partial" in p.name or ".old-" in p.name:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
