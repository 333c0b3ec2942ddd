"""One run per output folder: a lock file ``OUT/.spikearray.lock`` naming the holder's pid and host.

Two ``spikearray sort ... --out OUT`` started at once would share ``OUT/.stages``: the second would delete the
first one's half-written stage stores as "left by a killed run" and the two would overwrite each other's
caches. The lock makes the second refuse at once. The file is created with ``O_CREAT | O_EXCL`` (atomic on
local filesystems and on NFSv3+), holds JSON (``pid``, ``host``, ``started``, ``command``, ``token``) and is
removed when the holder exits the ``with`` block, also on exceptions. A holder killed with SIGKILL (or a
machine that lost power) cannot remove it: a lock whose pid no longer runs on this host is stale and is taken
over. A lock from another host cannot be checked from here and is never taken over silently.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from .errors import OutputError, OutputLockedError

__all__ = ["LOCK_NAME", "output_lock", "holds_output_lock", "read_lock", "pid_alive", "live_holder"]

T = TypeVar("T")

LOCK_NAME = ".spikearray.lock"
# locks this process holds: lock path -> [thread that took it, nesting depth]. The same thread may take a lock
# again (``with output_lock(out): sort(output=out)``); another thread of this process may not.
_HELD: dict[str, int] = {}  # lock path -> the thread holding it in this process
_HELD_GUARD = threading.Lock()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:  # pragma: no cover - e.g. Windows without the process
        return False
    try:  # a zombie (exited, not yet reaped) no longer writes anything
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def read_lock(path: str | os.PathLike) -> dict | None:
    """The holder named in a lock file (``pid``, ``host``, ``started``, ``command``), or None if it is unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_stale(holder: dict, host: str) -> bool:
    """A lock written on this host by a process that is gone."""
    pid = holder.get("pid")
    return holder.get("host") == host and isinstance(pid, int) and not pid_alive(pid)


def live_holder(output: str | os.PathLike) -> dict | None:
    """The record of the run holding ``output``'s lock, or None if the folder is free (or its lock is stale).

    A lock from another host counts as held (it cannot be checked from here).
    """
    holder = read_lock(Path(output) / LOCK_NAME)
    if holder is None:
        return None
    return None if _is_stale(holder, socket.gethostname()) else holder


def _describe(holder: dict | None) -> str:
    if not holder:
        return "an unreadable lock"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid')} on host {holder.get('host')!r} (started {when}: {holder.get('command', '')})"


def _try_create(path: Path, record: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return True


def _acquire(out: Path, what: str) -> tuple[Path, str]:
    lock = out / LOCK_NAME
    host = socket.gethostname()
    token = secrets.token_hex(8)
    record = {"pid": os.getpid(), "host": host, "started": time.time(), "command": " ".join(sys.argv)[:300],
              "token": token}
    for _ in range(5):
        try:
            if _try_create(lock, record):
                return lock, token
        except OSError as e:
            raise OutputError(f"could not create the lock file {str(lock)!r} ({e.strerror}); check that the output "
                              "folder is writable.") from e
        holder = read_lock(lock)
        if holder is None:
            # being written right now (created, not yet filled) or garbage: look again before judging
            time.sleep(0.2)
            holder = read_lock(lock)
            if holder is None and lock.exists():
                raise OutputLockedError(
                    f"{what} {str(out)!r} has a lock file {str(lock)!r} that cannot be read; another run may be "
                    "starting there. If no spikearray run uses this folder, delete that file and run again."
                )
            continue
        if _is_stale(holder, host):
            # stale: its holder died without releasing it. Move it aside atomically (only one contender wins).
            aside = lock.with_name(f"{LOCK_NAME}.stale-{os.getpid()}-{token}")
            try:
                os.replace(lock, aside)
            except FileNotFoundError:  # another contender moved it first
                continue
            if read_lock(aside) != holder:  # a new holder's lock slipped in between: give it back
                try:
                    os.link(aside, lock)
                except FileExistsError:
                    pass
            aside.unlink(missing_ok=True)
            continue
        same_host = holder.get("host") == host
        if same_host and holder.get("pid") == os.getpid():
            hint = "it is another thread of this process; run the two one after the other"
        elif same_host:
            hint = "wait for it to finish, or stop it"
        else:
            hint = "it runs on another machine; if you are sure no run uses this folder any more, delete the lock file"
        raise OutputLockedError(
            f"{what} {str(out)!r} is in use by another spikearray run: {_describe(holder)}. Two runs in one "
            f"output folder would overwrite each other's stage caches; {hint}, or choose another output folder. "
            f"(Lock file: {str(lock)!r}.)"
        )
    raise OutputLockedError(f"could not take the lock {str(lock)!r} of {what} {str(out)!r}: it keeps changing; "
                            "another run is starting there.")


@contextmanager
def output_lock(output: str | os.PathLike | None, *, what: str = "output folder") -> Iterator[Path | None]:
    """Hold the lock of an output folder for the duration of the ``with`` block.

    Parameters
    ----------
    output : path or None
        The output folder (created if missing). ``None``: nothing to lock, the block just runs.
    what : str
        Name of the folder in messages.

    Yields
    ------
    Path or None
        The lock file.

    Raises
    ------
    OutputLockedError
        A live process (on this host, or any process on another host) holds the lock.

    Examples
    --------
    >>> with output_lock("out"):  # doctest: +SKIP
    ...     sort(rec, output="out")
    """
    if output is None:
        yield None
        return
    out = Path(output)
    key = str((out / LOCK_NAME).absolute())
    with _HELD_GUARD:
        nested = _HELD.get(key) == threading.get_ident()
    if nested:  # this thread holds it already: keep holding, the outermost exit releases it
        yield out / LOCK_NAME
        return
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from .export._atomic import disk_full_cause, disk_full_error

        if disk_full_cause(e) is not None:
            raise disk_full_error(out, None, what) from e
        raise
    lock, token = _acquire(out, what)
    with _HELD_GUARD:
        _HELD[key] = threading.get_ident()
    try:
        yield lock
    finally:
        with _HELD_GUARD:
            _HELD.pop(key, None)
        holder = read_lock(lock)
        if holder is not None and holder.get("token") == token:
            lock.unlink(missing_ok=True)
        if created:
            try:
                out.rmdir()  # only if the run left nothing there (e.g. it failed before writing)
            except OSError:
                pass


def holds_output_lock(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a function with an ``output=`` keyword so that it runs holding that folder's lock.

    The lock is taken before the function's first line (so before it looks at, cleans or writes anything in
    the folder) and released when it returns or raises. Used by :func:`spikearray.sort`.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        with output_lock(kwargs.get("output")):
            return fn(*args, **kwargs)

    return wrapper
