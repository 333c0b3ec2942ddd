"""The HTML report: figures on a real small sorting, rendered in headless Chromium with every image loaded."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import spikearray as sa
from spikearray.cli import main
from spikearray.report import sample_spike_waveforms, window_reader, write_report
from spikearray.synthetic import generate_recording, write_spikeglx

from _sorting import make_sorting  # noqa: E402


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _chromium(page: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    exe = _browser()
    if exe is None:
        pytest.skip("no Chromium/Chrome found (.ci/run installs Debian's chromium)")
    args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'chrome-profile'}", "--virtual-time-budget=5000",
            *extra, page.resolve().as_uri()]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def sorted_dir(sorted_drifting_session):
    """A drifting synthetic SpikeGLX session sorted with drift correction, outputs and report on disk (the
    session-wide fixture of conftest.py)."""
    return sorted_drifting_session["out"], sorted_drifting_session["truth"]


def test_sort_with_report_writes_every_figure(sorted_dir):
    out, _ = sorted_dir
    page = out / "report" / "index.html"
    html = page.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert {"probe.png", "drift.png", "raster.png", "histograms.png", "units_001.png"} <= set(srcs)
    for s in srcs:  # relative paths, files beside the page, real PNGs
        assert "/" not in s and (out / "report" / s).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "report" / "report.json").read_text())
    assert meta["sampled_spikes"] is True  # the raw file was found through the sorting's source attr
    assert "could not be read" not in html
    # units table: one row per unit with the contract's columns
    so = sa.open_sorting(out)
    table = html.split('<table id="units">')[1]
    assert table.count("<tr>") == so.sizes["unit"] + 1
    for col in ("label", "depth (µm)", "best channel", "amplitude (µV)", "firing rate (Hz)", "contamination",
                "n_spikes"):
        assert f"<th>{col}</th>" in table
    assert not list(out.glob("report.partial-*"))


def test_report_renders_in_headless_chromium_with_all_images(sorted_dir, tmp_path):
    out, _ = sorted_dir
    page = out / "report" / "index.html"
    dom = _chromium(page, tmp_path, "--dump-dom")
    m = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom.stdout)
    assert m, f"the page's load script did not run: {dom.stderr[-2000:]}"
    n_ok, n_all = map(int, m.groups())
    assert n_all == len(re.findall(r"<img ", page.read_text())) >= 5
    assert n_ok == n_all
    shot = tmp_path / "report.png"
    _chromium(page, tmp_path, "--hide-scrollbars", "--window-size=1400,3000", f"--screenshot={shot}")
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)
    assert img.shape[:2] == (3000, 1400)
    # not a blank page: many distinct colours (figures) rendered
    assert len(np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 200


def test_sampled_spikes_match_templates(sorted_dir):
    """The grey spikes drawn under each template are that unit's spikes, aligned in time and in µV."""
    out, _ = sorted_dir
    so = sa.open_sorting(out).load()
    from spikearray.plotting.units import unit_channels

    chans = {int(u): unit_channels(so, int(u)) for u in so.unit.values}
    spikes = sample_spike_waveforms(so, window_reader(so), chans, n_per_unit=30)
    big = int(np.argmax(so.amplitude.values))
    u = int(so.unit.values[big])
    mean = spikes[u].mean(axis=0)
    tpl = so.template.sel(unit=u).values[:, chans[u]]
    r = np.corrcoef(mean.ravel(), tpl.ravel())[0, 1]
    assert r > 0.9
    assert np.ptp(mean, axis=0).max() == pytest.approx(np.ptp(tpl, axis=0).max(), rel=0.3)


def test_report_without_recording_or_drift_says_so(tmp_path, small_recording):
    rec, truth = small_recording
    so = make_sorting(rec, truth)  # in-memory source: no raw file to sample from, no drift spikes
    so.attrs["source"] = str(tmp_path / "moved_away.ap.bin")
    page = write_report(tmp_path / "out", sorting=so)
    html = page.read_text()
    assert "without the spread of sampled spikes" in html and "moved_away.ap.bin" in html
    assert "Drift correction did not run" in html and "drift.png" not in html
    assert (page.parent / "units_001.png").exists() and (page.parent / "raster.png").exists()
    # rewriting replaces the previous report atomically
    page2 = write_report(tmp_path / "out", sorting=so.isel(unit=slice(0, 3)).sel(
        spike=np.isin(so.spike_unit.values, [0, 1, 2])))
    assert page2 == page and page.read_text().split('<table id="units">')[1].count("<tr>") == 4


def test_report_with_in_memory_recording_and_pages(tmp_path):
    rec, truth = generate_recording(duration=4.0, n_channels=32, n_units=20, seed=5)
    so = make_sorting(rec, truth)
    rec = rec.load()  # a numpy-backed recording (a lazy synthetic one would regenerate a chunk per spike)
    page = write_report(tmp_path, sorting=so, recording=rec, n_waveforms=5)
    assert sorted(p.name for p in page.parent.glob("units_*.png")) == ["units_001.png", "units_002.png"]
    assert "randomly sampled spikes" in page.read_text()


def test_empty_sorting_report(tmp_path, small_recording):
    rec, truth = small_recording
    so = make_sorting(rec, truth)
    empty = so.isel(unit=slice(0, 0), spike=slice(0, 0))
    page = write_report(tmp_path, sorting=empty)
    html = page.read_text()
    assert "The sorting has no units." in html and (page.parent / "histograms.png").exists()


def test_report_cli(sorted_dir, capsys):
    out, _ = sorted_dir
    assert main(["report", str(out), "--quiet"]) == 0
    assert "index.html" in capsys.readouterr().out
    assert main(["report", str(out.parent / "nothing-here"), "--quiet"]) == 2
