"""One owner per data directory, enforced with ``flock`` on ``<dir>/LOCK``.

``flock`` belongs to the open file, so the kernel drops it when the owner dies, even
by ``kill -9``: there is never a stale lock to clean up by hand. The file is never
deleted, because unlinking a locked file lets a second process lock a new inode under
the same name.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import weakref
from pathlib import Path
from types import TracebackType

from runtime.errors import StoreLockedError

LOCK_NAME = "LOCK"

# A forked child shares the parent's open file and so keeps its lock alive after the
# parent exits; closing our copy in the child leaves the parent's lock intact.
_live: weakref.WeakSet[DirLock] = weakref.WeakSet()


def _close_in_child() -> None:
    for lock in list(_live):
        lock._forget()


os.register_at_fork(after_in_child=_close_in_child)


class DirLock:
    """An exclusive lock on a directory, taken on construction; never blocks."""

    def __init__(self, path: Path) -> None:
        self._fd: int | None = None
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.file = self.path / LOCK_NAME
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise StoreLockedError(
                f"{self.path} is in use by another orchestrator ({self._owner()}); "
                "stop it first or use another data dir"
            ) from None
        owner = f"{os.getpid()} {socket.gethostname()}\n".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, owner, 0)
        self._fd = fd
        _live.add(self)

    def _owner(self) -> str:
        try:
            pid, _, host = self.file.read_text().strip().partition(" ")
        except OSError:
            pid, host = "", ""
        # The holder writes its pid just after locking, so a racing reader may see none.
        if not pid:
            return "pid unknown"
        return f"pid {pid} on {host}" if host else f"pid {pid}"

    @property
    def held(self) -> bool:
        return self._fd is not None

    def close(self) -> None:
        """Release the lock; safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is not None:
            _live.discard(self)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _forget(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> DirLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
