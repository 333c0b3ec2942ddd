"""Write a folder under a temporary name and rename it into place only when it is complete.

A crash, an exception or a kill while writing leaves at most a ``<name>.partial-<pid>-<tag>`` folder, which no
reader accepts as a finished output. Replacing an existing output (``overwrite=True``) renames the old one away
first and deletes it only after the new one is in place.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .._format import format_bytes
from ..errors import DiskFullError, OutputError, OutputExistsError

__all__ = ["atomic_dir", "atomic_file", "PARTIAL_MARK", "partial_siblings", "free_bytes", "require_free_space", "disk_full_cause",
           "disk_full_error", "format_bytes"]

_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes free to this user on the filesystem that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return int(shutil.disk_usage(p).free)
    except OSError:
        return None


def disk_full_cause(exc: BaseException) -> OSError | None:
    """The ``ENOSPC``/``EDQUOT`` :class:`OSError` that caused ``exc`` (itself, or along its cause/context chain)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL:
            return e
        e = e.__cause__ or e.__context__
    return None


def disk_full_error(path: str | os.PathLike, needed: int | None, what: str, *, free: int | None = None,
                    kept: str = "", exact: bool = False) -> DiskFullError:
    """The :class:`DiskFullError` for ``what`` at ``path``: how much it needed, how much was free, what was kept.

    ``exact`` says ``needed`` is the exact size (else it is called an estimate: "needs about …").
    """
    free = free_bytes(path) if free is None else free
    approx = "" if needed is None or exact else " about"
    return DiskFullError(
        f"no space left on the device for {what} {str(path)!r}: it needs{approx} {format_bytes(needed)}, and "
        f"{format_bytes(free)} {'was' if free is not None else 'is'} free there. {kept}Free some space on that "
        "filesystem (or choose an output folder on another one) and run again.",
        path=str(path), needed=needed, free=free)


def require_free_space(path: str | os.PathLike, needed: int, what: str, *, exact: bool = False) -> None:
    """Raise :class:`DiskFullError` now if the filesystem holding ``path`` has less than ``needed`` bytes free.

    Parameters
    ----------
    path : path
        The file or folder about to be written (need not exist yet).
    needed : int
        Bytes the write will take.
    what : str
        Name of the output in the message (e.g. ``"the preprocessed int16 copy"``).
    exact : bool
        ``needed`` is exact rather than an estimate (changes only the wording).

    Raises
    ------
    DiskFullError
        Less than ``needed`` bytes are free; nothing has been written.

    Examples
    --------
    >>> require_free_space("/tmp/out", 2 * 30000 * 3600 * 384, "the preprocessed int16 copy")  # doctest: +SKIP
    """
    free = free_bytes(path)
    if free is not None and needed > free:
        raise disk_full_error(path, int(needed), what, free=free, kept="Nothing was written. ", exact=exact)

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
def atomic_file(final: str | os.PathLike, tmp: str | os.PathLike, *, what: str, needed: int | None = None,
                free: int | None = None, exact: bool = False) -> Iterator[Path]:
    """Yield ``tmp`` for the block to write; move it onto ``final`` when the block exits cleanly.

    On any failure ``tmp`` is deleted (a file of hours' size that no reader will use must not stay behind) and
    the exception propagates; a full disk (``ENOSPC``/``EDQUOT`` anywhere in its chain) is raised as
    :class:`DiskFullError` naming ``final``, ``needed`` (``exact``: the exact size) and ``free`` (the free
    space when the write began; measured now when not given).
    """
    final, tmp = Path(final), Path(tmp)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if disk_full_cause(e) is None:
            raise
        raise disk_full_error(final, needed, what, free=free, kept="The partial file was deleted. ",
                              exact=exact) from e


@contextmanager
def atomic_dir(final: str | os.PathLike, *, overwrite: bool = False, what: str = "output",
               needed: int | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``final``; rename it to ``final`` when the block exits cleanly.

    If the block fails because the disk is full (``ENOSPC``/``EDQUOT`` anywhere in the exception's chain), the
    temporary folder is deleted and :class:`DiskFullError` is raised instead, naming ``final``, ``needed`` and
    the free space when the write began; an earlier ``final`` is never touched by a failed write.

    Parameters
    ----------
    final : path
        Where the finished folder must end up.
    overwrite : bool
        Replace an existing ``final``. Without it an existing ``final`` raises :class:`OutputExistsError` before
        anything is written.
    what : str
        Name of the output in error messages (e.g. ``"sorting store"``).
    needed : int, optional
        Bytes the folder will take (an estimate), for the disk-full message.

    Raises
    ------
    OutputExistsError
        ``final`` exists and ``overwrite`` is False (checked before and again just before the rename).
    DiskFullError
        The filesystem filled up while writing; the partial folder was deleted.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise OutputExistsError(
            f"{what} {str(final)!r} already exists; pass overwrite=True (--overwrite) to replace it, or choose "
            "another output folder."
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    free_at_start = free_bytes(final.parent)
    tmp = final.with_name(f"{final.name}{PARTIAL_MARK}{os.getpid()}-{secrets.token_hex(3)}")
    try:
        tmp.mkdir()
    except OSError as e:
        if disk_full_cause(e) is None:
            raise
        raise disk_full_error(final, needed, what, free=free_at_start) from e
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, DiskFullError) or disk_full_cause(e) is None:
            raise
        kept = (f"The partial files were deleted; the earlier {what} there is untouched. " if final.exists()
                else "The partial files were deleted. ")
        raise disk_full_error(final, needed, what, free=free_at_start, kept=kept) from e
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
