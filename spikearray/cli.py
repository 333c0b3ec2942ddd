"""The ``spikearray`` command: ``info``, ``demo`` and the commands later stages add.

Errors on bad input print as one clear line (no traceback unless ``--debug``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from .errors import SpikearrayError

__all__ = ["main", "build_parser"]


def _cmd_info(args: argparse.Namespace) -> int:
    from .export.summary import is_sorting_path, sorting_summary
    from .io import format_summary, open_recording, summary

    if is_sorting_path(args.path):  # a sorting output folder (or its sorting.zarr)
        from .export import open_sorting

        ds = open_sorting(args.path)
        print(json.dumps(sorting_summary(ds), indent=1) if args.json else format_summary(ds, args.path))
        return 0

    kw = {}
    for k in ("n_channels", "sampling_rate", "dtype", "gain_to_uV", "probe", "wired_only"):
        v = getattr(args, k)
        if v is not None:
            kw[k] = v
    rec = open_recording(args.path, **kw)
    if args.json:
        print(json.dumps(summary(rec), indent=1))
    else:
        print(format_summary(rec))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import tempfile
    import time
    from pathlib import Path

    from .io import format_summary
    from .metrics.groundtruth import compare_to_truth
    from .pipeline import sort
    from .settings import Settings
    from .synthetic import generate_recording

    rec, truth = generate_recording(duration=args.duration, n_channels=args.channels, n_units=args.units,
                                    seed=args.seed, drift=args.drift)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="spikearray-demo-"))
    print("Built-in synthetic recording (ground truth known):")
    print(format_summary(rec))
    print(f"planted    {truth.sizes['unit']} units, {truth.sizes['spike']} spikes\n")
    t0 = time.perf_counter()
    sorting = sort(rec, Settings(), output=out, progress=not args.no_progress, overwrite=args.overwrite)
    wall = time.perf_counter() - t0
    cmp = compare_to_truth(sorting, truth)
    acc_of = {int(k): float(a) for k, a in zip(cmp.matched_unit.values, cmp.accuracy.values) if k >= 0}
    print(f"\n{'unit':>4} {'label':>5} {'depth µm':>8} {'best ch':>7} {'ampl µV':>7} {'rate Hz':>7} "
          f"{'contam':>6} {'spikes':>6} {'accuracy':>8}")
    for k in range(sorting.sizes["unit"]):
        u = sorting.isel(unit=k)
        acc = f"{acc_of[k]:.2f}" if k in acc_of else "-"
        print(f"{k:>4} {str(u.label.values):>5} {float(u.depth):>8.0f} {int(u.best_channel):>7} "
              f"{float(u.amplitude):>7.0f} {float(u.firing_rate):>7.2f} {float(u.contamination):>6.2f} "
              f"{int(u.n_spikes):>6} {acc:>8}")
    n = truth.sizes["unit"]
    print(f"\naccuracy   {cmp.attrs['n_well_detected']} of {n} planted units well detected (accuracy >= 0.8), "
          f"mean accuracy {float(cmp.accuracy.mean()):.3f}, {cmp.attrs['n_false_positive']} false-positive units")
    print(f"time       {wall:.1f} s to sort {args.duration:g} s of recording ({args.duration / wall:.1f}x faster than real time)")
    print(f"output     {out / 'sorting.zarr'}  (spikearray.open_sorting)\n           {out / 'phy'}  (phy template-gui "
          f"{out / 'phy' / 'params.py'})")
    return 0


def _cmd_export_phy(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .export import export_phy, open_sorting

    sorting = open_sorting(args.dir)
    base = Path(args.dir)
    out = Path(args.out) if args.out else (base.parent if base.suffix == ".zarr" else base) / "phy"
    recording = None
    if args.recording:
        from .io import open_recording

        recording = open_recording(args.recording)
    folder = export_phy(sorting, recording, out, overwrite=args.overwrite)
    params = (folder / "params.py").read_text()
    print(f"Phy folder  {folder}")
    print(f"units       {sorting.sizes['unit']}, spikes {sorting.sizes['spike']}")
    if "no_path.bin" in params:
        print(f"raw data    not found ({sorting.attrs.get('source', '')!r}); Phy shows no traces. Pass --recording "
              "PATH to point params.py at the binary.")
    print(f"open with   phy template-gui {folder / 'params.py'}")
    return 0


def _configure_export_phy(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="sorting output folder (holding sorting.zarr) or the sorting.zarr store")
    p.add_argument("--recording", help="the sorted recording (.ap.bin); default: the sorting's 'source' attr")
    p.add_argument("--out", help="Phy folder to write (default: DIR/phy)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing Phy folder (loses Phy curation)")


def _add_recording_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="SpikeGLX .ap.bin (or .meta), or a raw .bin/.dat with --n-channels etc.")
    p.add_argument("--probe", help="probe file (probeinterface .json, Kilosort .json/.mat, .prb)")
    p.add_argument("--wired-only", action="store_true",
                   help="sort only the channels the probe wires to a contact (default: a probe that leaves data "
                        "channels unwired is an error)")
    p.add_argument("--n-channels", type=int, help="columns in a raw binary (sync included)")
    p.add_argument("--sampling-rate", type=float, help="Hz, raw binaries")
    p.add_argument("--dtype", help="int16 (default), uint16, int32, float32; raw binaries")
    # flags are lower case; the mixed-case spelling of earlier releases stays accepted as an alias
    p.add_argument("--gain-to-uv", "--gain-to-uV", dest="gain_to_uV", type=float,
                   help="µV per integer step, raw binaries")


def _cmd_sort(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from .io import open_recording
    from .pipeline import sort
    from .resume import STAGES_DIR
    from .settings import Settings

    settings = Settings()
    if args.settings:
        try:
            text = Path(args.settings).read_text()
        except OSError as e:
            raise SpikearrayError(f"cannot read the settings file {args.settings!r} ({e.strerror}); pass a JSON "
                                  "file of name: value pairs (Kilosort4 names), e.g. {\"Th_universal\": 9}.") from None
        settings = Settings.from_json(text)
    kw = {k: getattr(args, k) for k in ("n_channels", "sampling_rate", "dtype", "gain_to_uV", "probe", "wired_only")
          if getattr(args, k) is not None}
    rec = open_recording(args.path, **kw)
    out = Path(args.out)
    resuming = (out / STAGES_DIR).is_dir() and not (out / "sorting.zarr").exists() and not args.overwrite
    if resuming:  # not while another run works there (sort refuses then, OutputLockedError)
        from ._lock import live_holder

        resuming = live_holder(out) is None
    if resuming:
        print(f"resuming    an unfinished run in {out} (finished stages are reused when their inputs match)")
    client = None
    if args.cluster:
        try:
            from distributed import Client
        except ImportError:
            raise SpikearrayError("--cluster needs dask.distributed; install it with pip install "
                                  "'spikearray[distributed]'.") from None
        try:
            client = Client(args.cluster, timeout=30)
        except (OSError, TimeoutError) as e:
            raise SpikearrayError(f"could not connect to the dask scheduler at {args.cluster!r} ({e}); check the "
                                  "address (tcp://host:8786) and that the scheduler is running.") from None
    t0 = time.perf_counter()
    try:
        sorting = sort(rec, settings, output=out, progress=not args.no_progress, client=client,
                       overwrite=args.overwrite)
    finally:
        if client is not None:
            client.close()
    elapsed = time.perf_counter() - t0
    labels = sorting["label"].values.astype(str) if "label" in sorting else []
    skipped = json.loads(sorting.attrs.get("stages_skipped", "[]"))
    print(f"units       {sorting.sizes['unit']} ({int((labels == 'good').sum()) if len(labels) else 0} good)")
    print(f"spikes      {sorting.sizes['spike']}")
    print(f"time        {elapsed:.1f} s" + (f" (reused: {', '.join(skipped)})" if skipped else ""))
    print(f"sorting     {out / 'sorting.zarr'}")
    print(f"phy         {out / 'phy'}")
    return 0


def _configure_sort(p: argparse.ArgumentParser) -> None:
    _add_recording_args(p)
    p.add_argument("--out", required=True, help="output folder (sorting.zarr, phy/); an unfinished run there "
                                                "is resumed")
    p.add_argument("--settings", help="JSON file of settings (Kilosort4 names), e.g. {\"nblocks\": 5}")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output and recompute every stage")
    p.add_argument("--cluster", help="dask scheduler address (tcp://host:8786); default: threads on this machine")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or stage messages")


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register a sub-command (used by the modules that own each command)."""

    def deco(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (help, configure, fn)
        return fn

    return deco


def _configure_info(p: argparse.ArgumentParser) -> None:
    _add_recording_args(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="output folder (default: a new temporary folder)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of synthetic data (default 60)")
    p.add_argument("--channels", type=int, default=64, help="probe channels (default 64)")
    p.add_argument("--units", type=int, default=20, help="planted units (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drift", choices=["rigid", "nonrigid"], default=None, help="add drift to the recording")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress output")


command("info", "summarise a recording (probe, channels, rate, duration, size, µV scale) or a saved sorting folder",
        _configure_info)(_cmd_info)
command("export-phy", "write the Phy / Kilosort folder of a saved sorting (DIR/phy)",
        _configure_export_phy)(_cmd_export_phy)
command("sort", "spike-sort a recording into OUT (sorting.zarr + phy/); reruns resume an unfinished OUT",
        _configure_sort)(_cmd_sort)
command("demo", "sort the built-in synthetic recording, write Zarr + Phy, print units and accuracy",
        _configure_demo)(_cmd_demo)


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    page = write_report(args.dir, recording=args.recording, progress=not args.quiet, curated=args.curated)
    print(f"report      {page}")
    return 0


def _configure_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="sorting output folder (holding sorting.zarr); the report goes to DIR/report")
    p.add_argument("--recording", help="the sorted recording, for sampled spikes (default: the sorting's 'source')")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--curated", action="store_true", help="report the Phy-curated sorting read back from DIR/phy "
                                                          "(to DIR/report-curated)")


def _cmd_recipe(args: argparse.Namespace) -> int:
    from .recipes import format_results, load_recipe, run_sessions, write_summary

    recipe = load_recipe(args.file)
    if args.check:
        print(f"{args.file}: {len(recipe.sessions)} sessions, settings and keys valid")
        for s in recipe.sessions:
            print(f"  {s.name}: {s.path} -> {s.out}")
        return 0
    results = run_sessions(recipe.sessions, report=recipe.report, progress=args.progress)
    print()
    print(format_results(results))
    root = recipe.output_root or recipe.sessions[0].out.parent
    print(f"summary written to {write_summary(results, root / 'summary.tsv')}")
    return 1 if any(r.status == "error" for r in results) else 0


def _configure_recipe(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="YAML recipe: sessions (path, probe, out, settings), settings, output_root, report")
    p.add_argument("--check", action="store_true", help="only validate the file and list the sessions")
    p.add_argument("--progress", action="store_true", help="show each sort's stage progress")


command("report", "write the HTML report of a saved sorting (DIR/report/index.html)", _configure_report)(_cmd_report)
from .export import _cli as _export_cli  # noqa: E402,F401  (registers export-nwb and export-analyzer)
command("recipe", "sort the sessions a YAML recipe lists, skipping complete ones; summary at the end",
        _configure_recipe)(_cmd_recipe)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered sub-command."""
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="spikearray", description="Spike sorting as lazy, labelled xarray stages.")
    parser.add_argument("--version", action="version", version=f"spikearray {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, configure, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        configure(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spikearray`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SpikearrayError as e:
        if args.debug:
            raise
        print(f"spikearray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
