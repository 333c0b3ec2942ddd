"""Reliability under faults (issue 15): wrong probes, full disks, two runs in one folder, damaged stores.

Each test plants one fault on tiny seeded data and checks what the user sees (a :class:`SpikearrayError` that
names the file and what was wrong) and what is left on disk. ``docs/reliability.md`` lists them all.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import spikearray as sa
from spikearray.cli import main as cli_main
from spikearray.errors import ProbeMismatchError, SpikearrayError

from _meta import np1_meta, write_pair

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ 2: probe vs file
def _pi_probe(path: Path, n_contacts: int, channels: list[int] | None = None) -> Path:
    """A probeinterface JSON of a 2-column probe whose contacts are wired to ``channels`` (default 0..n-1)."""
    from probeinterface import ProbeGroup, generate_multi_columns_probe, write_probeinterface

    pr = generate_multi_columns_probe(num_columns=2, num_contact_per_column=n_contacts // 2, xpitch=32, ypitch=20)
    pr.set_device_channel_indices(np.arange(n_contacts) if channels is None else np.asarray(channels))
    pg = ProbeGroup()
    pg.add_probe(pr)
    write_probeinterface(path, pg)
    return path


@pytest.fixture
def raw32(tmp_path):
    d = np.random.default_rng(4).integers(-300, 300, size=(3000, 32), dtype=np.int16)
    p = tmp_path / "rec32.dat"
    d.tofile(p)
    return p, d


RAW = dict(n_channels=32, sampling_rate=30000.0, gain_to_uV=0.195)


def test_probe_wiring_fewer_channels_than_the_file_is_an_error(raw32, tmp_path):
    p, d = raw32
    probe = _pi_probe(tmp_path / "probe28.json", 28)
    with pytest.raises(ProbeMismatchError) as e:
        sa.open_recording(p, probe=probe, **RAW)
    msg = str(e.value)
    assert "28 of the 32" in msg and "[28, 29, 30, 31]" in msg and "wired_only=True" in msg
    # a Kilosort JSON that lists only 28 rows is the same mistake
    ks = tmp_path / "ks28.json"
    ks.write_text(json.dumps({"chanMap": list(range(28)), "xc": [0.0] * 28, "yc": [20.0 * i for i in range(28)],
                              "kcoords": [0] * 28, "n_chan": 28}))
    with pytest.raises(ProbeMismatchError, match=r"\[28, 29, 30, 31\]"):
        sa.open_recording(p, probe=ks, **RAW)


def test_wired_only_sorts_just_the_wired_channels(raw32, tmp_path):
    p, d = raw32
    wired = [0, 1, 2, 3, 5, 6, 7, 8] + list(range(12, 32))  # 28 contacts; 4, 9, 10, 11 unwired
    rec = sa.open_recording(p, probe=_pi_probe(tmp_path / "probe28.json", 28, wired), wired_only=True, **RAW)
    assert rec.sizes["channel"] == 28
    assert rec["channel"].values.tolist() == wired
    assert rec.attrs["unwired_channels"] == [4, 9, 10, 11]
    np.testing.assert_array_equal(rec.values, d[:, wired])


def test_deliberately_disconnected_sites_are_not_unwired(raw32, tmp_path):
    import scipy.io

    p, d = raw32
    conn = np.ones(32)
    conn[7] = 0  # Kilosort's way of saying "do not sort this site" (e.g. NP1.0's reference channel 191)
    scipy.io.savemat(tmp_path / "map.mat", {"chanMap": (np.arange(32) + 1.0)[:, None], "connected": conn[:, None],
                                            "xcoords": np.zeros((32, 1)), "ycoords": 20.0 * np.arange(32)[:, None]})
    rec = sa.open_recording(p, probe=tmp_path / "map.mat", **RAW)
    assert rec.sizes["channel"] == 31 and 7 not in rec["channel"].values.tolist()
    assert "unwired_channels" not in rec.attrs


def test_spikeglx_probe_override_checks_neural_channels_not_sync(tmp_path):
    n = 600
    data = np.random.default_rng(2).integers(-200, 200, size=(n, 385), dtype=np.int16)
    path = write_pair(tmp_path, "run_g0_t0.imec0", np1_meta(n), data)
    full = _pi_probe(tmp_path / "p384.json", 384)  # every AP channel; the sync column 384 has no contact
    assert sa.open_recording(path, probe=full).sizes["channel"] == 384
    part = _pi_probe(tmp_path / "p380.json", 380)
    with pytest.raises(ProbeMismatchError, match=r"380 of the 384 .*\[380, 381, 382, 383\]"):
        sa.open_recording(path, probe=part)
    rec = sa.open_recording(path, probe=part, wired_only=True)
    assert rec.sizes["channel"] == 380 and rec.attrs["unwired_channels"] == [380, 381, 382, 383]
    assert rec.attrs["sync_columns"] == [384]
    np.testing.assert_array_equal(rec.values, data[:, :380])


def test_cli_refuses_a_partial_probe_and_offers_wired_only(tmp_path, capsys):
    p = tmp_path / "rec32.bin"
    np.random.default_rng(4).standard_normal((3000, 32)).astype(np.float32).tofile(p)  # µV: no gain flag needed
    probe = _pi_probe(tmp_path / "probe28.json", 28)
    args = ["info", str(p), "--n-channels", "32", "--sampling-rate", "30000", "--dtype", "float32",
            "--probe", str(probe)]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "[28, 29, 30, 31]" in err and "--wired-only" in err and "Traceback" not in err
    assert cli_main(args + ["--wired-only"]) == 0
    assert "28" in capsys.readouterr().out
