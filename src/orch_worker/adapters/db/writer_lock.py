"""The lock that sink processes sharing one SQLite file take in turn before they write.

SQLite lets one writer in at a time and makes the others wait in its busy handler, which
sleeps 1, 2, 5, 10, 15, 20, 25... ms between tries: a writer that finds the database busy
usually wakes long after it was freed, and two sinks of one consumer group writing to one file
spent much of their time asleep so. Waiting on this lock instead, a writer gets the database
within a millisecond of its release, while its other work (reading Kafka, decoding, staging
rows) goes on beside the other's write. It is advisory: a writer that does not take it (the
`sqlite3` shell, say) is still kept out by SQLite's own lock, as before.
"""

from __future__ import annotations

import fcntl
import os
import time

POLL_S = 0.0005
"""Between two tries for a lock someone holds: how late a waiting writer may get it."""


class WriterLock:
    """An exclusive `flock` on a file beside the database, taken with a time limit.

    `flock` itself waits without limit; a writer must give up after the store's busy timeout
    (and retry the batch later, like any busy database), so the wait is a short poll. A lock
    is freed by the kernel when its holder's process ends, however it ends.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, timeout_s: float) -> bool:
        """Take the lock, waiting at most `timeout_s`; False if it stayed held by another."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(POLL_S)
            else:
                return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Let go of the lock and its file descriptor (the file stays, for the next writer)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
