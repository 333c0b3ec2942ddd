"""Sorting many sessions in turn: find them, skip the finished ones, survive failures, summarise.

Used by ``recipes/batch_sessions.py`` (every SpikeGLX recording under a folder) and by ``spikearray recipe FILE``
(sessions listed in a YAML file with per-session probe files and settings overrides).

A session is complete when its output folder holds ``sorting.zarr`` (``sort`` writes it atomically, so a crashed
run never leaves one behind). A session that raises is recorded with its error and the next one starts.
"""

from __future__ import annotations

import difflib
import json
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .errors import SpikearrayError

__all__ = ["RecipeError", "Session", "SessionResult", "Recipe", "find_sessions", "session_name", "load_recipe",
           "run_sessions", "format_results", "write_summary", "SUMMARY_COLUMNS"]

#: Columns of the summary table and of ``summary.tsv``.
SUMMARY_COLUMNS = ("session", "status", "units", "good", "spikes", "seconds", "error")

_TOP_KEYS = ("output_root", "settings", "sessions", "report")
_SESSION_KEYS = ("path", "probe", "wired_only", "out", "settings")


class RecipeError(SpikearrayError, ValueError):
    """A recipe file is malformed: unknown key, wrong type, missing field."""


@dataclass(frozen=True)
class Session:
    """One recording to sort.

    Attributes
    ----------
    path : Path
        The recording (SpikeGLX ``.ap.bin``, or anything :func:`spikearray.open_recording` opens with ``probe``).
    out : Path
        Output folder (``sorting.zarr``, ``phy/``, ``report/``).
    probe : str or None
        Probe file for :func:`spikearray.open_recording`.
    wired_only : bool
        Sort only the file columns the probe wires (``open_recording(..., wired_only=True)``); without it a
        probe that leaves data columns unwired stops the session with an error that lists them.
    settings : dict
        Overrides on top of the recipe's defaults (Kilosort4 / spikearray names).
    name : str
        Label in the summary.
    """

    path: Path
    out: Path
    probe: str | None = None
    settings: dict = field(default_factory=dict)
    name: str = ""
    wired_only: bool = False


@dataclass
class SessionResult:
    """What happened to one session: ``status`` is ``ok``, ``skipped`` (already complete) or ``error``."""

    session: Session
    status: str
    units: int | None = None
    good: int | None = None
    spikes: int | None = None
    seconds: float = 0.0
    error: str = ""

    def row(self) -> dict[str, str]:
        """The summary row as strings (empty where unknown)."""
        def s(v: Any) -> str:
            return "" if v is None else str(v)

        return {"session": self.session.name, "status": self.status, "units": s(self.units), "good": s(self.good),
                "spikes": s(self.spikes), "seconds": f"{self.seconds:.1f}", "error": self.error}


@dataclass(frozen=True)
class Recipe:
    """Sessions and shared defaults read from a recipe file (see :func:`load_recipe`)."""

    sessions: tuple[Session, ...]
    settings: dict
    output_root: Path | None
    report: bool = False


def session_name(path: Path) -> str:
    """``run_g0_t0.imec0`` for ``…/run_g0_t0.imec0.ap.bin`` (the file name without ``.ap.bin``/``.bin``)."""
    name = path.name
    for suffix in (".ap.bin", ".bin", ".dat", ".raw"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def find_sessions(root: str | os.PathLike, out_root: str | os.PathLike, *, settings: dict | None = None,
                  pattern: str = "*.ap.bin") -> list[Session]:
    """Every SpikeGLX recording under ``root`` (recursively, sorted by path), each with its own output folder.

    The output mirrors the layout: ``root/a/b/run_g0_t0.imec0.ap.bin`` → ``out_root/a/b/run_g0_t0.imec0``.
    A recording without its ``.meta`` is still listed; opening it fails and is recorded like any other error.

    Parameters
    ----------
    root, out_root : path
    settings : dict, optional
        Settings for every session.
    pattern : str
        Glob of the recordings.

    Returns
    -------
    list of Session

    Raises
    ------
    RecipeError
        ``root`` is not a folder.
    """
    root, out_root = Path(root), Path(out_root)
    if not root.is_dir():
        raise RecipeError(f"sessions folder {str(root)!r} does not exist or is not a folder.")
    out = []
    for p in sorted(root.rglob(pattern)):
        rel = p.parent.relative_to(root)
        out.append(Session(path=p, out=out_root / rel / session_name(p), settings=dict(settings or {}),
                           name=str(rel / session_name(p))))
    return out


def _check_keys(d: Any, allowed: Sequence[str], where: str) -> dict:
    if not isinstance(d, dict):
        raise RecipeError(f"{where} must be a mapping of key: value; got {type(d).__name__} ({d!r}).")
    for k in d:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), list(allowed), n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"unknown key {k!r} in {where}.{hint} Allowed keys: {', '.join(allowed)}.")
    return d


def _check_settings(d: Any, where: str) -> dict:
    from .settings import Settings

    if d is None:
        return {}
    if not isinstance(d, dict):
        raise RecipeError(f"{where} must be a mapping of setting: value; got {type(d).__name__} ({d!r}).")
    try:
        Settings(**d)
    except SpikearrayError as e:
        raise RecipeError(f"{where}: {e}") from None
    return dict(d)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read a YAML recipe (``yaml.safe_load``) and check every key and setting before anything runs.

    Format::

        output_root: sorted           # default parent of each session's output folder
        settings: {nblocks: 5}        # defaults for every session (Kilosort4 / spikearray names)
        report: true                  # also write DIR/report/index.html
        sessions:
          - path: raw/m1_g0_t0.imec0.ap.bin
            probe: probes/np1.json    # optional
            wired_only: true          # optional: sort only the columns the probe wires
            out: sorted/m1            # optional: default output_root/<file name without .ap.bin>
            settings: {Th_universal: 10}   # optional overrides

    Relative paths are relative to the recipe file's folder.

    Raises
    ------
    RecipeError
        Unknown keys (named, with the allowed ones and the closest match), wrong types, invalid settings,
        a session without ``path``, or without ``out`` when there is no ``output_root``.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} not found.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {str(path)!r} is not valid YAML: {e}") from None
    data = _check_keys(data if data is not None else {}, _TOP_KEYS, f"recipe {path.name}")
    base = path.parent

    def resolve(p: Any, key: str, where: str) -> Path:
        if not isinstance(p, str) or not p:
            raise RecipeError(f"{where}: {key!r} must be a path string; got {p!r}.")
        q = Path(os.path.expanduser(p))
        return q if q.is_absolute() else base / q

    root = resolve(data["output_root"], "output_root", path.name) if data.get("output_root") is not None else None
    defaults = _check_settings(data.get("settings"), f"{path.name}: settings")
    report = data.get("report", False)
    if not isinstance(report, bool):
        raise RecipeError(f"{path.name}: 'report' must be true or false; got {report!r}.")
    raw = data.get("sessions")
    if not isinstance(raw, list) or not raw:
        raise RecipeError(f"{path.name}: 'sessions' must be a non-empty list of {{path: …}} entries; got {raw!r}.")
    sessions = []
    names: dict[Path, int] = {}
    for i, entry in enumerate(raw):
        where = f"{path.name}: sessions[{i}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        entry = _check_keys(entry, _SESSION_KEYS, where)
        if "path" not in entry:
            raise RecipeError(f"{where} has no 'path' (the recording to sort).")
        rec = resolve(entry["path"], "path", where)
        over = _check_settings(entry.get("settings"), f"{where}.settings")
        _check_settings({**defaults, **over}, f"{where}: settings + overrides")
        if entry.get("out") is not None:
            out = resolve(entry["out"], "out", where)
        elif root is not None:
            out = root / session_name(rec)
        else:
            raise RecipeError(f"{where} has no 'out' and the recipe has no 'output_root'; give one of them.")
        if out in names:
            raise RecipeError(f"{where} writes to {str(out)!r} like sessions[{names[out]}]; give it its own 'out'.")
        names[out] = i
        probe = str(resolve(entry["probe"], "probe", where)) if entry.get("probe") is not None else None
        wired = entry.get("wired_only", False)
        if not isinstance(wired, bool):
            raise RecipeError(f"{where}.wired_only is {wired!r}; expected true or false.")
        sessions.append(Session(path=rec, out=out, probe=probe, settings={**defaults, **over},
                                name=session_name(rec) if rec.name else str(rec), wired_only=wired))
    return Recipe(sessions=tuple(sessions), settings=defaults, output_root=root, report=report)


def _counts(sorting: Any) -> tuple[int, int, int]:
    import numpy as np

    K = int(sorting.sizes.get("unit", 0))
    good = int((np.asarray(sorting["label"].values).astype(str) == "good").sum()) if K else 0
    return K, good, int(sorting.sizes.get("spike", 0))


def run_sessions(sessions: Iterable[Session], *, report: bool = False, progress: bool = False,
                 log: Callable[[str], None] | None = print,
                 sorter: Callable[..., Any] | None = None) -> list[SessionResult]:
    """Sort each session in turn into its own folder; skip complete ones; record failures and go on.

    Parameters
    ----------
    sessions : iterable of Session
    report : bool
        Also write each session's HTML report.
    progress : bool
        Show ``sort``'s stage progress.
    log : callable, optional
        Receives one line per session (start, result); ``None`` for silence.
    sorter : callable, optional
        ``sorter(recording, settings, output=, progress=, report=)``; default :func:`spikearray.sort`.

    Returns
    -------
    list of SessionResult
        In the order of ``sessions``. ``KeyboardInterrupt`` is not caught: stopping a batch stops it, and the
        next run resumes with the unfinished sessions.
    """
    from .export import open_sorting
    from .io import open_recording
    from .pipeline import sort

    sorter = sorter or sort
    say = log or (lambda _msg: None)
    sessions = list(sessions)
    results = []
    for i, s in enumerate(sessions, 1):
        head = f"[{i}/{len(sessions)}] {s.name}"
        if (s.out / "sorting.zarr").exists():
            r = SessionResult(s, "skipped")
            try:
                r.units, r.good, r.spikes = _counts(open_sorting(s.out))
            except Exception as e:  # a store that cannot be read is still not re-sorted: say so
                r.error = f"complete output could not be read: {type(e).__name__}: {e}"
            say(f"{head}: already sorted in {s.out}, skipped")
            results.append(r)
            continue
        say(f"{head}: sorting {s.path} -> {s.out}")
        t0 = time.perf_counter()
        try:
            rec = open_recording(s.path, probe=s.probe, wired_only=s.wired_only)
            sorting = sorter(rec, dict(s.settings), output=s.out, progress=progress, report=report)
            units, good, spikes = _counts(sorting)
            r = SessionResult(s, "ok", units, good, spikes, time.perf_counter() - t0)
            say(f"{head}: ok, {units} units ({good} good), {spikes} spikes in {r.seconds:.1f} s")
        except Exception as e:  # one bad session must not stop the batch; the error goes to the summary
            msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace("\t", " ")
            r = SessionResult(s, "error", seconds=time.perf_counter() - t0, error=msg)
            say(f"{head}: FAILED ({msg})")
            if not isinstance(e, SpikearrayError):  # unexpected: keep the traceback for the bug report
                say("".join(traceback.format_exception(e)).rstrip())
        results.append(r)
    return results


def format_results(results: Sequence[SessionResult]) -> str:
    """A plain-text table, one row per session (:data:`SUMMARY_COLUMNS`; errors cut at 100 characters), plus a
    totals line. (Named apart from :func:`spikearray.format_summary`, which describes a recording or a sorting;
    both print through :func:`spikearray.io.summary.text_table`.)"""
    from .io.summary import text_table

    rows = [[r.row()[c] for c in SUMMARY_COLUMNS] for r in results]
    numeric = [i for i, c in enumerate(SUMMARY_COLUMNS) if c in ("units", "good", "spikes", "seconds")]
    table = text_table(rows, header=SUMMARY_COLUMNS, right=numeric,
                       max_chars={SUMMARY_COLUMNS.index("error"): 100})
    n = {k: sum(r.status == k for r in results) for k in ("ok", "skipped", "error")}
    return (f"{table}\n{len(results)} sessions: {n['ok']} sorted, {n['skipped']} skipped (already complete), "
            f"{n['error']} failed")


def write_summary(results: Sequence[SessionResult], path: str | os.PathLike) -> Path:
    """Write the summary as a tab-separated file (header = :data:`SUMMARY_COLUMNS`, plus ``path`` and ``out``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = list(SUMMARY_COLUMNS) + ["path", "out"]
    lines = ["\t".join(cols)]
    for r in results:
        row = {**r.row(), "path": str(r.session.path), "out": str(r.session.out)}
        lines.append("\t".join(row[c].replace("\t", " ") for c in cols))
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def settings_from_json(text: str | None) -> dict:
    """``--settings '{"nblocks": 0}'`` → dict, validated by :meth:`Settings.from_json` (clear errors on bad JSON,
    unknown names, types and bounds)."""
    from .settings import Settings

    if not text:
        return {}
    Settings.from_json(text)
    return json.loads(text)
