"""When is a file finished? Watcher events plus a clock decide; nothing here reads the file.

- A rename into the folder (`mv`, `os.replace`, rsync's final step) is finished at once.
- A file written in place is finished at its close-after-write (inotify), or, when polling (no close
  events), once it has been unchanged for `settle_ms`.
- A file written to but never closed (a hard link, mmap writes) is taken as finished after
  QUIET_WITHOUT_CLOSE_S without events. If it then fails to load while no close has been seen for its
  writes, it was a writer pausing with the file open: incomplete, and looked at again at its close.
  (Where the kernel grants leases, the load itself also refuses a file open for writing: files.py.)
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from .config import WatchConfig

QUIET_WITHOUT_CLOSE_S = 2.0
# watchdog reports a rename from another watched folder as "created" with no write events after it; a file
# created by open() is written within this window, which then makes it wait for its close instead.
CREATED_GRACE_S = 0.025
# A file that failed while it was still changing is looked at again after this long at least.
MIN_RETRY_S = 0.05


class FileEvent(str, Enum):
    """What a watcher saw happen to a checkpoint file."""

    MOVED = "moved"  # renamed into place: finished
    CLOSED = "closed"  # closed after writing: finished
    CREATED = "created"
    WRITTEN = "written"
    DELETED = "deleted"
    LISTED = "listed"  # a bucket listing showed a new or changed object (complete: S3 lists only finished uploads)


IMMEDIATE = (FileEvent.MOVED, FileEvent.CLOSED, FileEvent.DELETED)


class Settling:
    """Per-file deadlines. Not thread-safe: its owner (a LocalFolder) calls it under its own lock."""

    def __init__(self, watch: WatchConfig) -> None:
        self.watch = watch
        self._due: dict[Path, float] = {}  # path -> when it is settled enough to load
        self._writing: set[Path] = set()  # written to, no close seen yet (inotify only)
        self._unclosed: set[Path] = set()  # the same, but kept past the quiet period: only a close ends it

    @property
    def settle_s(self) -> float:
        return self.watch.settle_ms / 1000.0

    def event(self, path: Path, kind: FileEvent, now: float) -> bool:
        """Record a watcher event; True when it calls for a pass right away."""
        if kind in (FileEvent.MOVED, FileEvent.CLOSED, FileEvent.DELETED):
            self._unclosed.discard(path)
        if kind in (FileEvent.MOVED, FileEvent.CLOSED):
            self._writing.discard(path)
            self._due[path] = now
        elif kind is FileEvent.CREATED:
            if path not in self._writing:
                self._due[path] = now + (self.settle_s if self.watch.poll else CREATED_GRACE_S)
        elif kind is FileEvent.WRITTEN:
            if self.watch.poll:
                self._due[path] = now + self.settle_s
            else:
                self._writing.add(path)
                self._unclosed.add(path)
                self._due[path] = now + max(QUIET_WITHOUT_CLOSE_S, self.settle_s)
        elif kind is FileEvent.DELETED:
            self._writing.discard(path)
            self._due.pop(path, None)
        else:
            raise ValueError(f"unknown file event kind {kind!r}")
        return kind in IMMEDIATE

    def retry(self, path: Path, now: float, after_s: float | None = None) -> None:
        """Look at a file again later: it failed while still changing (at its close, if one is to come), or
        `after_s` from now (the machine was short of memory or disk for it)."""
        if path in self._unclosed and after_s is None:
            return  # its close is an event, and brings it back: re-reading it meanwhile only costs
        self._due[path] = now + (max(self.settle_s, MIN_RETRY_S) if after_s is None else after_s)

    def due_now(self, now: float) -> bool:
        return any(t <= now for t in self._due.values())

    def next_due(self) -> float | None:
        return min(self._due.values(), default=None)

    def waiting(self) -> bool:
        return bool(self._due)

    def unsettled(self, now: float, forget: bool = True) -> set[Path]:
        """Files still being written; with `forget`, files whose deadline passed are forgotten (settled).

        Only a listing should forget: it is what then judges them. A look in the middle of a pass (is the
        file just judged still being written?) must leave a deadline that passed meanwhile for `next_due`,
        or a file that settled during the pass would wait for an event that may never come."""
        if not forget:
            # Every path written to has a deadline; one written to and never closed is still arriving.
            return {p for p, due in self._due.items() if due > now} | self._unclosed
        for path, due in list(self._due.items()):
            if due <= now:
                del self._due[path]
                self._writing.discard(path)
        return set(self._due) | self._writing
