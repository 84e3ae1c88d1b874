"""Evaluate untrusted Nickel in worker processes, bounded in time and memory.

Nickel is a full language: a submitted file can loop forever or build a huge value,
and ``nickel.run`` cannot be interrupted from Python. So the server never evaluates
it in its own process: a small pool of spawned workers does, each with an address
space limit, and a worker that overruns the timeout is killed (with the pool, which
is replaced; evaluations that were sharing it are retried once, each in a worker of
its own, so that one bad submission cannot fail the others).
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
    except RecursionError:  # Nickel's JSON output is nested deeper than Python can read
        return False, f"{filename}: the workflow is nested too deeply"
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
        self._lock = threading.RLock()
        self._alone = asyncio.Semaphore(workers)  # bounds the retries in a worker of their own

    def _spawn(self, workers: int) -> tuple[ProcessPoolExecutor, list[Future[None]]]:
        tmp = tempfile.mkdtemp(prefix="prov-eval-")
        pool = ProcessPoolExecutor(
            max_workers=workers,
            # spawn, not fork: the server process has threads (Ray, the event loop).
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.memory_limit, tmp),
        )
        with self._lock:
            self._tmp[id(pool)] = tmp
            if not self._atexit:  # a replica stopped by SIGTERM still cleans up
                atexit.register(self.close)
                self._atexit = True
        # Start every worker now: a worker's start (a new interpreter, ~1 s on a busy
        # machine) must not count against an evaluation's timeout.
        return pool, [pool.submit(_warm_up) for _ in range(workers)]

    def _current(self) -> tuple[ProcessPoolExecutor, list[Future[None]]]:
        with self._lock:
            if self._pool is None:
                self._pool, self._warm = self._spawn(self.workers)
            return self._pool, self._warm

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        """Kill ``pool``'s workers (one is stuck or dead) and forget it. Its pending
        evaluations fail with ``BrokenProcessPool`` (not cancelled: their requests retry)."""
        with self._lock:
            if self._pool is pool:
                self._pool = None
        # ``_processes`` is None once the pool has noticed a dead worker by itself.
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            with contextlib.suppress(ProcessLookupError, TypeError):
                if proc.pid is not None:
                    os.kill(proc.pid, signal.SIGKILL)
        pool.shutdown(wait=False)
        with self._lock:
            tmp = self._tmp.pop(id(pool), None)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    async def _run(
        self,
        pool: ProcessPoolExecutor,
        warm: list[Future[None]],
        source: str,
        filename: str,
        dirs: list[str],
    ) -> Doc:
        """Evaluate in ``pool``; ``BrokenProcessPool`` if the pool dies or is gone."""
        try:
            await asyncio.wait_for(asyncio.gather(*map(asyncio.wrap_future, warm)), 120)
            try:
                future = pool.submit(_evaluate, source, filename, dirs)
            except RuntimeError:  # shut down by another request's timeout meanwhile
                raise BrokenProcessPool("the evaluator pool was shut down") from None
            ok, value = await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
        except TimeoutError:
            self._discard(pool)
            raise EvaluationTimeoutError(
                f"{filename}: evaluation did not finish within {self.timeout:g} s"
            ) from None
        if not ok:
            raise InputError(str(value))
        return value  # type: ignore[no-any-return]

    async def evaluate(self, source: str, filename: str, import_dirs: list[Path]) -> Doc:
        dirs = [str(d) for d in import_dirs]
        pool, warm = self._current()
        try:
            return await self._run(pool, warm, source, filename, dirs)
        except BrokenProcessPool:
            # A worker died (this evaluation's or another one's: a value nested too
            # deeply, the memory limit) or another request's timeout killed the pool.
            # Retry once alone, in a worker of its own, so that one bad submission
            # cannot fail the others.
            self._discard(pool)
        async with self._alone:
            alone, warm = self._spawn(1)
            try:
                return await self._run(alone, warm, source, filename, dirs)
            except BrokenProcessPool:
                limit = f"the {self.memory_limit >> 20} MiB " if self.memory_limit else "the "
                raise InputError(
                    f"{filename}: evaluation failed: the Nickel evaluator crashed (a value "
                    f"nested too deeply, or over {limit}memory limit?)"
                ) from None
            finally:
                self._discard(alone)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            self._discard(pool)
