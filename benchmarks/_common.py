"""Helpers shared by the benchmark scripts (paths, data sets, child processes, machine info).

This module only needs the standard library and ``psutil``, so the parent
scripts (``ground_truth.py``, ``scaling.py``, ``make_table.py``) run in any
Python; the sorters and the scoring run in child processes with the Python
each of them needs.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
PEERS_VENV = BENCH_DIR / ".peers-venv"
PEERS_PYTHON = PEERS_VENV / "bin" / "python"
MAKE_GT = REPO_ROOT.parent / "shared" / "gt" / "make_gt.py"
DEFAULT_DATA_DIR = REPO_ROOT / "gt_data"

MAKE_PAPER = REPO_ROOT.parent / "shared" / "gt" / "make_paper_set.py"

#: The exact generator arguments of the public sets (``shared/gt/README.md``): the sparse GT-A/GT-B of
#: ``make_gt.py`` and the dense sets of the sorting-components paper's recipe (``make_paper_set.py``,
#: public seed 2205; P384 is the paper's own size).
PUBLIC_SETS: dict[str, list[str]] = {
    "GT-A": ["--seed", "42", "--duration", "120", "--num-channels", "64", "--layout", "np1",
             "--num-units", "35", "--drift", "none", "--noise-level", "8"],
    "GT-B": ["--seed", "42", "--duration", "120", "--num-channels", "64", "--layout", "np1",
             "--num-units", "35", "--drift", "nonrigid", "--drift-amplitude", "25", "--noise-level", "8"],
    # the dense-data issue's noisier static set: GT-A's recipe at 12 uV of noise instead of 8
    "GT-N12": ["--seed", "42", "--duration", "120", "--num-channels", "64", "--layout", "np1",
               "--num-units", "35", "--drift", "none", "--noise-level", "12"],
    "P128-static": ["--probe", "Neuropixels1-128", "--units", "250", "--duration", "100", "--seed", "2205"],
    "P128-drift": ["--probe", "Neuropixels1-128", "--units", "250", "--duration", "100", "--seed", "2205",
                   "--drift"],
    "P384-static": ["--probe", "Neuropixels1-384", "--units", "500", "--duration", "600", "--seed", "2205"],
    "P384-drift": ["--probe", "Neuropixels1-384", "--units", "500", "--duration", "600", "--seed", "2205",
                   "--drift"],
}

#: Sets with drift: peers that have a motion-correction switch (Lupin, Tridesclous2) run with it on there,
#: since their default (off) breaks them on drifting data (shared/gt/README.md).
DRIFTING_SETS = frozenset({"GT-B", "P128-drift", "P384-drift"})


def set_generator(name: str) -> Path:
    """The generator script of a public set: ``make_paper_set.py`` for the P* sets, else ``make_gt.py``."""
    return MAKE_PAPER if name.startswith("P") else MAKE_GT


#: Sorters the harness knows; every one but spikearray runs in the peers venv.
SORTERS = ("spikearray", "kilosort4", "lupin", "spykingcircus2", "tridesclous2", "mountainsort5")

#: Files that make a folder a ground-truth set.
SET_FILES = ("recording.bin", "probe.json", "params.json", "ground_truth.npz")

#: Threads each sorter may use: the reference machine kind has 2 cores.
N_JOBS = 2


def sorter_python(sorter: str) -> str:
    """Return the interpreter a sorter runs under.

    Parameters
    ----------
    sorter : str
        Sorter name, one of :data:`SORTERS`.

    Returns
    -------
    str
        ``sys.executable`` for spikearray (the project's own environment), the
        peers venv's Python otherwise.
    """
    if sorter == "spikearray":
        return sys.executable
    return str(require_peers_python())


def require_peers_python() -> Path:
    """Return the peers venv's Python, or exit with a hint if it is missing.

    Returns
    -------
    pathlib.Path
        Path of ``benchmarks/.peers-venv/bin/python``.
    """
    if not PEERS_PYTHON.exists():
        sys.exit(f"{PEERS_PYTHON} is missing: run `bash benchmarks/peers.sh` first")
    return PEERS_PYTHON


def child_env(sorter: str) -> dict[str, str]:
    """Environment for a child process, with threads capped at :data:`N_JOBS`.

    Parameters
    ----------
    sorter : str
        Sorter name; spikearray also gets the repository root on ``PYTHONPATH``
        so the benchmark measures the working tree, not an installed copy.

    Returns
    -------
    dict of str to str
        A copy of ``os.environ`` with the changes.
    """
    env = dict(os.environ)
    # BLAS/OpenMP pools otherwise size themselves to all cores seen, which
    # would make numbers differ between machines with the same 2-core budget.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(N_JOBS)
    if sorter == "spikearray":
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def is_set_dir(path: Path) -> bool:
    """Tell whether ``path`` holds all files of a ground-truth set."""
    return all((path / name).exists() for name in SET_FILES)


def generate_set(out: Path, make_gt_args: list[str], script: Path = MAKE_GT) -> Path:
    """Write a ground-truth set with ``make_gt.py`` (or ``script``) unless it is already there.

    Parameters
    ----------
    out : pathlib.Path
        Folder to write; skipped when it already holds a complete set.
    make_gt_args : list of str
        Arguments for ``make_gt.py`` other than ``--out``.

    Returns
    -------
    pathlib.Path
        ``out``.
    """
    if is_set_dir(out):
        return out
    if not script.exists():
        sys.exit(f"{script} not found: it is the generator of the public sets")
    out.parent.mkdir(parents=True, exist_ok=True)
    # make_gt needs spikeinterface, which lives in the peers venv only.
    cmd = [str(require_peers_python()), str(script), *make_gt_args, "--out", str(out)]
    print("generating:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out


def resolve_set(name_or_path: str, data_dir: Path = DEFAULT_DATA_DIR) -> tuple[str, Path]:
    """Map a public set's name (:data:`PUBLIC_SETS`) or a folder to a set name and a folder with its files.

    Parameters
    ----------
    name_or_path : str
        A key of :data:`PUBLIC_SETS` (generated into ``data_dir`` if missing) or the
        path of a folder holding :data:`SET_FILES`.
    data_dir : pathlib.Path, optional
        Where public sets are generated.

    Returns
    -------
    tuple of (str, pathlib.Path)
        Set name (used in output file names) and its folder.
    """
    if name_or_path in PUBLIC_SETS:
        return name_or_path, generate_set(data_dir / name_or_path, PUBLIC_SETS[name_or_path],
                                          set_generator(name_or_path))
    path = Path(name_or_path).resolve()
    if not is_set_dir(path):
        sys.exit(f"{path} is neither a public set ({', '.join(PUBLIC_SETS)}) nor a folder with "
                 f"{', '.join(SET_FILES)}")
    return path.name, path


def read_params(set_dir: Path) -> dict:
    """Read a set's ``params.json``."""
    return json.loads((set_dir / "params.json").read_text())


def recording_seconds(params: dict) -> float:
    """Duration of a set's recording in seconds, from its ``params.json``."""
    return params["n_samples"] / params["sampling_rate"]


@dataclass
class ChildRun:
    """What :func:`run_measured` measured of one child process tree."""

    returncode: int
    wall_s: float
    peak_rss_bytes: int
    loadavg_before: tuple[float, float, float]
    loadavg_after: tuple[float, float, float]


def _tree_rss(proc: psutil.Process) -> int:
    """Sum the resident set sizes of ``proc`` and all its descendants.

    Sorters fork workers (SpikeInterface's ``n_jobs``, joblib, torch), so the
    child's own RSS alone would undercount. Pages shared between processes are
    counted once per process, which errs on the high side, like ``ps`` would.
    """
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            # A worker may exit between listing and reading: skip it.
            pass
    return total


def run_measured(cmd: list[str], env: dict[str, str], log_path: Path, poll_s: float = 0.2) -> ChildRun:
    """Run ``cmd`` and measure its wall time and peak process-tree RSS.

    Parameters
    ----------
    cmd : list of str
        Command line of the child.
    env : dict of str to str
        Its environment.
    log_path : pathlib.Path
        File that receives the child's stdout and stderr.
    poll_s : float, optional
        Interval between RSS samples; peaks shorter than this can be missed.

    Returns
    -------
    ChildRun
        Exit code, wall seconds, peak RSS in bytes and the 1/5/15-minute load
        averages before and after (to show whether the CPU was shared).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    peak = 0
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        popen = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        proc = psutil.Process(popen.pid)
        while popen.poll() is None:
            peak = max(peak, _tree_rss(proc))
            time.sleep(poll_s)
        wall = time.perf_counter() - t0
    return ChildRun(popen.returncode, wall, peak, load_before, os.getloadavg())


def machine_info() -> dict:
    """Describe the machine a benchmark ran on.

    Returns
    -------
    dict
        Host name, logical cores, RAM in GiB, CPU model, GPU (``"none"`` when
        ``nvidia-smi`` lists none), OS and the parent's Python version.
    """
    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "none"
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            gpu = "; ".join(out.stdout.strip().splitlines())
    return {
        "hostname": platform.node(),
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_model": cpu_model,
        "gpu": gpu,
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def now_iso() -> str:
    """Current local time, ISO 8601 to the second."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` as indented JSON, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")
