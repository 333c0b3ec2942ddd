#!/usr/bin/env python3
"""Generate the variable tables of ``docs/outputs.md`` from :data:`spikearray.outputs.OUTPUTS`.

Only the text between the two marker lines is rewritten; the rest of ``docs/outputs.md`` is edited by hand.

    python docs/_gen_outputs.py           # rewrite the generated section of docs/outputs.md
    python docs/_gen_outputs.py --check   # exit 1 when it is stale (tests/test_outputs_table.py does this)
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the shared generator helpers, beside this file
from _gen_common import main as gen_main, splice  # noqa: E402

TARGET = HERE / "outputs.md"
BEGIN = "<!-- BEGIN GENERATED: Sorting Dataset variables, by docs/_gen_outputs.py from spikearray.outputs.OUTPUTS -->"
END = "<!-- END GENERATED: Sorting Dataset variables -->"

_UNIT = {"uV": "µV", "um": "µm"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    """The generated section (between the marker lines)."""
    from spikearray.outputs import ATTRIBUTES, OUTPUTS, SECTIONS

    out = [""]
    for section, heading in SECTIONS.items():
        out += [f"### {heading}", "", "| name | dims | dtype | units | meaning |", "| --- | --- | --- | --- | --- |"]
        for v in OUTPUTS:
            if v.section == section:
                meaning = _cell(v.description) + (" (optional)" if v.optional else "")
                unit = _UNIT.get(v.unit, v.unit)
                out.append(f"| `{v.name}` | {', '.join(v.dims)} | {v.dtype} | {unit} | {meaning} |")
        out.append("")
    out += ["### Attributes (JSON types only)", "", "| name | type | meaning |", "| --- | --- | --- |"]
    out += [f"| `{k}` | {t} | {_cell(d)} |" for k, (t, d) in ATTRIBUTES.items()]
    out += ["", ""]
    return "\n".join(out)


def updated(text: str) -> str:
    """``text`` (the whole of docs/outputs.md) with its generated section replaced by :func:`render`."""
    return splice(text, BEGIN, END, render(), TARGET)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))  # the checkout's spikearray, not an installed one
    sys.exit(gen_main(TARGET, updated, sys.argv[1:], "docs/_gen_outputs.py"))
