"""The report's static HTML page: sections of figures (relative ``<img src>``), a run summary and the units table."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

__all__ = ["Figure", "Section", "render_page", "units_table"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, .note { color: #555; font-size: .9em; max-width: 70em; }
.note { background: #fff8e0; border-left: 3px solid #e0b000; padding: .4em .8em; }
table { border-collapse: collapse; font-size: .85em; }
th, td { padding: .2em .6em; text-align: right; border-bottom: 1px solid #eee; }
th { background: #f4f4f4; position: sticky; top: 0; }
td.label-good { color: #1b9e77; font-weight: 600; } td.label-mua { color: #d95f02; }
dl.summary { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; font-size: .9em; }
dl.summary dt { font-weight: 600; } dl.summary dd { margin: 0; }
nav a { margin-right: 1em; }
"""

# Counts the images that really decoded once the page has loaded; a headless browser test reads it back.
_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
});
"""


@dataclass
class Figure:
    """One image of the page: file name (relative to the page), alt text and caption."""

    src: str
    alt: str
    caption: str = ""


@dataclass
class Section:
    """A titled part of the page: an id for the navigation, figures, notes (plain text) and raw HTML blocks."""

    id: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    html_blocks: list[str] = field(default_factory=list)


def _fmt(v, digits: int) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return html.escape(str(v))
    return "nan" if not np.isfinite(f) else f"{f:.{digits}f}"


def units_table(sorting: xr.Dataset) -> str:
    """HTML table of the units: id, label, depth, best channel, amplitude µV, firing rate, contamination, spikes."""
    cols = [("unit", "id", 0), ("label", "label", None), ("depth", "depth (µm)", 0),
            ("best_channel", "best channel", 0), ("amplitude", "amplitude (µV)", 1),
            ("firing_rate", "firing rate (Hz)", 2), ("contamination", "contamination", 3),
            ("n_spikes", "n_spikes", 0)]
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t, _ in cols)
    rows = []
    K = sorting.sizes.get("unit", 0)
    values = {name: (np.asarray(sorting[name].values) if name in sorting.variables else np.full(K, ""))
              for name, _, _ in cols}
    for i in range(K):
        cells = []
        for name, _, digits in cols:
            v = values[name][i]
            if name == "label":
                cells.append(f'<td class="label-{html.escape(str(v))}">{html.escape(str(v))}</td>')
            else:
                cells.append(f"<td>{_fmt(v, digits)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table id="units"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def render_page(title: str, summary: dict[str, str], sections: list[Section]) -> str:
    """The whole page as a string (UTF-8, no external resources)."""
    nav = " ".join(f'<a href="#{html.escape(s.id)}">{html.escape(s.title)}</a>' for s in sections)
    dl = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in summary.items())
    parts = []
    for s in sections:
        body = [f'<h2 id="{html.escape(s.id)}">{html.escape(s.title)}</h2>']
        body += [f'<p class="note">{html.escape(n)}</p>' for n in s.notes]
        for f in s.figures:
            cap = f"<figcaption>{html.escape(f.caption)}</figcaption>" if f.caption else ""
            body.append(f'<figure><img src="{html.escape(f.src)}" alt="{html.escape(f.alt)}">{cap}</figure>')
        body += s.html_blocks
        parts.append(f'<section>{"".join(body)}</section>')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style><script>{_SCRIPT}</script></head>\n"
        f"<body><h1>{html.escape(title)}</h1><nav>{nav}</nav><dl class=\"summary\">{dl}</dl>\n"
        + "\n".join(parts) + "\n</body></html>\n"
    )


def json_compact(text: str) -> str:
    """A JSON attr (e.g. timings) as ``k: v, …`` for the summary."""
    try:
        d = json.loads(text)
    except (TypeError, ValueError):
        return str(text)
    if not isinstance(d, dict):
        return str(d)
    return ", ".join(f"{k} {v:.1f} s" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in d.items())
