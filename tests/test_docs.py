"""The docs cannot go stale: their Python blocks run against a real sorting, the settings table is generated."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

import spikearray as sa

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def python_blocks(md: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)\n```", md.read_text(encoding="utf-8"), flags=re.S)


def _run_blocks(md: Path, cwd: Path) -> dict:
    blocks = python_blocks(md)
    assert blocks, f"{md.name} has no python blocks"
    ns: dict = {"__name__": "__docs__"}
    old = os.getcwd()
    os.chdir(cwd)
    try:
        for i, code in enumerate(blocks):
            try:
                exec(compile(code, f"{md.name}[block {i}]", "exec"), ns)
            except Exception as e:  # name the block that broke
                raise AssertionError(f"{md.name} block {i} failed: {type(e).__name__}: {e}\n{code}") from e
    finally:
        os.chdir(old)
        import matplotlib.pyplot as plt

        plt.close("all")
    return ns


@pytest.fixture(scope="module")
def sorted_folder(sorted_drifting_session):
    """The folder holding ``sorted/`` (sorting.zarr + phy/) of a drifting synthetic SpikeGLX session (the
    session-wide fixture of conftest.py, shared with the report tests)."""
    return sorted_drifting_session["root"]


def test_from_kilosort4_guide_runs(sorted_folder):
    ns = _run_blocks(DOCS / "from-kilosort4.md", sorted_folder)
    so = ns["sorting"]
    assert so.sizes["unit"] >= 3
    # the lines did what the guide says
    assert ns["spike_best_channel"].shape == (so.sizes["spike"],)
    assert ns["same"] >= 0.5
    assert ns["displacement"].dims == ("time", "block") and ns["mean_drift"] > 1.0  # drift ran and moved
    assert len(ns["table"]) == so.sizes["unit"]
    assert ns["good_spikes"].sizes["spike"] == int(so.n_spikes.where(so.label == "good", 0).sum())


def test_from_kilosort4_covers_every_idiom_of_the_notes():
    text = (DOCS / "from-kilosort4.md").read_text()
    for idiom in ("chan_best", "firing_rates", "camps", "contam_pct", "good_units", "mua_units", "dshift",
                  "chan_map", "amplitudes", "spike_times.npy", "spike_clusters.npy"):
        assert idiom in text


def test_quickstart_runs(tmp_path):
    ns = _run_blocks(DOCS / "quickstart.md", tmp_path)
    assert ns["good"].sizes["unit"] >= 1
    assert (tmp_path / "sorted" / "report" / "index.html").exists()


def test_settings_doc_is_generated_from_parameters():
    spec = importlib.util.spec_from_file_location("gen_settings", DOCS / "_gen_settings.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = gen.render()
    assert (DOCS / "settings.md").read_text(encoding="utf-8") == text, \
        "docs/settings.md is stale: run python docs/_gen_settings.py"
    from spikearray.settings import PARAMETERS

    for p in PARAMETERS:
        assert f"| `{p.name}` |" in text
    ns: dict = {}
    exec(compile(python_blocks(DOCS / "settings.md")[0].split("sorting =")[0], "settings.md", "exec"), ns)
    assert ns["s2"].Th_learned == 7


def test_docs_links_resolve_and_readme_lists_the_guides():
    for md in [ROOT / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", md.read_text(encoding="utf-8")):
            assert (md.parent / target).exists(), f"{md.name} links to missing {target}"
    readme = (ROOT / "README.md").read_text()
    for name in ("install.md", "quickstart.md", "outputs.md", "settings.md", "from-kilosort4.md", "README.md"):
        assert f"docs/{name}" in readme
