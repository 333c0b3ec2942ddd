"""Human-readable quantities, one way for the whole package (messages, summaries)."""

from __future__ import annotations

__all__ = ["format_bytes"]


def format_bytes(n: float | None) -> str:
    """A byte count in binary units, as ``df -h`` prints them.

    Examples
    --------
    >>> format_bytes(1536), format_bytes(805306368), format_bytes(None)
    ('1.5 KiB', '768.0 MiB', 'an unknown amount')
    """
    if n is None:
        return "an unknown amount"
    v = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{int(v)} bytes" if unit == "bytes" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} TiB"  # pragma: no cover
