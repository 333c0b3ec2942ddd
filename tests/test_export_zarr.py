"""sorting.zarr: exact round trip, lazy reopen, atomic writes, overwrite protection."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from _sorting import make_sorting
from spikearray.errors import IncompleteOutputError, OutputError, OutputExistsError
from spikearray.export import zarr_store
from spikearray.export.zarr_store import open_dataset, open_sorting, write_dataset, write_sorting


@pytest.fixture(scope="module")
def sorting(small_recording):
    rec, truth = small_recording
    return make_sorting(rec, truth, with_similarity=True)


def _assert_exact(a: xr.Dataset, b: xr.Dataset) -> None:
    xr.testing.assert_identical(a, b)
    for k in b.variables:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].dims == b[k].dims, k
    assert set(a.coords) == set(b.coords)
    assert a.attrs == b.attrs


@pytest.mark.parametrize("object_labels", [False, True])
def test_round_trip_exact(tmp_path, small_recording, object_labels):
    rec, truth = small_recording
    ds = make_sorting(rec, truth, object_labels=object_labels, with_similarity=True)
    ds["template"].attrs["note"] = [1, 2.5, "x"]
    store = write_sorting(ds, tmp_path)
    assert store == tmp_path / "sorting.zarr"
    back = open_sorting(tmp_path)
    assert isinstance(back["spike_pc"].data, da.Array)  # lazy
    assert isinstance(back["template"].data, da.Array)
    _assert_exact(back.load(), ds)
    assert back["label"].values.tolist() == ds["label"].values.tolist()
    assert back["contact_id"].values.tolist() == ds["contact_id"].values.tolist()


def test_open_accepts_store_path_and_dask_input(tmp_path, sorting):
    chunked = sorting.chunk({"spike": 50, "unit": 4})
    store = write_sorting(chunked, tmp_path / "run.zarr")
    assert store == tmp_path / "run.zarr"
    _assert_exact(open_sorting(store).load(), sorting)


def test_empty_sorting_round_trip(tmp_path, sorting):
    empty = sorting.isel(spike=slice(0, 0))
    write_sorting(empty, tmp_path)
    back = open_sorting(tmp_path)
    assert back.sizes["spike"] == 0
    _assert_exact(back.load(), empty)


def test_attrs_are_jsonable_and_bad_attrs_rejected(tmp_path, sorting):
    ds = sorting.copy()
    ds.attrs = {**ds.attrs, "gain_to_uV": np.float32(0.5), "shape": (3, 4), "arr": np.arange(3)}
    write_sorting(ds, tmp_path / "a")
    back = open_sorting(tmp_path / "a")
    assert back.attrs["gain_to_uV"] == 0.5 and back.attrs["shape"] == [3, 4] and back.attrs["arr"] == [0, 1, 2]
    bad = sorting.copy()
    bad.attrs = {**bad.attrs, "when": object()}
    with pytest.raises(OutputError, match="when"):
        write_sorting(bad, tmp_path / "b")
    assert not (tmp_path / "b" / "sorting.zarr").exists()


def test_crash_mid_write_leaves_nothing_openable(tmp_path, sorting, monkeypatch):
    calls = {"n": 0}
    real = zarr_store._create_array

    def failing(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("simulated crash in the writer")
        return real(*args, **kw)

    monkeypatch.setattr(zarr_store, "_create_array", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        write_sorting(sorting, tmp_path)
    assert not (tmp_path / "sorting.zarr").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary store was removed
    with pytest.raises(OutputError):
        open_sorting(tmp_path)


def test_killed_write_is_reported_incomplete(tmp_path, sorting, monkeypatch):
    # A kill leaves the temporary store behind (no cleanup) without consolidated metadata.
    partial = tmp_path / "sorting.zarr.partial-999999-abcdef"
    monkeypatch.setattr(zarr_store.zarr, "consolidate_metadata", lambda *a, **k: None)
    write_dataset(sorting, partial)
    monkeypatch.undo()
    with pytest.raises(IncompleteOutputError, match="interrupted"):
        open_sorting(tmp_path)
    with pytest.raises(IncompleteOutputError):
        open_sorting(partial)
    # Even renamed by hand, a store without consolidated metadata is refused.
    partial.rename(tmp_path / "sorting.zarr")
    with pytest.raises(IncompleteOutputError, match="consolidated"):
        open_sorting(tmp_path)


def test_existing_output_protected_and_overwrite(tmp_path, sorting, monkeypatch):
    write_sorting(sorting, tmp_path)
    smaller = sorting.isel(spike=slice(0, 10))
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        write_sorting(smaller, tmp_path)
    assert open_sorting(tmp_path).sizes["spike"] == sorting.sizes["spike"]

    real = zarr_store._create_array

    def failing(*args, **kw):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(zarr_store, "_create_array", failing)
    with pytest.raises(RuntimeError):
        write_sorting(smaller, tmp_path, overwrite=True)
    monkeypatch.setattr(zarr_store, "_create_array", real)
    _assert_exact(open_sorting(tmp_path).load(), sorting)  # old one intact

    write_sorting(smaller, tmp_path, overwrite=True)
    assert open_sorting(tmp_path).sizes["spike"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sorting.zarr"]


def test_not_a_sorting(tmp_path):
    with pytest.raises(OutputError, match="no sorting"):
        open_sorting(tmp_path)
    write_dataset(xr.Dataset({"a": ("x", np.arange(3))}), tmp_path / "sorting.zarr")
    with pytest.raises(OutputError, match="not a sorting"):
        open_sorting(tmp_path)
    assert open_dataset(tmp_path / "sorting.zarr")["a"].values.tolist() == [0, 1, 2]
    with pytest.raises(OutputError, match="Dataset"):
        write_sorting({"spike_time": []}, tmp_path / "x")
