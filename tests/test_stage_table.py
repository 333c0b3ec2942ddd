"""The stage table drives sort's walk, the cache hashes and the docs; each stage reads only what it declares."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

import spikearray as sa
import spikearray.metrics.sorting
from spikearray import pipeline
from spikearray.pipeline import STAGES, stage_hashes, stage_table_markdown
from spikearray.settings import IGNORED

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_sorter_doc_stage_table_is_generated_from_the_stage_table():
    spec = importlib.util.spec_from_file_location("gen_stages", DOCS / "_gen_stages.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = (DOCS / "sorter.md").read_text(encoding="utf-8")
    assert gen.render(text) == text, "docs/sorter.md is stale: run python docs/_gen_stages.py"
    assert stage_table_markdown() in text
    for st in STAGES:
        assert f"| {st.name} |" in text


def test_the_table_is_consistent():
    names = [st.name for st in STAGES]
    assert len(set(names)) == len(names)
    made = {"recording"}
    for st in STAGES:
        assert set(st.inputs) <= made, f"{st.name} takes a result no earlier stage makes"
        made.add(st.output)
    known = {p.name for p in sa.settings.PARAMETERS}
    for st in STAGES:
        assert set(st.reads) <= known, st.name


def test_ignored_settings_enter_no_hash():
    for name in IGNORED:
        assert all(name not in pipeline._hashed(st) for st in STAGES), name


class _Tracking(sa.Settings):
    """Settings that record which names are read, and under which stage."""

    __slots__ = ()
    stage: list = [None]
    reads: dict = {}

    def __getattr__(self, name):
        if _Tracking.stage[0] is not None and not name.startswith("_"):
            _Tracking.reads.setdefault(_Tracking.stage[0], set()).add(name)
        return super().__getattr__(name)


def test_every_stage_reads_only_the_settings_it_declares(sorted_session, monkeypatch):
    """A setting a stage reads but does not declare would not enter its hash: a stale cache would be reused."""
    def tracked(st):
        def run(*args, run):
            _Tracking.stage[0] = st.name
            try:
                return st.function(*args, run=run)
            finally:
                _Tracking.stage[0] = None

        return dataclasses.replace(st, function=run)

    monkeypatch.setattr(pipeline, "STAGES", tuple(tracked(st) for st in STAGES))
    _Tracking.reads.clear()
    so = sa.sort(sorted_session["recording"], _Tracking(nblocks=1, batch_size=30000), progress=False)
    assert so.sizes["unit"] > 0
    assert set(_Tracking.reads) >= {"preprocess", "drift", "bases", "detect", "cluster", "match", "merge+metrics"}
    for st in STAGES:
        undeclared = _Tracking.reads.get(st.name, set()) - set(st.reads)
        assert not undeclared, f"stage {st.name!r} reads {sorted(undeclared)} without declaring them"


def test_a_cached_stage_is_reused_unless_a_setting_it_reads_changes(sorted_session, tmp_path, monkeypatch):
    rec = sorted_session["recording"]
    s = sa.Settings(nblocks=0, batch_size=30000)
    out = tmp_path / "out"

    def crash(*a, **k):
        raise RuntimeError("simulated crash after matching")

    with monkeypatch.context() as m:  # leave every cached stage in OUT/.stages
        m.setattr(spikearray.metrics.sorting, "build_sorting", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            sa.sort(rec, s, output=out, progress=False)
    # Th_universal is read by detection only: preprocessing, drift and the bases are reused, detection and
    # everything that takes its spikes is recomputed
    changed = s.replace(Th_universal=7.0)
    a, b = stage_hashes(s, None), stage_hashes(changed, None)
    assert [st.name for st in STAGES if a[st.name] != b[st.name]] == ["detect", "cluster", "match", "recluster",
                                                                       "merge+metrics"]
    again = sa.sort(rec, changed, output=out, progress=False)
    assert json.loads(again.attrs["stages_skipped"]) == ["preprocess", "drift", "bases"]
    assert again.sizes["unit"] > 0  # (tests/test_resume.py checks a resumed run equals an uninterrupted one)
