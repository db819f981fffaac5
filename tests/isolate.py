"""Run code that can take the interpreter down (torch's native kernels) in a child process.

``isolated(fn, *args)`` calls ``fn(*args)`` in a long-lived spawned worker and returns its result
(exceptions come back as themselves, so ``pytest.raises`` works). If the worker dies (SIGSEGV in
a oneDNN kernel, say), only the calling test fails, with the signal named; the next call starts
a fresh worker. The worker is reused, so torch is imported once, not once per call.
"""

from __future__ import annotations

import multiprocessing
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

_pool: ProcessPoolExecutor | None = None


def _worker() -> ProcessPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    return _pool


def _exit_code(processes: list) -> str:
    for p in processes:
        p.join(30)
    codes = [p.exitcode for p in processes]
    names = [signal.Signals(-c).name if c and c < 0 else str(c) for c in codes]
    return ", ".join(names) or "unknown"


def isolated(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in the worker process; a crash there fails only this call."""
    global _pool
    pool = _worker()
    future = pool.submit(fn, *args, **kwargs)
    processes = list((pool._processes or {}).values())  # started by submit()
    try:
        return future.result()
    except BrokenProcessPool as exc:
        code = _exit_code(processes)
        _pool = None
        raise AssertionError(
            f"{fn.__module__}.{fn.__qualname__} crashed its process ({code}): a native kernel "
            "failed; the rest of the suite goes on in a fresh worker"
        ) from exc


def shutdown() -> None:
    global _pool
    if _pool is not None:
        _pool.shutdown(cancel_futures=True)
        _pool = None
