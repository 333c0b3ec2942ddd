"""Where block compute runs: torch device choice and thread budgets shared by every stage."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

from .errors import SettingsError

__all__ = ["resolve_device", "torch_threads", "default_torch_threads", "release_memory"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn a settings ``device`` string into a torch device.

    ``"auto"`` picks ``cuda`` when torch sees a GPU, else ``cpu``; ``"cuda"`` without a GPU raises a clear error
    instead of torch's.
    """
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise SettingsError(
            f"device={device!r} but torch sees no CUDA GPU (torch {torch.__version__}); install a CUDA build of "
            "torch or use device='cpu'."
        )
    return torch.device(device)


def default_torch_threads(dask_threads: int | None = None) -> int:
    """Torch intra-op threads per dask worker thread so that the two together do not oversubscribe the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, dask_threads or cores))


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (no-op for ``None``)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def release_memory() -> None:
    """Give freed heap back to the operating system (glibc only; elsewhere nothing to do).

    Chunk kernels allocate and free tens of MB per task from several threads; glibc keeps the freed memory in
    its per-thread arenas, so without this the process's resident memory creeps up with every chunk and grows
    with the recording's length instead of staying at a few chunks' worth.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        pass
