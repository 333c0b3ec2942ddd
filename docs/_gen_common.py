"""What the docs generators (``docs/_gen_*.py``) share: splicing a generated block between two marker lines, and
the ``python docs/_gen_X.py [--check]`` entry point."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable


def splice(text: str, begin: str, end: str, body: str, target: Path) -> str:
    """``text`` with everything from the ``begin`` marker line to the ``end`` one replaced by
    ``begin + "\\n" + body + end`` (``body`` ends with a newline).

    Raises
    ------
    SystemExit
        When the markers are missing, repeated or out of order, naming ``target`` and the markers.
    """
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise SystemExit(f"{target} must hold the two marker lines once each, in order:\n{begin}\n{end}")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    return head + begin + "\n" + body + end + tail


def main(target: Path, new_text: Callable[[str], str], argv: list[str], generator: str) -> int:
    """Rewrite ``target`` as ``new_text(old text)``; with ``--check`` in ``argv``, only return 1 (and say to run
    ``generator``) when that would change it."""
    text = target.read_text(encoding="utf-8") if target.exists() else ""
    new = new_text(text)
    if "--check" in argv:
        if new != text:
            print(f"{target} is stale; run: python {generator}", file=sys.stderr)
            return 1
        return 0
    target.write_text(new, encoding="utf-8")
    print(f"wrote {target}")
    return 0
