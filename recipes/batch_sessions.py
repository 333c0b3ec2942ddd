#!/usr/bin/env python3
"""Sort every SpikeGLX recording under a folder, each into its own output folder.

    python recipes/batch_sessions.py /data/mouse1 --out /data/sorted [--settings '{"nblocks": 5}'] [--report]

- finds ``**/*.ap.bin`` under ROOT (each with its ``.meta``), sorted by path;
- ``ROOT/a/b/run_g0_t0.imec0.ap.bin`` is sorted into ``OUT/a/b/run_g0_t0.imec0/`` (sorting.zarr, phy/, report/);
- a session whose folder already holds ``sorting.zarr`` is complete and skipped, so rerunning after a crash or
  after adding recordings only sorts what is missing;
- a session that fails (corrupt file, bad probe, ...) is recorded and the batch goes on;
- at the end prints a table (session, status, units, good, spikes, seconds, error) and writes
  ``OUT/summary.tsv``. The exit status is 1 when any session failed, 0 otherwise.

The same engine reads a YAML list of sessions with per-session probes and settings: ``spikearray recipe FILE``
(see recipes/sessions.yaml).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from spikearray.errors import SpikearrayError
from spikearray.recipes import find_sessions, format_results, run_sessions, settings_from_json, write_summary


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="folder searched recursively for *.ap.bin")
    p.add_argument("--out", required=True, help="output root: one folder per session, plus summary.tsv")
    p.add_argument("--settings", help="JSON object of settings for every session, e.g. '{\"nblocks\": 5}'")
    p.add_argument("--report", action="store_true", help="also write each session's HTML report")
    p.add_argument("--progress", action="store_true", help="show each sort's stage progress")
    args = p.parse_args(argv)
    try:
        sessions = find_sessions(args.root, args.out, settings=settings_from_json(args.settings))
    except SpikearrayError as e:
        print(f"batch_sessions: error: {e}", file=sys.stderr)
        return 2
    if not sessions:
        print(f"no *.ap.bin under {args.root}", file=sys.stderr)
        return 2
    results = run_sessions(sessions, report=args.report, progress=args.progress)
    print()
    print(format_results(results))
    print(f"summary written to {write_summary(results, f'{args.out}/summary.tsv')}")
    return 1 if any(r.status == "error" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
