import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from spikearray.cli import main
from spikearray.synthetic import generate_recording, write_spikeglx

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)\n```", readme, flags=re.S)
    quick = readme.split("## Quick start")[1].split("##")[0]
    commands = re.findall(r"```sh\n(.*?)\n```", quick, flags=re.S)
    assert len(commands) == 2, "the Quick start must hold exactly two commands"
    assert "spikearray demo" in commands[0] and "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()
    assert all("torch==2.13.0" in c for c in commands) and blocks


def test_info_human_and_json(tmp_path, capsys):
    rec, _ = generate_recording(duration=1.0, n_channels=16, n_units=1, seed=0)
    path = write_spikeglx(rec, tmp_path / "s.imec0.ap.bin")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "16 on 1 shank" in out and "30000 Hz" in out and "2.34375 µV/bit" in out
    assert main(["info", str(path), "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["n_channels"] == 16 and js["n_samples"] == 30000


def test_errors_are_one_line_and_nonzero(tmp_path):
    bad = tmp_path / "x.bin"
    np.zeros(10, np.int16).tofile(bad)
    r = subprocess.run([sys.executable, "-m", "spikearray", "info", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "n_channels" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
