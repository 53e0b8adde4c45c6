"""The NumPy engine: rows cut into cache-sized blocks, spread over a small, reused thread pool.

A NumPy fast path is its per-block terms; this module does the rest. Inputs of one shape
``(..., C)`` are seen as 2-D ``(rows, C)`` views (:func:`run`; the leading axis is looped
over where the batch axes cannot be merged without a copy), the rows are shared between the
calling thread and the pool's workers, and each thread works on blocks of rows in a few
scratch buffers of its own. NumPy releases the GIL inside ufunc loops, so the blocks of one
call run in parallel. Three block loops are offered:

- :func:`row_sums` -- the row sums of an element-wise ``terms`` function, written into
  per-row outputs. Every row is summed by ``np.add.reduce`` over a contiguous buffer of the
  row's full length (NumPy's pairwise summation); a row longer than the scratch budget is
  split along NumPy's own pairwise tree (:func:`_pairwise_split`), so the sum is the same to
  the last bit as NumPy's on the whole row, in bounded memory.
- :func:`map_blocks` -- an element-wise map (a backward pass): blocks of at most
  :data:`BLOCK_BYTES` per operand, rows longer than that cut into column chunks.
- :func:`row_blocks` -- a row-wise function (one that needs a whole row, e.g. a softmax) over
  blocks of whole rows, serial or threaded.

The parallel machinery is built to survive what a library cannot control:

- **Caller runs.** A call cuts its rows into chunks that the calling thread and the pool's
  workers claim one at a time; the calling thread keeps claiming until none is left, then
  waits only for chunks a worker has already started. A call therefore never waits on a
  worker that does not exist or never wakes: the pool is an accelerator, not a dependency.
- **Fork.** ``os.register_at_fork`` drops the inherited pool, lock and thread-local scratch
  in the child, which makes its own pool on its next threaded call (``multiprocessing`` with
  the fork start method, torch ``DataLoader`` workers).
- **Interpreter shutdown.** When no worker thread can be started (in an ``atexit`` handler,
  during finalization) the call runs serially in the calling thread. The workers are daemon
  threads that only ever wait for work, so they never delay the exit.
- **Re-entry.** Scratch buffers are taken out of their per-thread slot while a frame uses
  them; a re-entrant call in the same thread (a signal handler, a ``__del__``) finds the slot
  empty and allocates its own, and never waits for a lock an outer frame holds.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["BLOCK_BYTES", "MAX_THREADS", "MIN_PARALLEL", "map_blocks", "row_blocks",
           "row_sums", "run"]

BLOCK_BYTES = 1024 * 1024
"""Bytes of one scratch buffer (a few per worker): a block of rows fits in L2 cache."""
MAX_THREADS = 8
"""Upper bound on worker threads (the pool has ``min(usable CPUs, MAX_THREADS)``)."""
MIN_PARALLEL = 1 << 17
"""Inputs with fewer elements than this run in the calling thread."""
CHUNKS_PER_THREAD = 4
"""Row ranges per worker thread (dynamic load balancing)."""
_PW_UNROLL = 8  # NumPy's pairwise summation splits at multiples of its unroll factor

Work = Callable[[list[Any], list[Any], int, int], None]
"""``work(full, rows, r0, r1)``: rows ``r0:r1`` of the 2-D ``full`` and 1-D ``rows`` arrays."""
Terms = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""``terms(t_src, p_src, tb, pb)``: the element-wise terms of one block, computed in the
scratch buffers ``tb``/``pb`` (same shape as the sources); returns the buffer holding them."""
BlockMap = Callable[[list[Any], list[Any], list[np.ndarray]], None]
"""``fn(full_blocks, row_columns, scratch)``: one block of an element-wise map; the full
arrays' blocks (``None`` stays ``None``), the per-row arrays as ``(rows, 1)`` columns, and
scratch buffers of the block's shape."""


class _Job:
    """One threaded call: ``chunks`` row ranges claimed one by one by whichever thread asks."""

    __slots__ = ("args", "bounds", "done", "error", "lock", "next", "pending")

    def __init__(self, work: Work, full: list[Any], rows: list[Any], bounds: list[int]) -> None:
        self.args: tuple[Work, list[Any], list[Any]] | None = (work, full, rows)
        self.bounds = bounds
        self.next = 0
        self.pending = len(bounds) - 1
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.done = threading.Event()

    def _claim(self) -> tuple[Work, list[Any], list[Any], int, int] | None:
        with self.lock:
            i, args = self.next, self.args
            if args is None or i >= len(self.bounds) - 1:
                return None
            self.next = i + 1
        return (*args, self.bounds[i], self.bounds[i + 1])

    def _finish(self, error: BaseException | None) -> None:
        with self.lock:
            if error is not None and self.error is None:
                self.error = error
            self.pending -= 1
            if self.pending == 0:
                self.args = None  # the arrays are not kept alive by a job left in the queue
                self.done.set()

    def work_on(self) -> None:
        """Run chunks until none is left to claim (pool workers)."""
        while (claimed := self._claim()) is not None:
            work, full, rows, r0, r1 = claimed
            try:
                work(full, rows, r0, r1)
            except BaseException as exc:  # reported to the caller by ``run``
                self._finish(exc)
            else:
                self._finish(None)

    def run(self) -> None:
        """The calling thread: run chunks too, then wait for those the workers started."""
        try:
            while (claimed := self._claim()) is not None:
                work, full, rows, r0, r1 = claimed
                work(full, rows, r0, r1)
                self._finish(None)
        except BaseException:
            with self.lock:  # e.g. KeyboardInterrupt: stop handing out chunks
                self.next = len(self.bounds)
                self.args = None
            raise
        self.done.wait()
        if self.error is not None:
            raise self.error


class _Pool:
    """Daemon worker threads that take :class:`_Job` objects from a queue."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []

    def grow(self, n_workers: int) -> None:
        """Start workers up to ``n_workers``; raises ``RuntimeError`` when no thread can be
        started (interpreter shutdown), keeping those already started."""
        while len(self.threads) < n_workers:
            th = threading.Thread(target=self._worker, name=f"kldiv-numpy-{len(self.threads)}",
                                  daemon=True)
            th.start()
            self.threads.append(th)

    def _worker(self) -> None:
        while True:
            self.jobs.get().work_on()

    def submit(self, job: _Job, n: int) -> None:
        """Offer ``job`` to at most ``n`` workers."""
        for _ in range(min(n, len(self.threads))):
            self.jobs.put(job)


_pool: _Pool | None = None
_pool_lock = threading.Lock()
_local = threading.local()


def _after_fork_in_child() -> None:
    """A forked child inherits the pool object but none of its threads: start afresh."""
    global _pool, _pool_lock, _local
    _pool = None
    _pool_lock = threading.Lock()
    _local = threading.local()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _n_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS / Windows
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_THREADS))


def _get_pool(n_workers: int) -> _Pool | None:
    """The worker pool with (where it can) ``n_workers`` workers, or ``None``.

    Never blocks: when the pool is being made or grown by another thread, or by an outer
    frame of this one (a signal handler's call), the pool as it is (or none) is returned and
    the calling thread does the rest of the work itself. When no thread can be started
    (interpreter shutdown) the pool keeps the workers it has, possibly none.
    """
    global _pool
    pool = _pool
    if pool is not None and len(pool.threads) >= n_workers:
        return pool
    lock = _pool_lock
    if not lock.acquire(blocking=False):
        return pool
    try:
        if _pool is None:
            _pool = _Pool()
        # RuntimeError: "can't start new thread" / "... at interpreter shutdown"
        with contextlib.suppress(RuntimeError):
            _pool.grow(n_workers)
        return _pool
    finally:
        lock.release()


def _take_scratch(dtype: np.dtype[Any], n: int, k: int, mask: bool) -> list[np.ndarray]:
    """``k`` scratch buffers of ``n`` elements of ``dtype`` (and a boolean one if ``mask``).

    Taken out of this thread's slot (or freshly allocated if the slot is empty because an
    outer frame of this thread holds them, or holds others); give them back with
    :func:`_give_scratch`. Taking and giving back are single atomic steps, so a signal handler
    that interrupts a call never gets buffers that the interrupted frame is using.
    """
    key = (dtype.str, n, k, mask)
    slot: list[tuple[Any, list[np.ndarray]]] | None = getattr(_local, "slot", None)
    if slot is None:
        slot = _local.slot = []
    try:
        cached_key, bufs = slot.pop()
    except IndexError:
        pass
    else:
        if cached_key == key:
            return bufs
    bufs = [np.empty(n, dtype) for _ in range(k)]
    if mask:
        bufs.append(np.empty(n, dtype=bool))
    return bufs


def _give_scratch(dtype: np.dtype[Any], n: int, k: int, mask: bool,
                  bufs: list[np.ndarray]) -> None:
    """Put ``bufs`` back into this thread's slot (one set is kept, as a cache)."""
    slot = getattr(_local, "slot", None)
    if slot is not None and not slot:
        slot.append(((dtype.str, n, k, mask), bufs))


def _rows_view(x: np.ndarray, cols: int) -> np.ndarray | None:
    """``x`` as a 2-D ``(rows, cols)`` view without copying, or ``None`` if that needs a copy."""
    if x.ndim == 2:
        return x
    try:
        return np.reshape(x, (-1, cols), copy=False)  # NumPy >= 2.1
    except TypeError:  # pragma: no cover - older NumPy: no ``copy`` argument
        v = x.view()
        try:
            v.shape = (-1, cols)
        except AttributeError:
            return None
        return v
    except ValueError:
        return None


def _run_2d(work: Work, full: list[Any], rows: list[Any], threaded: bool) -> None:
    nrows, cols = next(x for x in full if x is not None).shape
    threads = _n_threads() if threaded and nrows * cols >= MIN_PARALLEL else 1
    threads = min(threads, nrows)
    if threads <= 1:
        work(full, rows, 0, nrows)
        return
    # a few chunks per thread: a thread that the OS preempts (a busy machine) leaves its
    # remaining chunks to the others instead of holding up the whole call
    chunks = min(nrows, threads * CHUNKS_PER_THREAD)
    bounds = [nrows * i // chunks for i in range(chunks + 1)]
    job = _Job(work, full, rows, bounds)
    pool = _get_pool(threads - 1)  # the calling thread is the last of ``threads``
    if pool is not None:
        pool.submit(job, threads - 1)
    job.run()


def run(work: Work, full: list[Any], rows: list[Any], *, threaded: bool = True) -> None:
    """Apply ``work`` to ``full`` (arrays of one shape ``(..., C)``, or ``None``) and ``rows``
    (arrays of shape ``(...)``), as 2-D/1-D views; loops over the leading axis where the batch
    axes cannot be merged without a copy (e.g. ``(A, 1, C)`` broadcast against ``(A, B, C)``).

    With ``threaded`` (and at least :data:`MIN_PARALLEL` elements) the rows are shared between
    the calling thread and the pool's workers; otherwise the calling thread does them all.
    """
    shape = next(x for x in full if x is not None).shape
    cols = shape[-1]
    full2 = [None if x is None else _rows_view(x, cols) for x in full]
    rows1 = [None if x is None else _rows_view(x[..., None], 1) for x in rows]
    if all((v is None) == (x is None) for v, x in zip(full2 + rows1, full + rows, strict=True)):
        _run_2d(work, full2, [None if v is None else v[:, 0] for v in rows1], threaded)
        return
    for i in range(shape[0]):
        run(work, [None if x is None else x[i] for x in full],
            [None if x is None else x[i] for x in rows], threaded=threaded)


# ------------------------------------------------------------------------ row sums (forward)
def _block_rows(terms: Terms, t2: np.ndarray, p2: np.ndarray, out1: np.ndarray,
                r0: int, r1: int) -> None:
    """Rows ``r0:r1`` of 2-D ``t2``/``p2`` (rows fit in the scratch) into ``out1[r0:r1]``."""
    cols = t2.shape[1]
    elems = max(BLOCK_BYTES // t2.dtype.itemsize, cols)
    step = max(1, elems // cols)
    st, sp = bufs = _take_scratch(t2.dtype, step * cols, 2, False)
    for a in range(r0, r1, step):
        b = min(a + step, r1)
        n = (b - a) * cols
        tb = st[:n].reshape(b - a, cols)
        pb = sp[:n].reshape(b - a, cols)
        np.add.reduce(terms(t2[a:b], p2[a:b], tb, pb), axis=-1, out=out1[a:b])
    _give_scratch(t2.dtype, step * cols, 2, False, bufs)


def _pairwise_split(terms: Terms, t1: np.ndarray, p1: np.ndarray, lo: int, n: int,
                    leaf: int) -> Any:
    """Sum of the terms of the 1-D slice ``lo:lo+n``, on NumPy's own pairwise tree.

    NumPy's pairwise sum of ``n > 128`` elements is ``sum(a[:n2]) + sum(a[n2:])`` with
    ``n2 = n // 2`` rounded down to a multiple of 8, recursively. Splitting at the same
    points, and summing each leaf of at most ``leaf`` elements with ``np.add.reduce``, gives
    the same result to the last bit while only a leaf is ever held in memory.
    """
    if n <= leaf:
        st, sp = bufs = _take_scratch(t1.dtype, leaf, 2, False)
        total = np.add.reduce(terms(t1[lo:lo + n], p1[lo:lo + n], st[:n], sp[:n]))
        _give_scratch(t1.dtype, leaf, 2, False, bufs)
        return total
    n2 = n // 2
    n2 -= n2 % _PW_UNROLL
    return (_pairwise_split(terms, t1, p1, lo, n2, leaf)
            + _pairwise_split(terms, t1, p1, lo + n2, n - n2, leaf))


def _long_rows(terms: Terms, t2: np.ndarray, p2: np.ndarray, out1: np.ndarray,
               r0: int, r1: int) -> None:
    """Rows too long for the scratch budget: each row split along the pairwise tree."""
    leaf = max(BLOCK_BYTES // t2.dtype.itemsize, 256)
    cols = t2.shape[1]
    for r in range(r0, r1):
        out1[r] = _pairwise_split(terms, t2[r], p2[r], 0, cols, leaf)


def _sum_rows(terms: Terms, full: list[np.ndarray], rows: list[np.ndarray | None],
              r0: int, r1: int) -> None:
    t2, p2 = full
    out1 = rows[0]
    assert out1 is not None
    if t2.shape[1] * t2.dtype.itemsize > BLOCK_BYTES:
        _long_rows(terms, t2, p2, out1, r0, r1)
    else:
        _block_rows(terms, t2, p2, out1, r0, r1)


def row_sums(terms: Terms, t: np.ndarray, p: np.ndarray) -> np.ndarray:
    """``sum(terms(t, p), axis=-1)`` of ``t``/``p`` (one shape, one float dtype, any strides),
    blocked and threaded: each row summed as ``np.add.reduce`` sums a contiguous row.

    Extra memory: two scratch buffers of :data:`BLOCK_BYTES` per thread working on the call.
    """
    out = np.empty(t.shape[:-1], dtype=t.dtype)
    run(functools.partial(_sum_rows, terms), [t, p], [out])
    return out


# ------------------------------------------------------------- element-wise map (backward)
def _map_rows(fn: BlockMap, n_scratch: int, mask: bool, full: list[np.ndarray | None],
              rows: list[np.ndarray | None], r0: int, r1: int) -> None:
    first = next(x for x in full if x is not None)
    cols, dtype = first.shape[1], first.dtype
    elems = max(BLOCK_BYTES // dtype.itemsize, 256)
    step, chunk = (max(1, elems // cols), cols) if cols <= elems else (1, elems)
    bufs = _take_scratch(dtype, step * chunk, n_scratch, mask)
    for a in range(r0, r1, step):
        b = min(a + step, r1)
        columns = [None if g is None else g[a:b, None] for g in rows]
        for c0 in range(0, cols, chunk):
            c1 = min(c0 + chunk, cols)
            shape = (b - a, c1 - c0)
            n = shape[0] * shape[1]
            fn([None if x is None else x[a:b, c0:c1] for x in full], columns,
               [x[:n].reshape(shape) for x in bufs])
    _give_scratch(dtype, step * chunk, n_scratch, mask, bufs)


def map_blocks(fn: BlockMap, full: list[Any], rows: list[Any], *, scratch: int,
               mask: bool = False) -> None:
    """Run ``fn`` on blocks of ``full`` (arrays of one shape ``(..., C)``, or ``None``) with
    the matching rows of ``rows`` (arrays of shape ``(...)``), blocked and threaded.

    ``fn`` gets ``scratch`` float buffers (and a boolean one if ``mask``) of the block's shape;
    it writes its results into blocks of the output arrays it finds in ``full``. Extra
    memory: those buffers, :data:`BLOCK_BYTES` each, per thread working on the call.
    """
    run(functools.partial(_map_rows, fn, scratch, mask), full, rows)


# ------------------------------------------------------------------ row-wise blocks (family)
def _rows_of(block: Callable[[np.ndarray, np.ndarray], np.ndarray], elements: int,
             full: list[np.ndarray], rows: list[np.ndarray], r0: int, r1: int) -> None:
    a, b = full
    out = rows[0]
    step = max(1, elements // a.shape[1])
    for s in range(r0, r1, step):
        e = min(r1, s + step)
        out[s:e] = block(a[s:e], b[s:e])


def row_blocks(block: Callable[[np.ndarray, np.ndarray], np.ndarray], a: np.ndarray,
               b: np.ndarray, *, elements: int, threaded: bool = True) -> np.ndarray:
    """``block`` (a row-wise function: one value per row of its two ``(k, C)`` arguments) on
    blocks of about ``elements`` elements of whole rows of the 2-D ``a``/``b``; the per-row
    results as a 1-D array of their dtype. ``block`` owns its temporaries (about one block
    each), per thread working on the call."""
    out = np.empty(a.shape[0], dtype=a.dtype)
    run(functools.partial(_rows_of, block, elements), [a, b], [out], threaded=threaded)
    return out
