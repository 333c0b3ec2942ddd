"""The Sorting Dataset in Zarr: ``<out>/sorting.zarr``, written atomically and reopened lazily.

Why not ``Dataset.to_zarr``: xarray >= 2026 requires zarr-python 3, while SpikeInterface 0.105 pins
``zarr<3`` on Python < 3.14, so environments with both have zarr 2.18 and xarray's Zarr backend fails there
(``open_group() got an unexpected keyword argument 'zarr_format'``). This module writes and reads the store
through zarr-python's own API, which works under zarr 2.18 (Zarr format 2) and zarr >= 3 (format 3). It follows
xarray's conventions (``_ARRAY_DIMENSIONS`` in format 2, ``dimension_names`` in format 3, a root
``coordinates`` attribute listing non-index coordinates, consolidated metadata), so ``xr.open_zarr`` reads the
same store wherever xarray and zarr agree.

Round trip is exact: variable names, dims, dtypes (strings included: fixed ``<U`` and object), values, coords,
and attrs (JSON types; tuples come back as lists).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from dask.base import tokenize

from ..errors import DamagedStoreError, IncompleteOutputError, OutputError
from ._atomic import PARTIAL_MARK, atomic_dir, partial_siblings

__all__ = ["write_sorting", "open_sorting", "write_dataset_atomic", "write_dataset", "open_dataset",
           "jsonable", "STORE_NAME", "ZARR_FORMAT"]

STORE_NAME = "sorting.zarr"
ZARR_FORMAT = 3 if int(zarr.__version__.split(".")[0]) >= 3 else 2
_DTYPE_ATTR = "_spikearray_dtype"  # numpy dtype of the variable, so strings come back as written
_DIMS_ATTR = "_ARRAY_DIMENSIONS"  # xarray's convention for Zarr format 2
_CHUNK_BYTES = 16 * 2**20


# ----------------------------------------------------------------------------------------------- attributes
def jsonable(value: Any, where: str = "attrs") -> Any:
    """Convert an attribute value to plain JSON types (numpy scalars/arrays, tuples, paths included).

    Raises
    ------
    OutputError
        The value (or something inside it) has no JSON form; ``where`` names it in the message.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist(), where)
    if isinstance(value, (list, tuple)):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): jsonable(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise OutputError(
        f"{where} = {value!r} is a {type(value).__name__}, which cannot be stored as a JSON attribute; convert it "
        "to a str, number, bool, list or a JSON string first."
    )


def _allow_nan_roundtrip(attrs: dict) -> dict:
    # zarr writes attrs with json.dumps; NaN/inf survive as JSON extensions that both zarr versions read back.
    json.dumps(attrs)
    return attrs


# ----------------------------------------------------------------------------------------------- zarr layer
def _open_group_for_writing(path: Path):
    if ZARR_FORMAT == 3:
        return zarr.open_group(str(path), mode="w", zarr_format=3)
    return zarr.open_group(str(path), mode="w")


def _open_group_consolidated(path: Path):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        return zarr.open_consolidated(str(path), mode="r")


def _create_array(group, name: str, shape: tuple, dtype: np.dtype, chunks: tuple, dims: tuple):
    if ZARR_FORMAT == 3:
        # Variable-length strings have a registered v3 data type (fixed-width UTF-32 does not); the numpy dtype
        # is restored on read from the _spikearray_dtype attr.
        zdtype = str if dtype.kind in "OU" else dtype
        return group.create_array(name, shape=shape, dtype=zdtype, chunks=chunks, dimension_names=dims)
    kw = {}
    if dtype.kind == "O":
        from numcodecs import VLenUTF8

        kw["object_codec"] = VLenUTF8()
    arr = group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, **kw)
    arr.attrs[_DIMS_ATTR] = list(dims)
    return arr


def _array_dims(arr, attrs: dict) -> tuple:
    dims = attrs.pop(_DIMS_ATTR, None)
    if dims is None and ZARR_FORMAT == 3:
        dims = getattr(arr.metadata, "dimension_names", None)
    if dims is None:
        raise OutputError(f"Zarr array {arr.name!r} has no dimension names; it was not written by spikearray/xarray.")
    return tuple(dims)


def _chunks_for(shape: tuple, itemsize: int) -> tuple:
    """Chunk along the first dimension only, ~16 MB per chunk (never 0-sized)."""
    if not shape:
        return ()
    row = max(1, itemsize * int(np.prod(shape[1:], dtype=np.int64)))
    first = int(min(max(shape[0], 1), max(1, _CHUNK_BYTES // row)))
    return (first,) + tuple(max(1, s) for s in shape[1:])


def _check_strings(name: str, values: np.ndarray) -> None:
    if values.dtype.kind == "O" and values.size:
        bad = [v for v in values.ravel()[:1000] if not isinstance(v, str)]
        if bad:
            raise OutputError(f"variable {name!r} has object dtype with non-string values (e.g. {bad[0]!r}); "
                              "only str objects can be stored.")


def write_dataset(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write ``ds`` to a new Zarr store at ``path`` (no atomicity; see :func:`write_dataset_atomic`).

    Parameters
    ----------
    ds : xarray.Dataset
        Numeric, bool or string variables; numpy- or dask-backed (dask variables are streamed chunk by chunk).
    path : path
        Store folder; must not hold another store.

    Returns
    -------
    Path
    """
    path = Path(path)
    root_attrs = jsonable(dict(ds.attrs), "Dataset attrs")
    if "coordinates" in root_attrs:
        raise OutputError("Dataset attr 'coordinates' is reserved (it lists the non-index coordinates); rename it.")
    group = _open_group_for_writing(path)
    for name, var in ds.variables.items():
        name = str(name)
        if "/" in name or name.startswith("."):
            raise OutputError(f"variable name {name!r} cannot be a Zarr array name; avoid '/' and a leading '.'.")
        if var.dtype.kind in "mMcV":
            raise OutputError(f"variable {name!r} has dtype {var.dtype}, which spikearray does not store; convert it.")
        attrs = jsonable(dict(var.attrs), f"attrs of {name!r}")
        dtype = var.dtype
        chunks = _chunks_for(var.shape, dtype.itemsize if dtype.kind != "O" else 64)
        arr = _create_array(group, name, var.shape, dtype, chunks, tuple(str(d) for d in var.dims))
        arr.attrs.update(_allow_nan_roundtrip({**attrs, _DTYPE_ATTR: dtype.str}))
        if var.size == 0:
            continue
        data = var.data
        if isinstance(data, da.Array):
            if dtype.kind == "O":
                data = data.compute()
            else:
                da.store(data.rechunk(chunks), arr, lock=False, compute=True)
                continue
        values = np.asarray(data)
        _check_strings(name, values)
        arr[...] = values
    coord_names = sorted(str(k) for k in ds.coords if not (ds[k].ndim == 1 and ds[k].dims[0] == k))
    if coord_names:
        root_attrs["coordinates"] = " ".join(coord_names)
    group.attrs.update(_allow_nan_roundtrip(root_attrs))
    with warnings.catch_warnings():  # zarr 3 warns that consolidated metadata is a zarr-python extension
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        zarr.consolidate_metadata(str(path))  # last step: readers require the consolidated metadata
    return path


def write_dataset_atomic(ds: xr.Dataset, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``ds`` to ``path`` under a temporary name and rename it into place when complete.

    Reused by every persisted output (the sorting store, stage caches): a crash never leaves a store at ``path``.

    Raises
    ------
    OutputExistsError
        ``path`` exists and ``overwrite`` is False (the existing store is left untouched).
    DiskFullError
        The filesystem filled up; the partial store was deleted and an existing store at ``path`` is untouched.
    """
    path = Path(path)
    needed = int(sum(v.nbytes for v in ds.variables.values()))  # uncompressed: an upper estimate
    with atomic_dir(path, overwrite=overwrite, what="Zarr store", needed=needed) as tmp:
        write_dataset(ds, tmp)
    return path


_FIX = ("Copy the store again from where it came from, or recreate it (sort(..., overwrite=True) / "
        "write_sorting(..., overwrite=True)).")


def _metadata_files(path: Path) -> tuple[Path, list[Path]]:
    """The consolidated-metadata file of a store, and the metadata files it says the store has."""
    if ZARR_FORMAT == 2:
        root = path / ".zmetadata"
        try:
            keys = list(json.loads(root.read_text()).get("metadata", {}))
        except (OSError, ValueError, AttributeError):
            keys = []
        return root, [path / k for k in keys]
    root = path / "zarr.json"
    try:
        meta = json.loads(root.read_text())
        names = list((meta.get("consolidated_metadata") or {}).get("metadata", {}))
    except (OSError, ValueError, AttributeError):
        names = []
    return root, [path / n / "zarr.json" for n in names]


def _check_metadata(path: Path) -> None:
    """Every metadata file the consolidated metadata lists must exist and hold JSON (else DamagedStoreError)."""
    _, files = _metadata_files(path)
    for f in files:
        rel = f.relative_to(path).as_posix()
        if not f.is_file():
            raise DamagedStoreError(
                f"the Zarr store {str(path)!r} is damaged: its metadata file {rel!r} is missing (the consolidated "
                f"metadata lists it). {_FIX}"
            )
        try:
            json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise DamagedStoreError(
                f"the Zarr store {str(path)!r} is damaged: its metadata file {rel!r} ({f.stat().st_size} bytes) is "
                f"not valid JSON ({e}); it was cut short or overwritten. {_FIX}"
            ) from None


def _chunk_file(path: Path, name: str, arr: Any, idx: tuple) -> Path:
    if ZARR_FORMAT == 2:
        sep = getattr(arr, "_dimension_separator", None) or "."
        return path / name / (sep.join(str(i) for i in idx) if idx else "0")
    try:
        key = arr.metadata.encode_chunk_key(idx)
    except AttributeError:  # pragma: no cover - zarr 3 API drift
        key = "c/" + "/".join(str(i) for i in idx)
    return path / name / key


def _check_chunks(path: Path, name: str, arr: Any) -> None:
    """Format 2 stores get every chunk written (``write_empty_chunks``): a missing chunk file is damage.

    (Under zarr >= 3 chunks equal to the fill value are legitimately absent, so this check does not apply.)
    """
    if ZARR_FORMAT != 2 or arr.size == 0:
        return
    grid = tuple(int(v) for v in arr.cdata_shape)
    if int(np.prod(grid)) == int(arr.nchunks_initialized):
        return
    import itertools

    for idx in itertools.product(*(range(g) for g in grid)):
        f = _chunk_file(path, name, arr, idx)
        if not f.is_file():
            raise DamagedStoreError(
                f"the Zarr store {str(path)!r} is damaged: chunk file {f.relative_to(path).as_posix()!r} of "
                f"variable {name!r} is missing ({int(arr.nchunks_initialized)} of {int(np.prod(grid))} chunks are "
                f"there; an interrupted copy?). Reading it would give fill values instead of data. {_FIX}"
            )


class _CheckedArray:
    """Read-only array view of a Zarr array that reports an undecodable chunk as :class:`DamagedStoreError`.

    Picklable (it holds the zarr array, which pickles as its store path), so dask-distributed workers use it too.
    """

    def __init__(self, arr: Any, store: Path, name: str) -> None:
        self.arr, self.store, self.name = arr, str(store), name
        self.shape, self.ndim, self.chunks = tuple(arr.shape), arr.ndim, tuple(arr.chunks)
        self.dtype = arr.dtype

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            return self.arr[key]
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise self._damage(e) from None

    def _damage(self, first: Exception) -> DamagedStoreError:
        import itertools

        store = Path(self.store)
        grid = [range(-(-s // c)) for s, c in zip(self.shape, self.chunks)]
        for idx in itertools.product(*grid):
            region = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, self.chunks, self.shape))
            try:
                self.arr[region]
            except Exception as e:  # this chunk is the bad one
                f = _chunk_file(store, self.name, self.arr, idx)
                what = f"({f.stat().st_size} bytes)" if f.is_file() else "(missing)"
                return DamagedStoreError(
                    f"the Zarr store {self.store!r} is damaged: chunk file {f.relative_to(store).as_posix()!r} of "
                    f"variable {self.name!r} {what} cannot be decoded ({type(e).__name__}: {e}); it was cut short "
                    f"or corrupted. {_FIX}"
                )
        return DamagedStoreError(f"reading variable {self.name!r} of the Zarr store {self.store!r} failed "
                                 f"({type(first).__name__}: {first}); the store may be damaged. {_FIX}")


def open_dataset(path: str | os.PathLike) -> xr.Dataset:
    """Open a store written by :func:`write_dataset` lazily (dask arrays; index coords and strings loaded).

    Damage is reported as :class:`DamagedStoreError` naming the file: a missing or unreadable metadata file
    and (Zarr format 2) a missing chunk file at open, a chunk that cannot be decoded (cut short, corrupted)
    when it is read.

    Raises
    ------
    IncompleteOutputError
        The path is an unfinished ``.partial-`` store, or the store lacks its consolidated metadata.
    DamagedStoreError
        A metadata or chunk file of a finished store is missing, cut short or corrupted.
    OutputError
        Not a Zarr store written by spikearray/xarray.
    """
    path = Path(path)
    if PARTIAL_MARK in path.name:
        raise IncompleteOutputError(f"{str(path)!r} is an unfinished store left by an interrupted write; "
                                    "delete it and write again.")
    if not path.is_dir():
        raise OutputError(f"{str(path)!r} is not a Zarr store folder.")
    try:
        group = _open_group_consolidated(path)
    except Exception as e:  # zarr raises KeyError/ValueError/FileNotFoundError depending on version
        root_file = _metadata_files(path)[0]
        state = ("missing" if not root_file.is_file() else
                 f"{root_file.stat().st_size} bytes and unreadable (cut short or not a consolidated store)")
        raise IncompleteOutputError(
            f"{str(path)!r} has no consolidated Zarr metadata: {root_file.name!r} is {state} ({type(e).__name__}: "
            f"{e}); it is not a finished spikearray store. Write it again."
        ) from None
    _check_metadata(path)
    try:
        root = dict(group.attrs)
        arrays = list(group.arrays())
    except Exception as e:
        raise DamagedStoreError(f"the Zarr store {str(path)!r} is damaged: its metadata cannot be read "
                                f"({type(e).__name__}: {e}). {_FIX}") from None
    coord_names = set(str(root.pop("coordinates", "")).split())
    stamp = tokenize(str(path.resolve()), os.stat(path).st_mtime_ns)
    variables: dict[str, xr.Variable] = {}
    for name, zarr_arr in arrays:
        attrs = dict(zarr_arr.attrs)
        dims = _array_dims(zarr_arr, attrs)
        _check_chunks(path, name, zarr_arr)
        arr = _CheckedArray(zarr_arr, path, name)
        dtype = np.dtype(attrs.pop(_DTYPE_ATTR, arr.dtype.str if hasattr(arr.dtype, "str") else "O"))
        eager = dtype.kind in "OUS" or (len(dims) == 1 and dims[0] == name) or zarr_arr.size == 0
        if eager:
            values = np.asarray(arr[...]) if zarr_arr.size else np.empty(arr.shape, dtype)
            if values.dtype != dtype:
                values = values.astype(dtype)
            data: Any = values
        else:
            data = da.from_array(arr, chunks=arr.chunks, name=f"zarr-{name}-{stamp}", lock=False,
                                 meta=np.empty((0,) * len(dims), dtype))
            if data.dtype != dtype:
                data = data.astype(dtype)
        variables[name] = xr.Variable(dims, data, attrs=attrs)
    coords = {k: v for k, v in variables.items() if k in coord_names or (v.ndim == 1 and v.dims[0] == k)}
    data_vars = {k: v for k, v in variables.items() if k not in coords}
    return xr.Dataset(data_vars, coords=coords, attrs=root)


# ----------------------------------------------------------------------------------------------- sorting
def _store_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p if p.suffix == ".zarr" else p / STORE_NAME


_REQUIRED = ("spike_time", "spike_unit")


def write_sorting(sorting: xr.Dataset, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a Sorting Dataset to ``<path>/sorting.zarr`` (or to ``path`` itself if it ends in ``.zarr``).

    The store is written under a temporary name and renamed when complete, with consolidated metadata and all
    attributes as JSON; Zarr format 3 under zarr-python >= 3, format 2 under zarr 2.18.

    Parameters
    ----------
    sorting : xarray.Dataset
        The Sorting Dataset (see ``docs/outputs.md``).
    path : path
        Output folder (the store goes to ``path/sorting.zarr``) or a ``*.zarr`` store path.
    overwrite : bool
        Replace an existing store; the old one is removed only after the new one is in place.

    Returns
    -------
    Path
        The store path.

    Raises
    ------
    OutputExistsError
        The store exists and ``overwrite`` is False.
    OutputError
        ``sorting`` is not a Sorting Dataset or holds values that cannot be stored.
    """
    if not isinstance(sorting, xr.Dataset):
        raise OutputError(f"write_sorting needs an xarray.Dataset, got {type(sorting).__name__}.")
    missing = [k for k in _REQUIRED if k not in sorting.variables]
    if missing:
        raise OutputError(f"the Dataset lacks {missing}; it is not a Sorting Dataset (see docs/outputs.md).")
    return write_dataset_atomic(sorting, _store_path(path), overwrite=overwrite)


def open_sorting(path: str | os.PathLike) -> xr.Dataset:
    """Reopen a saved sorting lazily.

    Parameters
    ----------
    path : path
        The output folder holding ``sorting.zarr``, or the store itself.

    Returns
    -------
    xarray.Dataset
        The Sorting Dataset; large variables are dask arrays read on demand.

    Raises
    ------
    OutputError
        Nothing is there, or it is not a sorting.
    IncompleteOutputError
        Only an unfinished store from an interrupted write exists.
    """
    p = Path(path)
    store = p if (p.suffix == ".zarr" or PARTIAL_MARK in p.name) else p / STORE_NAME
    if not store.exists():
        left = partial_siblings(store)
        if left:
            raise IncompleteOutputError(
                f"{str(store)!r} does not exist, but an interrupted write left {left[0].name!r}; the sorting never "
                "finished. Sort again (or write_sorting(..., overwrite=True))."
            )
        raise OutputError(f"no sorting at {str(p)!r}: expected {str(store)!r} (written by spikearray.sort(..., "
                          "output=DIR) or write_sorting).")
    ds = open_dataset(store)
    missing = [k for k in _REQUIRED if k not in ds.variables]
    if missing:
        raise OutputError(f"{str(store)!r} is a Zarr store but not a sorting (no {missing}).")
    return ds
