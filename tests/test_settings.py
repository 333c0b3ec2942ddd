import json
import math

import pytest

from spikearray import Settings
from spikearray.errors import SettingsError
from spikearray.settings import PARAMETERS, IgnoredSettingWarning


def test_defaults_match_kilosort4():
    s = Settings.kilosort4()
    assert s.batch_size == 60000 and s.nblocks == 1 and s.Th_universal == 9 and s.Th_learned == 8
    # the three documented deviations of spikearray's own defaults
    d = Settings()
    assert (d.nblocks, d.Th_universal, d.Th_learned) == (5, 6.0, 6.0)
    assert Settings.kilosort4(nblocks=3).nblocks == 3
    assert s.whitening_range == 32 and s.highpass_cutoff == 300 and s.nt == 61 and s.nt0min_ == 20
    assert s.drift_smoothing == (0.5, 0.5, 0.5) and s.acg_threshold == 0.2 and s.ccg_threshold == 0.25
    assert s.duplicate_spike_bins(30000.0) == 7


def test_accepts_a_kilosort4_settings_dict():
    ks = {"n_chan_bin": 385, "fs": 30000, "data_dir": "/data/run1", "nblocks": 5, "Th_learned": 7,
          "drift_smoothing": [0.5, 1.0, 0.5]}
    with pytest.warns(IgnoredSettingWarning, match="data_dir"):  # accepted, but open_recording takes the path
        s = Settings(**ks)
    assert s.n_chan_bin == 385 and s.nblocks == 5 and s.Th_learned == 7.0
    assert s.drift_smoothing == (0.5, 1.0, 0.5)


def test_unknown_key_suggests_the_closest_name():
    with pytest.raises(SettingsError, match="Did you mean 'Th_universal'"):
        Settings(Th_univeral=8)
    with pytest.raises(SettingsError, match="nblocks"):
        Settings(n_blocks=3)


def test_bad_values_are_named():
    with pytest.raises(SettingsError, match="nt.*odd"):
        Settings(nt=60)
    with pytest.raises(SettingsError, match="whitening_range.*out of bounds"):
        Settings(whitening_range=0)
    with pytest.raises(SettingsError, match="do_CAR"):
        Settings(do_CAR="yes")
    with pytest.raises(SettingsError, match="device"):
        Settings(device="gpu")


def test_json_round_trip_including_infinity():
    s = Settings(nblocks=3, tmax=math.inf, device="cpu", Th_universal=10)
    text = s.to_json()
    assert json.loads(text)["tmax"] == "inf"
    assert Settings.from_json(text) == s
    assert s.replace(nblocks=0).nblocks == 0 and s.nblocks == 3


def test_settings_are_immutable_and_table_is_complete():
    s = Settings()
    with pytest.raises(AttributeError):
        s.nblocks = 2
    names = {p.name for p in PARAMETERS}
    assert {"Th_single_ch", "max_peels", "cluster_neighbors", "position_limit", "device"} <= names
    assert set(s.to_dict()) == names


def test_settings_pickle_and_copy_round_trip():
    # dask-distributed ships Settings to worker processes by pickling them
    import copy
    import pickle

    s = Settings(Th_learned=7, nblocks=3, device="cpu")
    back = pickle.loads(pickle.dumps(s))
    assert back == s and back.Th_learned == 7 and back.nblocks == 3
    assert copy.deepcopy(s) == s and copy.copy(s) == s
    with pytest.raises(AttributeError, match="immutable"):
        back.nblocks = 4


def test_command_line_flags_are_lower_case_with_the_old_gain_spelling_as_an_alias():
    import argparse

    from spikearray.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        for action in sub._actions:
            if action.option_strings:
                assert action.option_strings[0] == action.option_strings[0].lower(), (name, action.option_strings)
    for flag in ("--gain-to-uv", "--gain-to-uV"):
        args = parser.parse_args(["info", "x.bin", "--n-channels", "4", flag, "0.5"])
        assert args.gain_to_uV == 0.5


def test_of_sorting_reads_a_sortings_settings_and_falls_back_to_the_defaults():
    import numpy as np
    import xarray as xr

    ds = xr.Dataset({"template": (("unit", "sample", "channel"), np.zeros((1, 41, 2)))},
                    attrs={"settings": Settings(Th_universal=10.0).to_json()})
    s = Settings.of_sorting(ds)
    assert s.Th_universal == 10.0 and s.nt == 41 and s.nt0min_ == int(20 * 41 / 61)
    ds.attrs["settings"] = "not json"  # a foreign folder read with read_phy
    d = Settings.of_sorting(ds)
    assert d.Th_universal == Settings().Th_universal and d.nt == 41 and d.highpass_cutoff == 300.0
    assert Settings.of_sorting(xr.Dataset()).nt == Settings().nt
