"""Phy curation back into the Dataset: merges, splits and labels as Phy writes them, then NWB and the report."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import spikearray as sa
from _sorting import make_sorting
from spikearray.errors import DataError, OutputError
from spikearray.export import export_phy, read_phy
from spikearray.synthetic import write_spikeglx


def phy_curate(folder, merge, split, groups):
    """Write what Phy writes on save: new ids (max + 1, ...) in spike_clusters.npy for a merge and for both parts
    of a split, cluster_group.tsv for the clusters given a group, cluster_info.tsv for every cluster.

    Returns (new spike_clusters, merged id, split ids)."""
    scl = np.load(folder / "spike_clusters.npy").astype(np.int64)
    st = np.load(folder / "spike_times.npy")
    nxt = int(scl.max()) + 1
    merged = nxt
    scl[np.isin(scl, merge)] = merged
    idx = np.flatnonzero(scl == split)
    half = st[idx] < np.median(st[idx])  # a split by time, as a user's lasso in the amplitude view would do
    parts = (nxt + 1, nxt + 2)
    scl[idx[half]], scl[idx[~half]] = parts
    np.save(folder / "spike_clusters.npy", scl)
    ids = sorted(set(scl.tolist()))
    grp = {merged: "good", parts[0]: "mua", parts[1]: "noise", **groups}
    (folder / "cluster_group.tsv").write_text(
        "cluster_id\tgroup\n" + "".join(f"{i}\t{grp[i]}\n" for i in ids if i in grp))
    (folder / "cluster_info.tsv").write_text(
        "cluster_id\tAmplitude\tContamPct\tKSLabel\tamp\tch\tdepth\tfr\tgroup\tn_spikes\tsh\n"
        + "".join(f"{i}\t1.0\t0.0\tgood\t50.0\t3\t100.0\t5.0\t{grp.get(i, '')}\t{int((scl == i).sum())}\t0\n"
                  for i in ids))
    return scl, merged, parts


@pytest.fixture(scope="module")
def curated(sorted_session):
    """sorted_session's DIR copied (same depth, so params.py's relative dat_path still finds the raw file), then
    curated in "Phy": units 0 and 1 merged, unit 2 split in two, unit 3 labelled noise, unit 4 left unlabelled."""
    s = sorted_session["sorting"].load()
    assert s.sizes["unit"] >= 5
    root = sorted_session["root"] / "curated"
    shutil.copytree(sorted_session["out"], root)
    scl, merged, parts = phy_curate(root / "phy", merge=[0, 1], split=2, groups={3: "noise"})
    return {"dir": root, "phy": root / "phy", "orig": s, "scl": scl, "merged": merged, "parts": parts,
            "ds": read_phy(root / "phy")}


def test_curated_units_labels_and_trains(curated):
    r, s, scl = curated["ds"], curated["orig"], curated["scl"]
    merged, (p1, p2) = curated["merged"], curated["parts"]
    K = s.sizes["unit"]
    keep = [u for u in s.unit.values if u not in (0, 1, 2)]
    assert r.unit.values.tolist() == keep + [merged, p1, p2] and merged == K  # Phy's new ids kept
    lab = dict(zip(r.unit.values.tolist(), r.label.values.tolist()))
    assert lab[merged] == "good" and lab[p1] == "mua" and lab[p2] == "noise" and lab[3] == "noise"
    assert lab[4] == str(s.label.sel(unit=4).values)  # not in cluster_group.tsv: the Kilosort label, unchanged
    st = s.spike_time.values  # the folder's spikes are in the Dataset's order
    for u in r.unit.values:
        np.testing.assert_array_equal(r.spike_time.values[r.spike_unit.values == u], st[scl == u])
    assert r.n_spikes.sel(unit=merged).item() == int(s.n_spikes.sel(unit=[0, 1]).sum())
    assert r.attrs["templates_recomputed"] == [merged, p1, p2]
    assert np.isnan(r.contamination.sel(unit=[merged, p1, p2]).values).all()
    np.testing.assert_allclose(r.contamination.sel(unit=keep).values, s.contamination.sel(unit=keep).values,
                               atol=1e-3)  # ContamPct.tsv holds one decimal place of a percentage


def test_changed_templates_recomputed_from_the_recording(curated):
    r, s = curated["ds"], curated["orig"]
    merged, parts = curated["merged"], curated["parts"]
    n = s.n_spikes.sel(unit=[0, 1]).values
    want = (n[0] * s.template.sel(unit=0).values + n[1] * s.template.sel(unit=1).values) / n.sum()
    got = r.template.sel(unit=merged).values
    rms = np.sqrt(np.mean((got - want) ** 2))
    assert rms < 3.0, f"merged template {rms:.2f} µV rms from the sorter's spike-weighted templates"
    for p in parts:  # each half of a split neuron has its parent's waveform, up to noise
        d = r.template.sel(unit=p).values - s.template.sel(unit=2).values
        assert np.sqrt(np.mean(d**2)) < 4.0
    # whitened = µV @ W.T, and the per-unit numbers follow the new template
    W = r.whitening_matrix.values
    np.testing.assert_allclose(r.template_whitened.sel(unit=merged).values, got @ W.T, rtol=1e-4, atol=1e-4)
    best = int(r.best_channel.sel(unit=merged))
    assert r.amplitude.sel(unit=merged).item() == pytest.approx(np.ptp(r.template.sel(unit=merged,
                                                                                      channel=best).values))
    for u in r.unit.values:  # unchanged clusters: the sorter's templates (through float32 files)
        if u in s.unit.values:
            np.testing.assert_allclose(r.template.sel(unit=u).values, s.template.sel(unit=u).values, atol=1e-2)


def test_similarity_of_a_curated_folder_is_that_of_the_final_templates_computed_once(curated, monkeypatch):
    from spikearray.clustering import similarity as sim_mod

    calls = []
    real = sim_mod.template_similarity
    monkeypatch.setattr(sim_mod, "template_similarity", lambda *a, **k: calls.append(1) or real(*a, **k))
    r = read_phy(curated["phy"])
    assert len(calls) == 1  # not once before the templates were recomputed and again after
    want = real(r.template_whitened.values, sample_axis=1, symmetric=True)[0]
    np.testing.assert_allclose(r.similarity.values, want, atol=1e-6)
    assert r.attrs["templates_recomputed"] == curated["ds"].attrs["templates_recomputed"]


def test_drop_noise_drops_units_and_their_spikes(curated):
    r = curated["ds"]
    clean = sa.drop_noise(r)
    assert "noise" not in clean.label.values.tolist()
    assert set(clean.spike_unit.values.tolist()) == set(clean.unit.values.tolist())
    assert clean.sizes["spike"] == int(r.n_spikes.where(r.label != "noise", 0).sum())
    assert clean.similarity.shape == (clean.sizes["unit"],) * 2
    kept = [r.unit.values.tolist().index(u) for u in clean.unit.values]
    np.testing.assert_array_equal(clean.similarity.values, r.similarity.values[np.ix_(kept, kept)])
    # select_units keeps the order it is given, rows and columns alike, with each unit's own spikes
    ids = r.unit.values[[2, 0]]
    two = sa.select_units(r, ids)
    assert two.unit.values.tolist() == ids.tolist()
    i = [r.unit.values.tolist().index(u) for u in ids]
    np.testing.assert_array_equal(two.similarity.values, r.similarity.values[np.ix_(i, i)])
    assert sorted(set(two.spike_unit.values.tolist())) == sorted(ids.tolist())
    assert two.sizes["spike"] == int(r.n_spikes.sel(unit=ids).sum())
    np.testing.assert_array_equal(np.diff(clean.spike_time.values) >= 0, True)
    # the two-step idiom of docs/outputs.md gives the same
    keep = r.unit.values[r.label.values != "noise"]
    idiom = r.sel(unit=keep).isel(spike=r.spike_unit.isin(keep).values)
    np.testing.assert_array_equal(idiom.spike_time.values, clean.spike_time.values)
    # plain sel keeps every spike: that is why the helper exists
    assert r.sel(unit=r.label != "noise").sizes["spike"] == r.sizes["spike"]
    with pytest.raises(DataError, match="not in the sorting"):
        sa.select_units(r, [999])


def test_round_trip_to_nwb(curated, tmp_path):
    pynwb = pytest.importorskip("pynwb")
    r = curated["ds"]
    path = sa.export_nwb(r, tmp_path / "curated.nwb", location="VISp",
                         subject={"subject_id": "m1", "species": "Mus musculus", "sex": "M", "age": "P60D"})
    with pynwb.NWBHDF5IO(str(path), "r") as io:
        f = io.read()
        assert f.units.id[:].tolist() == r.unit.values.tolist()
        assert f.units.to_dataframe()["quality"].tolist() == r.label.values.tolist()
        fs = r.attrs["sampling_rate"]
        for k, u in enumerate(r.unit.values):
            t = np.asarray(f.units.get_unit_spike_times(k))
            np.testing.assert_array_equal(np.round(t * fs).astype(np.int64), r.spike_time.values[r.spike_unit == u])
        np.testing.assert_allclose(np.asarray(f.units["waveform_mean"][list(r.unit.values).index(curated["merged"])]),
                                   r.template.sel(unit=curated["merged"]).values[
                                       :, f.units["electrodes"][list(r.unit.values).index(curated["merged"])]
                                       .index.values], atol=1e-4)


def test_report_curated(curated, capsys):
    from spikearray.cli import main

    assert main(["report", str(curated["dir"]), "--curated", "--quiet"]) == 0
    page = curated["dir"] / "report-curated" / "index.html"
    html = page.read_text()
    assert str(page) in capsys.readouterr().out
    assert "noise" in html and f">{curated['merged']}<" in html and "Phy folder" in html
    assert not (curated["dir"] / "report").exists() or (curated["dir"] / "report") != page.parent


@pytest.fixture(scope="module")
def planted(small_recording, tmp_path_factory):
    rec, truth = small_recording
    d = tmp_path_factory.mktemp("planted")
    (d / "data").mkdir()
    raw = sa.open_recording(write_spikeglx(rec, d / "data" / "run_g0_t0.imec0.ap.bin"))
    ds = make_sorting(raw, truth)
    return ds, export_phy(ds, raw, d / "out" / "phy")


def test_recompute_ignores_wrong_folder_templates(planted, tmp_path):
    """Recomputed templates come from the spikes in the raw data, not from templates.npy: zero the merged units'
    templates in the folder and the merged template still matches the planted waveforms."""
    ds, folder = planted
    cur = tmp_path / "out" / "phy"  # same depth as the original: dat_path '../../data/...' resolves
    shutil.copytree(folder, cur)
    (tmp_path / "data").symlink_to(folder.parent.parent / "data")
    scl, merged, parts = phy_curate(cur, merge=[1, 3], split=5, groups={})
    T = np.load(cur / "templates.npy")
    T[[1, 3]] = 0
    np.save(cur / "templates.npy", T)
    n1, n3 = int(ds.n_spikes[1]), int(ds.n_spikes[3])
    want = (n1 * ds.template.values[1] + n3 * ds.template.values[3]) / (n1 + n3)
    r = read_phy(cur)
    got = r.template.sel(unit=merged).values
    assert np.sqrt(np.mean((got - want) ** 2)) < 7.0  # measured 4.3 µV: 10 µV noise over ~70 spikes
    big = np.ptp(want, axis=0) >= 0.3 * np.ptp(want, axis=0).max()  # the channels the units are on
    assert np.corrcoef(got[:, big].ravel(), want[:, big].ravel())[0, 1] > 0.95
    r0 = read_phy(cur, recording=None)  # no raw data: the (zeroed) spike-weighted templates
    assert np.abs(r0.template.sel(unit=merged).values).max() == 0 and r0.attrs["templates_recomputed"] == []
    r1 = read_phy(cur, recording=ds.attrs["source"])  # an explicit recording does the same as "auto"
    np.testing.assert_allclose(r1.template.sel(unit=merged).values, got, atol=1e-4)


def test_params_py_is_never_executed(planted, tmp_path):
    _, folder = planted
    cur = tmp_path / "phy"
    shutil.copytree(folder, cur)
    flag = tmp_path / "EXECUTED"
    params = (cur / "params.py").read_text()
    (cur / "params.py").write_text(params + f"__import__('pathlib').Path({str(flag)!r}).touch()\n")
    r = read_phy(cur)  # a statement that is not an assignment is ignored
    assert not flag.exists() and r.sizes["unit"] > 0
    (cur / "params.py").write_text(params + f"x = __import__('pathlib').Path({str(flag)!r}).touch()\n")
    with pytest.raises(OutputError, match="not a literal"):
        read_phy(cur)
    assert not flag.exists()


@pytest.mark.parametrize("name", ["spike_clusters.npy", "amplitudes.npy"])
def test_per_spike_files_of_different_lengths(planted, tmp_path, name):
    _, folder = planted
    cur = tmp_path / "phy"
    shutil.copytree(folder, cur)
    n = len(np.load(cur / "spike_times.npy"))
    np.save(cur / name, np.load(cur / name)[:-3])
    with pytest.raises(OutputError, match=rf"spike_times.npy has {n} spikes but {name} has {n - 3}"):
        read_phy(cur)
