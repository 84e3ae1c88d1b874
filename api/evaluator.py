"""Evaluate untrusted Nickel in worker processes, bounded in time and memory.

Nickel is a full language: a submitted file can loop forever or build a huge value,
and ``nickel.run`` cannot be interrupted from Python. So the server never evaluates
it in its own process: a small pool of spawned workers does, each with an address
space limit, and a worker that overruns the timeout is killed (with the pool, which
is replaced; evaluations that were sharing it are retried once on the new one).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import multiprocessing
import os
import resource
import shutil
import signal
import tempfile
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from schemas.errors import InputError

Doc = dict[str, Any]


class EvaluationTimeoutError(InputError):
    """The submitted Nickel did not finish evaluating in time."""


def _init_worker(memory_limit: int | None, tmp: str) -> None:
    # The evaluation's scratch files go to a dir the parent removes with the pool: a
    # worker killed mid-evaluation cannot clean up after itself.
    tempfile.tempdir = tmp
    if memory_limit:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    import schemas.loader  # noqa: F401  (warm: the first evaluation should not pay for it)


def _warm_up() -> None:
    time.sleep(0.2)  # long enough that each warm-up occupies a worker of its own


def _evaluate(source: str, filename: str, import_dirs: list[str]) -> tuple[bool, Any]:
    """In the worker: ``(True, workflow JSON)`` or ``(False, message)``."""
    from schemas.loader import load_workflow_source

    try:
        spec = load_workflow_source(source, filename, import_dirs=[Path(d) for d in import_dirs])
    except InputError as exc:
        return False, str(exc)
    except MemoryError:
        return False, f"{filename}: evaluation ran out of memory"
    return True, spec.model_dump(mode="json")


class NickelEvaluator:
    def __init__(
        self, *, timeout: float = 10.0, workers: int = 2, memory_limit: int | None = 2 << 30
    ) -> None:
        self.timeout = timeout
        self.workers = workers
        self.memory_limit = memory_limit
        self._pool: ProcessPoolExecutor | None = None
        self._warm: list[Future[None]] = []
        self._tmp: dict[int, str] = {}  # id(pool) -> its scratch dir
        self._atexit = False
        self._lock = threading.Lock()

    def _current(self) -> tuple[ProcessPoolExecutor, list[Future[None]]]:
        with self._lock:
            if self._pool is None:
                tmp = tempfile.mkdtemp(prefix="prov-eval-")
                self._pool = ProcessPoolExecutor(
                    max_workers=self.workers,
                    # spawn, not fork: the server process has threads (Ray, the event loop).
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_worker,
                    initargs=(self.memory_limit, tmp),
                )
                # Start every worker now: a worker's start (a new interpreter, ~1 s on
                # a busy machine) must not count against an evaluation's timeout.
                self._tmp[id(self._pool)] = tmp
                if not self._atexit:  # a replica stopped by SIGTERM still cleans up
                    atexit.register(self.close)
                    self._atexit = True
                self._warm = [self._pool.submit(_warm_up) for _ in range(self.workers)]
            return self._pool, self._warm

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        """Kill ``pool``'s workers (one is stuck) and forget it."""
        with self._lock:
            if self._pool is pool:
                self._pool = None
        for proc in list(getattr(pool, "_processes", {}).values()):
            with contextlib.suppress(ProcessLookupError, TypeError):
                if proc.pid is not None:
                    os.kill(proc.pid, signal.SIGKILL)
        pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            tmp = self._tmp.pop(id(pool), None)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    async def evaluate(self, source: str, filename: str, import_dirs: list[Path]) -> Doc:
        dirs = [str(d) for d in import_dirs]
        for attempt in (1, 2):
            pool, warm = self._current()
            try:
                await asyncio.wait_for(asyncio.gather(*map(asyncio.wrap_future, warm)), 120)
                future = pool.submit(_evaluate, source, filename, dirs)
                ok, value = await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
            except TimeoutError:
                self._discard(pool)
                raise EvaluationTimeoutError(
                    f"{filename}: evaluation did not finish within {self.timeout:g} s"
                ) from None
            except BrokenProcessPool:
                # Another request's timeout killed the pool under us, or a worker died
                # (memory limit): retry once in a fresh pool, then give up.
                self._discard(pool)
                if attempt == 2:
                    raise InputError(
                        f"{filename}: evaluation failed (the evaluator process died; "
                        "is the workflow too large?)"
                    ) from None
                continue
            if not ok:
                raise InputError(str(value))
            return value  # type: ignore[no-any-return]
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            self._discard(pool)
