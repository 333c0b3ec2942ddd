"""The chunk engine: how every per-chunk stage of spikearray is built into a dask graph and run.

A stage hands the engine a *kernel* and a *context*:

* a kernel is a module-level function ``kernel(block, info, context)`` on one time chunk plus its halo
  (``block`` is ``(n_left + core + n_right, C)``, ``info`` a :class:`ChunkInfo`). It declares the halo it needs
  next to itself, with the :func:`chunk_kernel` decorator (``halo=lambda context: 2 * context.nt``): the engine
  reads it, no call site picks one;
* a context is an immutable object (a frozen dataclass of numpy arrays and scalars) holding everything the
  kernel needs besides the samples: filters, templates, thresholds, the settings' ``device`` string. It enters
  the graph as **one** key, tokenized once, whatever the number of chunks; ``device="auto"`` is resolved inside
  the task (:func:`spikearray._compute.resolve_device`), so a worker with a GPU uses it even when the driver has
  none. Derived per-process values (tensors on the device, FFTs of filters) are memoised beside the context by
  :func:`memo`, never written into it.

:func:`map_chunks` builds one task per time chunk, each with a unique, cheap key ``(name-token, i)``;
:func:`compute_tasks` runs tasks on the current ``dask.distributed`` client (:func:`current_client`) or on
dask's threaded scheduler in bounded windows, and drives a tqdm progress bar on both when progress is on
(:func:`show_progress`, which :func:`spikearray.sort` sets). Lazy array stages (the preprocessing filters, the
drift correction) use :func:`map_time_overlap` and :func:`map_time_blocks`, with the same chunk rules.
"""

from __future__ import annotations

import contextvars
import sys
import threading
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence, TypeVar

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from dask.callbacks import Callback
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph
from tqdm.auto import tqdm

from ._compute import dask_thread_count, release_memory

__all__ = ["ChunkInfo", "chunk_kernel", "map_chunks", "run_chunks", "compute_tasks", "current_client",
           "show_progress", "progress_enabled", "memo", "as_dask", "merge_short_chunks", "map_time_overlap",
           "map_time_blocks", "register_samplewise"]

K = TypeVar("K", bound=Callable[..., Any])


class ChunkInfo(tuple):
    """``(start, stop, left)``: the chunk's core sample range and how many halo samples precede it."""

    __slots__ = ()

    def __new__(cls, start: int, stop: int, left: int):
        return super().__new__(cls, (int(start), int(stop), int(left)))

    def __getnewargs__(self) -> tuple:  # pickling (dask-distributed) calls __new__ with these
        return tuple(self)

    @property
    def start(self) -> int:
        return self[0]

    @property
    def stop(self) -> int:
        return self[1]

    @property
    def left(self) -> int:
        return self[2]


# ---------------------------------------------------------------------------------------------- progress, client
_PROGRESS: contextvars.ContextVar[bool] = contextvars.ContextVar("spikearray_progress", default=False)


@contextmanager
def show_progress(enabled: bool = True) -> Iterator[None]:
    """Within the block, :func:`compute_tasks` shows a tqdm bar per stage (on stderr) when ``enabled``.

    Examples
    --------
    >>> with show_progress(False):
    ...     progress_enabled()
    False
    """
    token = _PROGRESS.set(bool(enabled))
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def progress_enabled() -> bool:
    """Whether the caller asked for progress bars (:func:`show_progress`); off by default."""
    return _PROGRESS.get()


def current_client() -> Any:
    """The current ``dask.distributed`` client (``with client.as_current()`` or the default one), else None.

    None means dask's threaded scheduler. ``distributed`` is not imported for this: without it loaded there
    cannot be a client.
    """
    if "distributed" not in sys.modules:
        return None
    from distributed import Client

    try:
        return Client.current(allow_global=True)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------- kernels, context
def chunk_kernel(*, halo: Callable[[Any], int]) -> Callable[[K], K]:
    """Declare the halo a chunk kernel needs, as a function of its context (samples on each side).

    Examples
    --------
    >>> @chunk_kernel(halo=lambda ctx: 3 * ctx)
    ... def kernel(block, info, ctx):
    ...     return block.sum()
    >>> kernel.halo(10)
    30
    """
    def declare(fn: K) -> K:
        fn.halo = halo  # type: ignore[attr-defined]
        return fn

    return declare


_MEMO: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_MEMO_LOCK = threading.Lock()


def memo(context: Any, key: Any, make: Callable[[], Any]) -> Any:
    """``make()`` once per ``(context, key)`` in this process (e.g. the context's tensors on a device).

    The value lives beside the context (weakly keyed: it goes when the context does), so a task never
    writes into the context it shares with the other chunks. Thread-safe; ``context`` must be hashable by
    identity (a dataclass with ``eq=False``).
    """
    with _MEMO_LOCK:
        slot = _MEMO.setdefault(context, {})
        if key in slot:
            return slot[key]
        # one lock per key: a second thread asking for the same value waits for the first instead of making it
        # again (matching's filter spectrum, ~0.7 s, was made by both threads of the first two chunks)
        making = slot.setdefault(("_making", key), threading.Lock())
    with making:
        with _MEMO_LOCK:
            if key in slot:
                return slot[key]
        value = make()
        with _MEMO_LOCK:
            return slot.setdefault(key, value)


# ---------------------------------------------------------------------------------------------- chunks and halos
def as_dask(rec: xr.DataArray) -> da.Array:
    """The recording's samples as a dask array with all channels in one chunk (numpy data get 2 s chunks)."""
    data = rec.data
    if not isinstance(data, da.Array):
        rows = max(1, int(round(2.0 * float(rec.attrs["sampling_rate"]))))
        data = da.from_array(np.asarray(data), chunks=(rows, -1))
    if len(data.chunks[1]) > 1:
        data = data.rechunk({1: -1})
    return data


def merge_short_chunks(chunks: tuple[int, ...], halo: int) -> tuple[int, ...]:
    """Merge chunks of at most ``halo`` samples into their left neighbour (a halo must fit in every chunk)."""
    out: list[int] = []
    for c in chunks:
        if out and (c <= halo or out[-1] <= halo):
            out[-1] += c
        else:
            out.append(c)
    return tuple(out)


def _with_halo_chunks(data: da.Array, halo: int) -> da.Array:
    chunks = merge_short_chunks(tuple(data.chunks[0]), halo)
    return data.rechunk({0: chunks}) if chunks != data.chunks[0] else data


def map_time_overlap(fn: Callable[..., np.ndarray], data: da.Array, halo: int) -> da.Array:
    """``fn(block, start, pad_left, pad_right, at_start, at_end)`` on halo'd time blocks; float32 result.

    ``start`` is the absolute sample of ``block[0]``; ``pad_left``/``pad_right`` how many halo samples the block
    carries on each side (0 at the recording's ends, where ``at_start``/``at_end`` are true). ``fn`` returns the
    whole block (halo included) and dask trims it, so the output has exactly the input's chunks (after chunks
    of at most ``halo`` samples are merged into their neighbour).
    """
    data = _with_halo_chunks(data, halo)
    chunks = data.chunks[0]
    starts = np.concatenate([[0], np.cumsum(chunks)[:-1]]).astype(int)
    n_chunks = len(chunks)

    def block(x: np.ndarray, block_info=None) -> np.ndarray:
        i = block_info[0]["chunk-location"][0]
        pad_left = halo if (i > 0 and n_chunks > 1) else 0
        pad_right = halo if (i < n_chunks - 1) else 0
        return fn(x, int(starts[i]) - pad_left, pad_left, pad_right, i == 0, i == n_chunks - 1)

    if n_chunks == 1 or halo == 0:
        return data.map_blocks(lambda x, block_info=None: fn(
            x, int(starts[block_info[0]["chunk-location"][0]]), 0, 0,
            block_info[0]["chunk-location"][0] == 0, block_info[0]["chunk-location"][0] == n_chunks - 1),
            dtype=np.float32, meta=np.empty((0, 0), np.float32))
    return da.map_overlap(block, data, depth={0: halo, 1: 0}, boundary="none", trim=True, dtype=np.float32,
                          meta=np.empty((0, 0), np.float32))


def map_time_blocks(fn: Callable[[np.ndarray, int], np.ndarray], data: da.Array) -> da.Array:
    """``fn(block, start)`` on every time block (no halo); float32 result with the input's chunks."""
    starts = np.concatenate([[0], np.cumsum(data.chunks[0])[:-1]]).astype(int)

    def block(x: np.ndarray, block_info=None) -> np.ndarray:
        return fn(x, int(starts[block_info[0]["chunk-location"][0]]))

    return data.map_blocks(block, dtype=np.float32, meta=np.empty((0, 0), np.float32))


def _call(kernel: Callable[..., Any], block: np.ndarray, start: int, stop: int, left: int, context: Any) -> Any:
    # the graph carries plain ints: dask rebuilds tuples it walks, which would lose the ChunkInfo type
    return kernel(block, ChunkInfo(start, stop, left), context)


def _call_transformed(kernel: Callable[..., Any], transform: Callable[[np.ndarray, int], np.ndarray],
                      block: np.ndarray, start: int, stop: int, left: int, context: Any) -> Any:
    return kernel(transform(block, start - left), ChunkInfo(start, stop, left), context)


#: Arrays whose every block is ``transform(source block, first sample)`` for a transform that treats each sample
#: on its own (its output rows depend on that row and its absolute time only): name → (source, transform).
#: :func:`map_chunks` applies the transform to each halo'd block of the source, so a chunk's halo costs its
#: own samples, not its neighbours' whole chunks. Bounded: the oldest entries go first.
_SAMPLEWISE: OrderedDict[str, tuple[da.Array, Callable[[np.ndarray, int], np.ndarray]]] = OrderedDict()
_SAMPLEWISE_MAX = 32


def register_samplewise(result: da.Array, source: da.Array,
                        transform: Callable[[np.ndarray, int], np.ndarray]) -> None:
    """Declare that ``result``'s blocks are ``transform(block of source, absolute first sample)`` (same chunks),
    a transform under which each sample's output depends on that sample alone (the drift correction)."""
    if result.chunks != source.chunks:
        from .errors import SpikearrayError

        raise SpikearrayError(f"register_samplewise: the result's chunks {result.chunks} differ from its "
                              f"source's {source.chunks}; make the result with map_blocks over the source.")
    _SAMPLEWISE[result.name] = (source, transform)
    _SAMPLEWISE.move_to_end(result.name)
    while len(_SAMPLEWISE) > _SAMPLEWISE_MAX:
        _SAMPLEWISE.popitem(last=False)


def map_chunks(kernel: Callable[..., Any], data: da.Array, context: Any, *, name: str,
               select: Sequence[int] | None = None) -> list[Delayed]:
    """One task ``kernel(block, info, context)`` per time chunk of ``data``, halo from ``kernel.halo(context)``.

    Parameters
    ----------
    kernel : callable
        Module-level function declared with :func:`chunk_kernel`. It must keep only results whose time falls
        in the core ``[info.start, info.stop)`` so that results do not depend on the chunking beyond the halo.
    data : dask.array.Array, shape (n_samples, n_channels)
        Chunked along time only (see :func:`as_dask`).
    context : object
        Immutable, tokenizable (frozen dataclass of numpy arrays and scalars). It becomes one key of the graph,
        tokenized once; every chunk task refers to that key.
    name : str
        Prefix of the task keys (``(f"{name}-{token}", i)``) and of the progress bar.
    select : sequence of int, optional
        Only these chunks (indices into the chunks after short ones are merged), e.g. a sample of them.

    Returns
    -------
    list of dask.delayed.Delayed, one per (selected) chunk, in time order.

    Examples
    --------
    >>> import dask.array as da
    >>> @chunk_kernel(halo=lambda ctx: ctx)
    ... def n_rows(block, info, ctx):
    ...     return len(block), info
    >>> tasks = map_chunks(n_rows, da.zeros((100, 2), chunks=(40, 2)), 5, name="rows")
    >>> [t.key[0].startswith("rows-") for t in tasks]
    [True, True, True]
    >>> compute_tasks(tasks)[1]
    (50, (40, 80, 5))
    """
    halo = int(kernel.halo(context))
    named = data.name
    # a drift-corrected array: correct each halo'd block of its source in the task. Assembling halos from whole
    # corrected neighbours corrected 44 chunks for 30 in detection on 60 s of P384-static (9.4 s of 32 s CPU),
    # and three chunks for each chunk sampled by the bases and the waveform sums.
    source, transform = _SAMPLEWISE.get(named, (None, None)) if halo > 0 else (None, None)
    if source is not None:
        data = source
    data = _with_halo_chunks(data, halo)
    chunks = tuple(int(c) for c in data.chunks[0])
    multi = len(chunks) > 1
    ov = da.overlap.overlap(data, depth={0: halo, 1: 0}, boundary="none") if halo > 0 and multi else data
    # fused, culled input graph (as Array.to_delayed gives it): reading, scaling and correcting a chunk is one task
    blocks = ov.to_delayed().ravel()
    ctx_token = tokenize(context)
    ctx_key = f"context-{name}-{ctx_token}"
    kernel_name = f"{kernel.__module__}.{kernel.__qualname__}"
    layer_name = f"{name}-{tokenize(named, blocks[0].key, len(blocks), kernel_name, halo, ctx_token)}"
    layer: dict = {ctx_key: context}
    transform_key = f"transform-{layer_name}"
    if transform is not None:
        layer[transform_key] = transform
    starts = np.cumsum((0,) + chunks)
    chosen = range(len(blocks)) if select is None else sorted({int(i) for i in select})
    for i in chosen:
        left = halo if (multi and i > 0) else 0
        args = (blocks[i].key, int(starts[i]), int(starts[i + 1]), left, ctx_key)
        layer[(layer_name, i)] = ((_call, kernel) + args if transform is None else
                                  (_call_transformed, kernel, transform_key) + args)
    graph = HighLevelGraph.from_collections(layer_name, layer, dependencies=[blocks[0]])
    return [Delayed((layer_name, i), graph, layer=layer_name) for i in chosen]


class _TqdmCallback(Callback):
    """Advance ``bar`` once per finished task whose key is one of ``keys`` (threaded scheduler)."""

    def __init__(self, bar: tqdm, keys: set) -> None:
        super().__init__()
        self.bar = bar
        self.keys = keys

    def _posttask(self, key, result, dsk, state, id):  # noqa: A002 - dask's signature
        if key in self.keys:
            self.bar.update(1)


def compute_tasks(tasks: Sequence[Delayed], *, desc: str = "", window: int | None = None,
                  fold: Callable[[Any], Any] | None = None) -> list:
    """Compute delayed tasks on the current client or the threaded scheduler, with a progress bar.

    The bar (tqdm on stderr, one step per task) shows when :func:`show_progress` is on. On a
    ``dask.distributed`` client (:func:`current_client`) the whole graph is submitted at once (the scheduler
    bounds how many inputs are read ahead) and the bar follows the futures as they finish. On the threaded
    scheduler the tasks run in consecutive windows of ``window`` (default: 2 × the cores): handed all at
    once, dask starts reading every input chunk before the first kernel finishes, so peak memory would grow
    with the recording's length. Windows keep it bounded by a few chunks, at the price of reading the one
    chunk shared by two windows' halos twice.

    fold : callable, optional
        Applied to each result as it arrives, in the order of ``tasks`` (so deterministically), in the calling
        process; what it returns is kept instead. A reduction that folds a large part of every result into
        an accumulator keeps only one result's worth of it in memory, not one per chunk.

    Returns
    -------
    list
        The results (after ``fold``), in the order of ``tasks``.
    """
    tasks = list(tasks)
    if not tasks:
        return []
    keep = fold if fold is not None else (lambda r: r)
    progress = progress_enabled()
    client = current_client()
    if client is not None:
        futures = client.compute(tasks)
        if progress:
            from distributed import as_completed

            with tqdm(total=len(futures), desc=desc, unit="chunk") as bar:
                for _ in as_completed(futures):
                    bar.update(1)
        out = []
        for f in futures:  # one result at a time on this side, released on the cluster once folded
            out.append(keep(f.result()))
            f.release()
        return out
    window = window or 2 * dask_thread_count()
    out = []
    with tqdm(total=len(tasks), desc=desc, unit="chunk", disable=not progress) as bar:
        with _TqdmCallback(bar, {t.key for t in tasks}):
            for i in range(0, len(tasks), window):
                out.extend(keep(r) for r in dask.compute(*tasks[i:i + window], scheduler="threads"))
                release_memory()
    return out


def run_chunks(kernel: Callable[..., Any], data: da.Array, context: Any, *, name: str,
               select: Sequence[int] | None = None, fold: Callable[[Any], Any] | None = None) -> list:
    """:func:`map_chunks` then :func:`compute_tasks` (bar labelled ``name``, ``fold`` as there): the kernel's
    result per chunk."""
    return compute_tasks(map_chunks(kernel, data, context, name=name, select=select), desc=name, fold=fold)
