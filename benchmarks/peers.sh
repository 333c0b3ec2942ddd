#!/usr/bin/env bash
# Create (or bring up to date) the virtual environment the peer sorters run in.
#
# Kilosort4 and SpikeInterface's sorters pull heavy, pinned dependencies; keeping
# them in benchmarks/.peers-venv means they never touch the project's own
# environment. Safe to run again: an existing venv is reused and pip only
# installs what is missing. The venv also runs make_gt.py and the scoring.
#
# Usage: bash benchmarks/peers.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.peers-venv"
python="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check)

# torch first and pinned: an unpinned torch (as kilosort would ask for) pulls a
# several-GB CUDA build; 2.13.0 resolves to the CPU wheel on this machine kind.
"${pip[@]}" "torch==2.13.0"
# The sorters measured, pinned to the versions the published numbers used.
# hdbscan: Tridesclous2/SpykingCircus2 clustering; mountainsort5 + isosplit6:
# MountainSort5; numba: SI's sorting components; psutil: the RSS probe.
"${pip[@]}" "torch==2.13.0" "kilosort==4.1.7" "spikeinterface[full]==0.105.3" \
    probeinterface pandas numba hdbscan "mountainsort5==0.5.9" isosplit6 psutil matplotlib

"$venv/bin/python" - <<'PY'
import kilosort, spikeinterface, torch
print("peers venv ready: kilosort", kilosort.__version__, "spikeinterface", spikeinterface.__version__,
      "torch", torch.__version__)
PY
