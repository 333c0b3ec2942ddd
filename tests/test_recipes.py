"""Batch recipes: three synthetic sessions, one corrupted; YAML recipes with per-session settings."""

from __future__ import annotations

import csv
import importlib.util
import os
from pathlib import Path

import pytest

from spikearray.cli import main
from spikearray.recipes import RecipeError, load_recipe
from spikearray.synthetic import generate_recording, write_spikeglx

ROOT = Path(__file__).resolve().parents[1]
FAST = '{"nblocks": 0, "batch_size": 30000}'


def _session(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rec, _ = generate_recording(duration=8.0, n_channels=16, n_units=3, seed=seed)
    return write_spikeglx(rec, path)


def _corrupt(path: Path) -> None:
    with open(path, "r+b") as f:  # an odd number of bytes missing: not a whole number of samples
        f.truncate(os.path.getsize(path) - 3)


@pytest.fixture(scope="module")
def three_sessions(tmp_path_factory):
    root = tmp_path_factory.mktemp("sessions") / "raw"
    paths = [_session(root / "m1" / "a_g0_t0.imec0.ap.bin", 0), _session(root / "m1" / "b_g0_t0.imec0.ap.bin", 1),
             _session(root / "m2" / "c_g0_t0.imec0.ap.bin", 2)]
    _corrupt(paths[1])
    return root, paths


def _batch_script():
    spec = importlib.util.spec_from_file_location("batch_sessions", ROOT / "recipes" / "batch_sessions.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _summary(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {row["session"]: row for row in csv.DictReader(f, delimiter="\t")}


def test_batch_sorts_two_reports_the_corrupt_one_and_skips_on_rerun(three_sessions, tmp_path, capsys):
    root, _ = three_sessions
    out = tmp_path / "sorted"
    script = _batch_script()
    assert script.main([str(root), "--out", str(out), "--settings", FAST]) == 1  # one session failed
    printed = capsys.readouterr().out
    rows = _summary(out / "summary.tsv")
    assert [rows[k]["status"] for k in ("m1/a_g0_t0.imec0", "m1/b_g0_t0.imec0", "m2/c_g0_t0.imec0")] == \
        ["ok", "error", "ok"]
    assert "FileSizeError" in rows["m1/b_g0_t0.imec0"]["error"]
    for k in ("m1/a_g0_t0.imec0", "m2/c_g0_t0.imec0"):
        assert (out / k / "sorting.zarr").is_dir() and (out / k / "phy" / "params.py").is_file()
        assert int(rows[k]["units"]) >= 1 and int(rows[k]["spikes"]) > 50
    assert not (out / "m1" / "b_g0_t0.imec0" / "sorting.zarr").exists()
    assert "2 sorted, 0 skipped (already complete), 1 failed" in printed
    assert "session" in printed and "FileSizeError" in printed
    stamp = (out / "m1" / "a_g0_t0.imec0" / "sorting.zarr").stat().st_mtime_ns
    # rerun: the two complete sessions are skipped (not re-sorted); the corrupt one fails again
    assert script.main([str(root), "--out", str(out), "--settings", FAST]) == 1
    again = _summary(out / "summary.tsv")
    assert [again[k]["status"] for k in ("m1/a_g0_t0.imec0", "m1/b_g0_t0.imec0", "m2/c_g0_t0.imec0")] == \
        ["skipped", "error", "skipped"]
    assert again["m1/a_g0_t0.imec0"]["units"] == rows["m1/a_g0_t0.imec0"]["units"]
    assert (out / "m1" / "a_g0_t0.imec0" / "sorting.zarr").stat().st_mtime_ns == stamp
    assert "0 sorted, 2 skipped (already complete), 1 failed" in capsys.readouterr().out


def test_batch_bad_settings_and_missing_root(tmp_path, capsys):
    script = _batch_script()
    assert script.main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    (tmp_path / "r").mkdir()
    assert script.main([str(tmp_path / "r"), "--out", str(tmp_path / "o"), "--settings", '{"nblock": 0}']) == 2
    assert "nblocks" in capsys.readouterr().err  # the closest valid name is suggested


def test_yaml_recipe_with_overrides_and_skip(three_sessions, tmp_path, capsys):
    root, paths = three_sessions
    recipe = tmp_path / "sessions.yaml"
    recipe.write_text(f"""
output_root: out
settings: {{nblocks: 0, batch_size: 30000}}
sessions:
  - path: {paths[0]}
    settings: {{Th_universal: 10.0}}
  - path: {paths[1]}
    out: elsewhere/b
""")
    r = load_recipe(recipe)
    assert r.sessions[0].settings == {"nblocks": 0, "batch_size": 30000, "Th_universal": 10.0}
    assert r.sessions[0].out == tmp_path / "out" / "a_g0_t0.imec0"
    assert r.sessions[1].out == tmp_path / "elsewhere" / "b"
    assert main(["recipe", str(recipe)]) == 1
    rows = _summary(tmp_path / "out" / "summary.tsv")
    assert rows["a_g0_t0.imec0"]["status"] == "ok" and rows["b_g0_t0.imec0"]["status"] == "error"
    import json

    import spikearray as sa

    so = sa.open_sorting(tmp_path / "out" / "a_g0_t0.imec0")
    assert json.loads(so.attrs["settings"])["Th_universal"] == 10.0  # the per-session override was used
    capsys.readouterr()
    assert main(["recipe", str(recipe)]) == 1
    assert "1 skipped" in capsys.readouterr().out


@pytest.mark.parametrize("text, words", [
    ("output_root: o\nsesions: []\n", ["'sesions'", "'sessions'", "output_root, settings, sessions, report"]),
    ("output_root: o\nsessions:\n  - path: a.ap.bin\n    prob: p.json\n", ["'prob'", "'probe'", "sessions[0]"]),
    ("output_root: o\nsettings: {Th_universa: 9}\nsessions: [a.ap.bin]\n", ["Th_universa", "Th_universal"]),
    ("output_root: o\nsessions:\n  - path: a.ap.bin\n    settings: {nblocks: -1}\n", ["nblocks", "sessions[0]"]),
    ("sessions:\n  - path: a.ap.bin\n", ["no 'out'", "output_root"]),
    ("output_root: o\nsessions: []\n", ["non-empty list"]),
    ("output_root: o\nsessions:\n  - probe: x.json\n", ["no 'path'"]),
    ("- just\n- a list\n", ["mapping"]),
    ("output_root: o\nsessions:\n  - a.ap.bin\n  - sub/a.ap.bin\n", ["like sessions[0]"]),
])
def test_yaml_recipe_errors_name_the_key(tmp_path, text, words):
    f = tmp_path / "r.yaml"
    f.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(f)
    for w in words:
        assert w in str(e.value)


def test_yaml_recipe_cli_error_is_one_line(tmp_path, capsys):
    f = tmp_path / "r.yaml"
    f.write_text("output_root: o\nsessions: [a.ap.bin]\nreprot: true\n")
    assert main(["recipe", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'reprot'" in err and "'report'" in err


def test_shipped_example_recipe_is_valid(capsys):
    r = load_recipe(ROOT / "recipes" / "sessions.yaml")
    assert len(r.sessions) == 3 and r.report is True
    assert r.sessions[1].settings["Th_universal"] == 10.0 and r.sessions[1].settings["nblocks"] == 5
    assert r.sessions[2].probe.endswith("rat3_custom_layout.json")
    assert main(["recipe", str(ROOT / "recipes" / "sessions.yaml"), "--check"]) == 0
    assert "3 sessions" in capsys.readouterr().out


def test_yaml_recipe_wired_only_sorts_the_wired_channels_of_a_partial_probe(three_sessions, tmp_path, capsys):
    import json

    import spikearray as sa

    root, paths = three_sessions
    full = sa.open_recording(paths[0])
    keep = 12  # a probe file that wires 12 of the 16 recorded channels
    probe = tmp_path / "partial.json"
    probe.write_text(json.dumps({"chanMap": list(range(keep)), "xc": full["x"].values[:keep].tolist(),
                                 "yc": full["y"].values[:keep].tolist(), "kcoords": [0] * keep, "n_chan": keep}))
    text = f"output_root: out\nsettings: {{nblocks: 0, batch_size: 30000}}\nsessions:\n  - path: {paths[0]}\n" \
           f"    probe: {probe}\n"
    (tmp_path / "plain.yaml").write_text(text)
    (tmp_path / "wired.yaml").write_text(text.replace("output_root: out", "output_root: out_wired")
                                         + "    wired_only: true\n")
    assert main(["recipe", str(tmp_path / "plain.yaml")]) == 1  # refused, naming the unwired channels
    row = _summary(tmp_path / "out" / "summary.tsv")["a_g0_t0.imec0"]
    assert row["status"] == "error" and "12, 13, 14, 15" in capsys.readouterr().out + row.get("error", "")
    assert main(["recipe", str(tmp_path / "wired.yaml")]) == 0
    so = sa.open_sorting(tmp_path / "out_wired" / "a_g0_t0.imec0")
    assert so.sizes["channel"] == keep
    with pytest.raises(RecipeError, match="wired_only"):
        (tmp_path / "bad.yaml").write_text(text + "    wired_only: yes please\n")
        load_recipe(tmp_path / "bad.yaml")
