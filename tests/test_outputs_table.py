"""One table of the Sorting Dataset's variables: the sorter, the fixture and the docs all follow it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import spikearray as sa
from spikearray.metrics.sorting import build_sorting, empty_sorting
from spikearray.outputs import ATTRIBUTES, OUTPUTS, SECTIONS, check_sorting, spec, variable
from spikearray.synthetic import generate_recording

from _sorting import make_sorting

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def planted():
    return generate_recording(duration=6.0, n_channels=16, n_units=3, seed=5)


def _gen():
    spec_ = importlib.util.spec_from_file_location("gen_outputs", DOCS / "_gen_outputs.py")
    mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)
    return mod


def test_outputs_doc_tables_are_generated_from_the_table():
    gen = _gen()
    text = (DOCS / "outputs.md").read_text(encoding="utf-8")
    assert gen.updated(text) == text, "docs/outputs.md is stale: run python docs/_gen_outputs.py"
    section = text.split(gen.BEGIN)[1].split(gen.END)[0]
    for v in OUTPUTS:
        assert f"| `{v.name}` | {', '.join(v.dims)} | {v.dtype} |" in section
    for name in ATTRIBUTES:
        assert f"| `{name}` |" in section
    for heading in SECTIONS.values():
        assert f"### {heading}" in section


def test_the_table_is_well_formed():
    names = [v.name for v in OUTPUTS]
    assert len(names) == len(set(names))
    assert all(v.section in SECTIONS for v in OUTPUTS)
    for v in OUTPUTS:
        assert v.dtype == "str" or np.dtype(v.dtype).kind in "if", v.name
    with pytest.raises(KeyError, match="not a Sorting Dataset variable"):
        spec("spike_times")
    with pytest.raises(ValueError, match=r"spike_time must have dims \('spike',\)"):
        variable("spike_time", np.zeros((2, 2)))
    v = variable("spike_amplitude", np.arange(3))
    assert v.dtype == np.float32 and v.attrs["units"] == "uV" and v.dims == ("spike",)


@pytest.mark.parametrize("kw", [{}, {"with_pc": False}, {"with_similarity": True, "object_labels": True}])
def test_the_fixture_follows_the_table(planted, kw):
    rec, truth = planted
    so = make_sorting(rec, truth, **kw)
    assert check_sorting(so) == []
    assert so["template"].attrs["units"] == "uV" and so["spike_depth"].attrs["units"] == "um"
    assert set(so.attrs) <= set(ATTRIBUTES)


def _matched(rec, truth, n_near=6, n_pcs=3, seed=0):
    """A ``matching.match``-shaped Dataset whose spikes and templates are the planted ones (identity whitening)."""
    rng = np.random.default_rng(seed)
    t = truth["spike_time"].values.astype(np.int64)
    k = truth["spike_unit"].values.astype(np.int64)
    order = np.argsort(t, kind="stable")
    t, k = t[order], k[order]
    tmpl = truth["template"].values.astype(np.float32)  # (K, nt, C) µV
    K = tmpl.shape[0]
    best = (tmpl ** 2).sum(1).argmax(1)
    pos = np.stack([rec["x"].values, rec["y"].values], 1)
    chans = np.argsort(np.linalg.norm(pos[best][:, None] - pos[None], axis=2), axis=1, kind="stable")[:, :n_near]
    return xr.Dataset({
        "spike_time": ("spike", t), "spike_template": ("spike", k),
        "spike_scale": ("spike", np.ones(len(t), np.float32)),
        "spike_features": (("spike", "nearest", "pc"), rng.normal(0, 1, (len(t), n_near, n_pcs)).astype(np.float32)),
        "template_channels": (("template", "nearest"), chans.astype(np.int64)),
        "template_mean": (("template", "channel", "sample"), tmpl.transpose(0, 2, 1).copy()),
    }), K


def test_build_sorting_and_empty_sorting_follow_the_table(planted):
    rec, truth = planted
    C = rec.sizes["channel"]
    ids = rec["channel"].values
    W = xr.DataArray(np.eye(C, dtype=np.float32), dims=("channel", "channel_out"),
                     coords={"channel": ids, "channel_out": ids})
    s = sa.Settings()
    matched, K = _matched(rec, truth)
    so = build_sorting(matched, recording=rec, white=rec, whitening=W, drift=None, settings=s, timings={"x": 1.0})
    assert check_sorting(so) == []
    assert 1 <= so.sizes["unit"] <= K and so.sizes["spike"] > 0
    assert set(so.attrs) <= set(ATTRIBUTES)
    for v in OUTPUTS:
        if v.name in so.variables and not v.coord:
            assert so[v.name].attrs["description"] == v.description
            assert so[v.name].attrs.get("units", "") == v.unit
    empty = empty_sorting(rec, rec, W, None, s, {}, nt=61, n_pcs=3, n_near=6)
    assert check_sorting(empty) == []
    assert empty.sizes["spike"] == 0 and empty.sizes["unit"] == 0 and empty["spike_pc"].shape == (0, 3, 6)
    assert empty["template"].shape == (0, 61, C) and empty["label"].dtype.kind == "U"
    # the same variables either way, so code reading a sorting need not special-case an empty one
    assert set(empty.data_vars) == set(so.data_vars)


def test_build_sorting_drops_units_with_too_few_spikes_to_be_units(planted):
    from spikearray.metrics.sorting import MIN_UNIT_SPIKES

    rec, truth = planted
    C = rec.sizes["channel"]
    ids = rec["channel"].values
    W = xr.DataArray(np.eye(C, dtype=np.float32), dims=("channel", "channel_out"),
                     coords={"channel": ids, "channel_out": ids})
    matched, K = _matched(rec, truth)
    k = matched["spike_template"].values
    full = build_sorting(matched, recording=rec, white=rec, whitening=W, drift=None, settings=sa.Settings(),
                         timings={})
    for keep, present in ((MIN_UNIT_SPIKES, False), (MIN_UNIT_SPIKES + 1, True)):
        # template 0 left with `keep` of its spikes; every other template untouched
        drop = np.flatnonzero(k == 0)[keep:]
        thin = matched.isel(spike=np.setdiff1d(np.arange(len(k)), drop))
        so = build_sorting(thin, recording=rec, white=rec, whitening=W, drift=None, settings=sa.Settings(),
                           timings={})
        assert so.sizes["unit"] == full.sizes["unit"] - (0 if present else 1)
        assert (so["n_spikes"].values > MIN_UNIT_SPIKES).all()
