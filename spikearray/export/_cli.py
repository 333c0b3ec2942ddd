"""The ``export-nwb`` and ``export-analyzer`` commands (registered on import by :mod:`spikearray.cli`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..cli import command

__all__: list[str] = []


def _sorting_of(args: argparse.Namespace) -> tuple[Any, Path]:
    """The Dataset to export: DIR/sorting.zarr, or the curated DIR/phy with --curated; and the base folder."""
    from .phy_read import read_phy
    from .zarr_store import open_sorting

    base = Path(args.dir)
    base = base.parent if base.suffix == ".zarr" else base
    if args.curated:
        phy = base if (base / "params.py").is_file() else base / "phy"
        return read_phy(phy, recording=args.recording or "auto"), base
    return open_sorting(args.dir), base


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="sorting output folder (holding sorting.zarr and phy/) or the sorting.zarr store")
    p.add_argument("--recording", help="the sorted recording (.ap.bin); default: the sorting's 'source' attr")
    p.add_argument("--curated", action="store_true",
                   help="export the Phy-curated sorting (read back from DIR/phy: merges, splits, labels)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def _configure_export_nwb(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument("--out", help="NWB file to write (default: DIR/sorting.nwb, DIR/sorting-curated.nwb with "
                                 "--curated)")
    p.add_argument("--subject-id", help="subject identifier (required, with --species, --sex, --age)")
    p.add_argument("--species", help="e.g. 'Mus musculus'")
    p.add_argument("--sex", choices=["M", "F", "U", "O"], help="M, F, U (unknown) or O (other)")
    p.add_argument("--age", help="ISO 8601 duration, e.g. P90D")
    p.add_argument("--date-of-birth", help="ISO 8601 date, instead of --age")
    p.add_argument("--session-start-time", help="ISO 8601 date-time (default: fileCreateTime of the .meta)")
    p.add_argument("--session-description", help="free text (default: names the sorted file)")
    p.add_argument("--location", default="unknown", help="brain area of the electrodes (Allen CCF, e.g. VISp)")
    p.add_argument("--experimenter", help="'Last, First'")
    p.add_argument("--lab")
    p.add_argument("--institution")
    p.add_argument("--raw", action="store_true", help="also copy the raw recording into the file (chunk by chunk)")


def _cmd_export_nwb(args: argparse.Namespace) -> int:
    import datetime as dt

    from .nwb import export_nwb

    sorting, base = _sorting_of(args)
    subject = None
    fields = {"subject_id": args.subject_id, "species": args.species, "sex": args.sex, "age": args.age}
    if any(v is not None for v in fields.values()) or args.date_of_birth:
        subject = {k: v for k, v in fields.items() if v is not None}
        if args.date_of_birth:
            d = dt.datetime.fromisoformat(args.date_of_birth)
            subject["date_of_birth"] = d if d.tzinfo else d.astimezone()
    out = Path(args.out) if args.out else base / ("sorting-curated.nwb" if args.curated else "sorting.nwb")
    path = export_nwb(sorting, out, recording=args.recording, subject=subject,
                      session_start_time=args.session_start_time, session_description=args.session_description,
                      location=args.location, experimenter=args.experimenter, lab=args.lab,
                      institution=args.institution, write_raw=args.raw, overwrite=args.overwrite)
    print(f"NWB file    {path}")
    print(f"units       {sorting.sizes['unit']}, spikes {sorting.sizes['spike']}"
          + (" (Phy-curated)" if args.curated else ""))
    print("check with  nwbinspector " + str(path))
    return 0


def _configure_export_analyzer(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument("--out", help="analyzer folder (default: DIR/analyzer, or DIR/analyzer.zarr with --format zarr)")
    p.add_argument("--format", choices=["binary_folder", "zarr"], default="binary_folder",
                   help="SpikeInterface's storage (default binary_folder)")
    p.add_argument("--raw", action="store_true", help="attach the raw µV recording instead of the filtered one")


def _cmd_export_analyzer(args: argparse.Namespace) -> int:
    from .analyzer import to_sorting_analyzer

    sorting, base = _sorting_of(args)
    out = Path(args.out) if args.out else base / ("analyzer-curated" if args.curated else "analyzer")
    analyzer = to_sorting_analyzer(sorting, args.recording, folder=out, format=args.format,
                                   preprocess=not args.raw, overwrite=args.overwrite)
    print(f"analyzer    {analyzer.folder}")
    print(f"extensions  {', '.join(analyzer.get_loaded_extension_names())}")
    print(f"open with   spikeinterface.load_sorting_analyzer({str(analyzer.folder)!r})")
    return 0


command("export-nwb", "write a saved (or Phy-curated) sorting as an NWB file for DANDI",
        _configure_export_nwb)(_cmd_export_nwb)
command("export-analyzer", "write a saved (or Phy-curated) sorting as a SpikeInterface SortingAnalyzer folder",
        _configure_export_analyzer)(_cmd_export_analyzer)
