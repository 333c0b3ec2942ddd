"""Write a folder under a temporary name and rename it into place only when it is complete.

A crash, an exception or a kill while writing leaves at most a ``<name>.partial-<pid>-<tag>`` folder, which no
reader accepts as a finished output. Replacing an existing output (``overwrite=True``) renames the old one away
first and deletes it only after the new one is in place.
"""

from __future__ import annotations

import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import OutputError, OutputExistsError

__all__ = ["atomic_dir", "PARTIAL_MARK", "partial_siblings"]

PARTIAL_MARK = ".partial-"
_OLD_MARK = ".old-"


def partial_siblings(final: Path) -> list[Path]:
    """Unfinished (``.partial-``) or displaced (``.old-``) versions of ``final`` left by crashed writers."""
    final = Path(final)
    if not final.parent.exists():
        return []
    return sorted(p for p in final.parent.iterdir()
                  if p.name.startswith(final.name + PARTIAL_MARK) or p.name.startswith(final.name + _OLD_MARK))


@contextmanager
def atomic_dir(final: str | os.PathLike, *, overwrite: bool = False, what: str = "output") -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``final``; rename it to ``final`` when the block exits cleanly.

    Parameters
    ----------
    final : path
        Where the finished folder must end up.
    overwrite : bool
        Replace an existing ``final``. Without it an existing ``final`` raises :class:`OutputExistsError` before
        anything is written.
    what : str
        Name of the output in error messages (e.g. ``"sorting store"``).

    Raises
    ------
    OutputExistsError
        ``final`` exists and ``overwrite`` is False (checked before and again just before the rename).
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise OutputExistsError(
            f"{what} {str(final)!r} already exists; pass overwrite=True (--overwrite) to replace it, or choose "
            "another output folder."
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}{PARTIAL_MARK}{os.getpid()}-{secrets.token_hex(3)}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        if final.exists():
            if not overwrite:  # someone else finished first
                raise OutputExistsError(f"{what} {str(final)!r} appeared while writing; it was kept untouched.")
            old = final.with_name(f"{final.name}{_OLD_MARK}{os.getpid()}-{secrets.token_hex(3)}")
            os.replace(final, old)
        os.replace(tmp, final)
    except OSError as e:
        if old is not None and not final.exists():
            os.replace(old, final)  # put the previous output back
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"could not move the finished {what} into place at {str(final)!r}: {e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
