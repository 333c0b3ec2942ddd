"""Phy folder: what Kilosort 4 writes, loaded by phylib and SpikeInterface, and read back after curation."""

from __future__ import annotations

import ast
import json
import shutil
import warnings

import numpy as np
import pytest

from _sorting import make_sorting
from spikearray import open_recording
from spikearray.errors import OutputError, OutputExistsError
from spikearray.export import export_phy, phy, read_phy
from spikearray.clustering.similarity import template_similarity
from spikearray.synthetic import write_spikeglx

KS4_FILES = ["spike_times.npy", "spike_templates.npy", "spike_clusters.npy", "amplitudes.npy", "templates.npy",
             "templates_ind.npy", "similar_templates.npy", "pc_features.npy", "pc_feature_ind.npy",
             "whitening_mat.npy", "whitening_mat_inv.npy", "channel_map.npy", "channel_positions.npy",
             "channel_shanks.npy", "spike_positions.npy", "cluster_KSLabel.tsv", "cluster_ContamPct.tsv",
             "cluster_Amplitude.tsv", "cluster_group.tsv", "params.py", "cluster_amplitude_uV.tsv",
             "cluster_firing_rate.tsv", "spikearray_settings.json"]


@pytest.fixture(scope="module")
def exported(small_recording, tmp_path_factory):
    rec, truth = small_recording
    d = tmp_path_factory.mktemp("phy")
    (d / "data").mkdir()
    write_spikeglx(rec, d / "data" / "run_g0_t0.imec0.ap.bin")
    rec2 = open_recording(d / "data" / "run_g0_t0.imec0.ap.bin")
    ds = make_sorting(rec2, truth)
    folder = export_phy(ds, rec2, d / "out" / "phy")
    return ds, rec2, folder


def _model(folder):
    from phylib.io.model import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(folder / "params.py")


def test_files_dtypes_and_params(exported):
    ds, rec, folder = exported
    names = {p.name for p in folder.iterdir()}
    assert set(KS4_FILES) <= names
    assert "ops.npy" not in names and not any(n.endswith(".pkl") for n in names)
    ld = lambda n: np.load(folder / n)  # noqa: E731
    S, K, C = ds.sizes["spike"], ds.sizes["unit"], ds.sizes["channel"]
    assert ld("spike_times.npy").dtype == np.int64 and np.all(np.diff(ld("spike_times.npy")) >= 0)
    assert ld("spike_templates.npy").dtype == np.int32 and ld("spike_clusters.npy").dtype == np.int32
    assert ld("channel_map.npy").dtype == np.int32
    assert ld("templates.npy").dtype == np.float32 and ld("templates.npy").shape == (K, 61, C)
    assert ld("pc_features.npy").shape == (S, 3, 8) and ld("pc_feature_ind.npy").dtype == np.uint32
    assert ld("channel_positions.npy").shape == (C, 2) and ld("channel_positions.npy").dtype == np.float32
    assert ld("spike_positions.npy").shape == (S, 2)
    np.testing.assert_array_equal(ld("templates_ind.npy"), np.tile(np.arange(C), (K, 1)))
    wm, wmi = ld("whitening_mat.npy"), ld("whitening_mat_inv.npy")
    np.testing.assert_allclose(wmi, wmi.T)
    # Both unwhitening conventions give the µV templates.
    np.testing.assert_allclose(ld("templates.npy") @ wmi, ds["template"].values, atol=1e-3)
    params = {n.targets[0].id: ast.literal_eval(n.value) for n in ast.parse((folder / "params.py").read_text()).body}
    assert params == {"dat_path": ["../../data/run_g0_t0.imec0.ap.bin"], "n_channels_dat": C + 1, "dtype": "int16",
                      "offset": 0, "sample_rate": 30000.0, "hp_filtered": False}
    meta = json.loads((folder / "spikearray_settings.json").read_text())
    assert meta["settings"] == json.loads(ds.attrs["settings"])
    for tsv in ("cluster_KSLabel", "cluster_group", "cluster_ContamPct", "cluster_amplitude_uV"):
        lines = (folder / f"{tsv}.tsv").read_text().splitlines()
        assert lines[0].startswith("cluster_id\t") and [int(r.split("\t")[0]) for r in lines[1:]] == list(range(K))
    assert (folder / "cluster_group.tsv").read_text().splitlines()[0] == "cluster_id\tgroup"


def test_phylib_loads_and_matches(exported):
    ds, rec, folder = exported
    m = _model(folder)
    np.testing.assert_array_equal(m.spike_samples, ds["spike_time"].values)
    np.testing.assert_array_equal(m.spike_clusters, ds["spike_unit"].values)
    np.testing.assert_allclose(m.channel_positions, np.stack([ds.x, ds.y], 1))
    np.testing.assert_array_equal(m.channel_mapping, ds["channel"].values)
    np.testing.assert_allclose(m.amplitudes, ds["spike_amplitude"].values, rtol=1e-6)
    assert m.n_templates == ds.sizes["unit"]
    assert m.traces.shape == (rec.sizes["time"], rec.sizes["channel"] + 1)  # raw file found through dat_path
    raw = np.asarray(m.traces[1000:1010])
    np.testing.assert_array_equal(raw[:, :rec.sizes["channel"]], rec[1000:1010].values)
    for k in range(ds.sizes["unit"]):
        b = m.get_template(k)
        want = ds["template"].values[k][:, b.channel_ids]
        np.testing.assert_allclose(b.template, want, atol=1e-3 * np.abs(want).max())
        assert ds["channel"].values[b.best_channel] == ds["best_channel"].values[k]


def test_spikeinterface_read_kilosort_same_trains(exported):
    import spikeinterface.extractors as se

    ds, rec, folder = exported
    s = se.read_kilosort(folder)
    assert sorted(int(u) for u in s.unit_ids) == ds["unit"].values.tolist()
    st, su = ds["spike_time"].values, ds["spike_unit"].values
    for u in s.unit_ids:
        np.testing.assert_array_equal(s.get_unit_spike_train(u), st[su == int(u)])
    q = dict(zip(s.unit_ids.tolist(), s.get_property("quality")))
    assert [q[u] for u in sorted(q)] == ds["label"].values.tolist()


@pytest.mark.parametrize("symmetric", [True, False])
def test_unwhitening_agrees_for_phy_and_spikeinterface(exported, tmp_path, symmetric):
    from spikeinterface.extractors import read_kilosort_as_analyzer

    ds, rec, _ = exported
    if not symmetric:  # Kilosort-style local whitening is not symmetric
        W = ds["whitening_matrix"].values.astype(np.float64)
        W = W + 0.05 * np.abs(W).max() * np.random.default_rng(1).normal(size=W.shape)
        ds = ds.copy()
        ds["whitening_matrix"] = (("channel", "channel_out"), W.astype(np.float32))
        ds["template_whitened"] = (("unit", "sample", "channel"),
                                   np.einsum("ktj,ij->kti", ds["template"].values, W).astype(np.float32))
    folder = export_phy(ds, rec, tmp_path / "phy")
    tol = 1e-3 * np.abs(ds["template"].values).max()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        an = read_kilosort_as_analyzer(folder)
    np.testing.assert_allclose(an.get_extension("templates").get_data(), ds["template"].values, atol=tol)
    m = _model(folder)
    b = m.get_template(1)
    np.testing.assert_allclose(b.template, ds["template"].values[1][:, b.channel_ids], atol=tol)


def test_read_phy_round_trip(exported):
    ds, rec, folder = exported
    r = read_phy(folder)
    # integers, ids and strings come back exactly
    for k in ("spike_time", "spike_unit", "n_spikes", "best_channel", "label", "channel", "shank",
              "contact_id", "unit_pc_channel"):
        np.testing.assert_array_equal(r[k].values, ds[k].values, err_msg=k)
    # floats go through float32 .npy files, and the whitening matrix through the exporter's symmetrisation
    # 0.5 (W + W.T): a W from LAPACK's eigh is symmetric only to its last bit, and which bit differs depends on
    # the machine's BLAS kernels. So: float32 precision (2^-23 ~ 1.2e-7) relative to each array's scale.
    for k in ("spike_pc", "template_whitened", "whitening_matrix", "x", "y"):
        want = ds[k].values.astype(np.float64)
        np.testing.assert_allclose(r[k].values, want, rtol=0, atol=4 * 2.0**-23 * max(np.abs(want).max(), 1.0),
                                   err_msg=k)
    for k in ("template", "amplitude", "spike_amplitude", "spike_x", "spike_depth", "contamination",
              "firing_rate"):
        np.testing.assert_allclose(r[k].values, ds[k].values, rtol=1e-4, atol=1e-3, err_msg=k)
    assert r["spike_time"].dtype == np.int64 and r["unit"].dtype == np.int64
    assert r.attrs["settings"] == ds.attrs["settings"] and r.attrs["n_samples"] == ds.attrs["n_samples"]
    assert r.attrs["n_file_channels"] == ds.sizes["channel"] + 1
    assert r.attrs["source"].endswith("run_g0_t0.imec0.ap.bin")
    assert r["spike_amplitude"].attrs["units"] == "uV"


def test_read_phy_after_curation(exported, tmp_path):
    ds, rec, folder = exported
    cur = tmp_path / "curated"
    shutil.copytree(folder, cur)
    scl = np.load(cur / "spike_clusters.npy")
    orig = scl.copy()
    # Phy: merge 1 and 3 into new id 6; split 2 into 7 (even spikes) and 8 (odd spikes); label 0 noise, 6 good.
    scl[(orig == 1) | (orig == 3)] = 6
    idx2 = np.flatnonzero(orig == 2)
    scl[idx2[::2]], scl[idx2[1::2]] = 7, 8
    np.save(cur / "spike_clusters.npy", scl)
    ids = sorted(set(scl.tolist()))
    groups = {0: "noise", 6: "good", 4: "mua", 5: "mua", 7: "mua", 8: "unsorted"}
    (cur / "cluster_group.tsv").write_text("cluster_id\tgroup\n" + "".join(f"{i}\t{groups[i]}\n" for i in ids))
    (cur / "cluster_info.tsv").write_text("cluster_id\tgroup\tfr\n" + "".join(f"{i}\tx\t1.0\n" for i in ids))

    r = read_phy(cur, recording=None)  # no raw data: changed clusters get spike-count-weighted templates
    assert r["unit"].values.tolist() == [0, 4, 5, 6, 7, 8]
    assert r["label"].values.tolist() == ["noise", "mua", "mua", "good", "mua", "unsorted"]
    st = ds["spike_time"].values
    for u in r["unit"].values:
        np.testing.assert_array_equal(r["spike_time"].values[r["spike_unit"].values == u], st[scl == u])
    n1, n3 = int((orig == 1).sum()), int((orig == 3).sum())
    tw = ds["template_whitened"].values
    np.testing.assert_allclose(r["template_whitened"].sel(unit=6).values, (n1 * tw[1] + n3 * tw[3]) / (n1 + n3),
                               rtol=1e-5, atol=1e-6)
    uv = ds["template"].values
    np.testing.assert_allclose(r["template"].sel(unit=6).values, (n1 * uv[1] + n3 * uv[3]) / (n1 + n3), atol=1e-2)
    for u in (7, 8):
        np.testing.assert_allclose(r["template"].sel(unit=u).values, uv[2], atol=1e-2)
    assert r["n_spikes"].sel(unit=6).item() == n1 + n3
    c = r["contamination"]
    assert np.isnan(c.sel(unit=[6, 7, 8]).values).all()
    np.testing.assert_allclose(c.sel(unit=[0, 4, 5]).values, ds["contamination"].values[[0, 4, 5]], rtol=1e-5)
    # Merged cluster's features live on its main template's channels; that template's spikes are unchanged.
    main = 1 if n1 >= n3 else 3
    np.testing.assert_array_equal(r["unit_pc_channel"].sel(unit=6).values, ds["unit_pc_channel"].values[main])
    sel = (r["spike_unit"].values == 6) & np.isin(np.arange(len(st)), np.flatnonzero(orig == main))
    np.testing.assert_array_equal(r["spike_pc"].values[sel], ds["spike_pc"].values[sel])
    sim = r["similarity"].values
    assert sim.shape == (6, 6) and np.allclose(np.diag(sim), 1, atol=1e-5)
    assert r["similarity"].sel(unit=7).values[list(r["unit"].values).index(8)] == pytest.approx(1, abs=1e-5)


def test_no_pc_features_and_computed_similarity(small_recording, tmp_path):
    rec, truth = small_recording
    ds = make_sorting(rec, truth, with_pc=False)
    folder = export_phy(ds, rec, tmp_path / "phy")
    names = {p.name for p in folder.iterdir()}
    assert "pc_features.npy" not in names and "pc_feature_ind.npy" not in names
    assert ast.literal_eval((folder / "params.py").read_text().split("dat_path = ")[1].splitlines()[0]) == "no_path.bin"
    m = _model(folder)
    assert m.n_templates == ds.sizes["unit"]
    sim = np.load(folder / "similar_templates.npy")
    np.testing.assert_allclose(sim, sim.T)
    np.testing.assert_allclose(np.diag(sim), 1, atol=1e-5)
    # A template shifted in time is found similar at its best lag.
    t = ds["template_whitened"].values
    shifted = np.concatenate([t[:1], np.roll(t[:1], 3, axis=1)])
    sim = template_similarity(shifted, sample_axis=1, symmetric=True)[0]
    assert sim[0, 1] > 0.95 > template_similarity(shifted, 0, sample_axis=1)[0][0, 1]
    np.testing.assert_array_equal(sim, sim.T)
    # the stages' (K, C, nt) layout gives the same numbers
    np.testing.assert_allclose(template_similarity(shifted.transpose(0, 2, 1), symmetric=True)[0], sim)
    assert "spike_pc" not in read_phy(folder)


def test_overwrite_and_atomic(exported, tmp_path, monkeypatch):
    ds, rec, _ = exported
    folder = export_phy(ds, rec, tmp_path / "phy")
    (folder / "cluster_group.tsv").write_text("cluster_id\tgroup\n0\tnoise\n")  # "curated" in Phy
    with pytest.raises(OutputExistsError, match="overwrite"):
        export_phy(ds, rec, folder)
    assert "noise" in (folder / "cluster_group.tsv").read_text()

    def boom(*a, **k):
        raise OutputError("simulated failure before the rename")

    monkeypatch.setattr(phy, "validate_phy_folder", boom)
    with pytest.raises(OutputError, match="simulated"):
        export_phy(ds, rec, folder, overwrite=True)
    assert "noise" in (folder / "cluster_group.tsv").read_text()  # previous folder intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phy"]
    monkeypatch.undo()
    export_phy(ds, rec, folder, overwrite=True)
    assert "noise" not in (folder / "cluster_group.tsv").read_text()


def test_inconsistent_inputs_raise(exported, tmp_path):
    ds, rec, _ = exported
    bad = ds.copy()
    bad.attrs = {**ds.attrs, "n_samples": ds.attrs["n_samples"] + 7}
    with pytest.raises(OutputError, match="recording given has"):
        export_phy(bad, rec, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(OutputError, match="spike_unit"):
        export_phy(ds.assign(spike_unit=ds["spike_unit"] + 100), rec, tmp_path / "b")
    with pytest.raises(OutputError, match="params.py"):
        read_phy(tmp_path)


def test_cli_export_phy_and_info(exported, tmp_path, capsys):
    from spikearray.cli import main
    from spikearray.export import write_sorting

    ds, rec, _ = exported
    out = tmp_path / "run"
    write_sorting(ds, out)
    assert main(["export-phy", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Phy folder" in text and "not found" not in text
    m = _model(out / "phy")
    np.testing.assert_array_equal(m.spike_samples, ds["spike_time"].values)
    assert m.traces is not None  # params.py found the raw file from the sorting's source attr
    assert main(["export-phy", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0]
    assert main(["export-phy", str(out), "--overwrite", "--recording", ds.attrs["source"]]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"units       {ds.sizes['unit']}" in text and "good" in text
    assert main(["export-phy", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no sorting" in err[0]
    with pytest.raises(SystemExit) as e:
        main(["export-phy", "--help"])
    assert e.value.code == 0 and "--recording" in capsys.readouterr().out


def test_sort_of_a_time_range_writes_a_valid_phy_folder(sorted_session, tmp_path):
    """tmin/tmax sort part of the file: the Phy folder still names the whole file, spike times count from its
    start, and the folder validates (it failed at the very end of such a sort before: the file was checked
    against the sorted range's length)."""
    import spikearray as sa

    rec = sorted_session["recording"]
    fs = rec.attrs["sampling_rate"]
    out = tmp_path / "part"
    sorting = sa.sort(rec, sa.Settings(nblocks=0, batch_size=30000, tmin=1.0, tmax=5.0), output=out, progress=False)
    st = sorting["spike_time"].values
    assert len(st) > 50 and st.min() >= 1.0 * fs and st.max() < 5.0 * fs
    assert sorting.attrs["time_offset_samples"] == int(fs)
    phy.validate_phy_folder(out / "phy", n_samples=rec.sizes["time"])
    np.testing.assert_array_equal(np.load(out / "phy" / "spike_times.npy"), st)
    # again from the saved sorting alone (no recording): the file's length is unknown, the rest is checked
    again = export_phy(sa.open_sorting(out), None, tmp_path / "phy2")
    np.testing.assert_array_equal(np.load(again / "spike_times.npy"), st)
