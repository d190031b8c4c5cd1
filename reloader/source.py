"""Sources say which checkpoints exist for a model; they never load or judge one.

A source lists candidates (newest first), says which are still arriving and must not be loaded yet,
hands the gate a local file for a candidate, and tells its worker when something changed. `LocalFolder`
is driven by watcher events and the settle rules. A remote source (a polled bucket listing) fits the
same shape (`bucket.BucketSource`): its candidates' paths are where `fetch` puts each object in a local
cache, their signature changes with the object's ETag, its worker lists it again at `next_poll`, and
`error` says why the endpoint cannot be listed while the worker keeps serving from memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .checkpoints import Candidate, scan, stat_candidate
from .config import WatchConfig
from .events import CheckpointSeen, EventBus
from .files import shown
from .settle import FileEvent, Settling

Clock = Callable[[], float]
# Called by a source when something changed: True when a pass should run now, False when only the time
# of the next one moved (a file still being written).
Wake = Callable[[bool], None]


@dataclass(frozen=True)
class Listing:
    candidates: tuple[Candidate, ...]  # newest first
    arriving: frozenset[Path]  # still being written or fetched: not to be loaded yet
    error: str | None  # why the source cannot be listed; the live version keeps serving meanwhile


class CheckpointSource(Protocol):
    """Where one model's checkpoints come from."""

    location: str

    def subscribe(self, wake: Wake) -> None: ...

    def name(self, path: Path) -> str:
        """How a candidate's file is named to people: its path, or the object it came from."""
        ...

    def listing(self, now: float) -> Listing: ...

    def arriving(self, now: float) -> frozenset[Path]: ...

    def fetch(self, candidate: Candidate) -> Path: ...

    def unchanged(self, candidate: Candidate) -> bool: ...

    def next_due(self) -> float | None:
        """When a file still arriving should be looked at again; None when nothing is arriving."""
        ...

    def next_poll(self) -> float | None:
        """When the source should be listed again on a schedule (not pending work); None: only on news."""
        ...

    def retry(self, path: Path, now: float) -> None: ...

    def take_arrival(self, path: Path) -> float | None: ...

    def keep(self, live: Path | None) -> None:
        """A pass settled with `live` serving: a source may drop the local copies it no longer needs."""
        ...


class LocalFolder:
    """A folder on this machine, told of changes by the watcher (inotify or polling) through `file_event`."""

    def __init__(self, model: str, folder: Path, watch: WatchConfig, bus: EventBus, clock: Clock = time.monotonic):
        self.model = model
        self.folder = folder
        self.location = str(folder)
        self._bus = bus
        self._clock = clock
        self._wake: Wake = lambda now: None
        self._lock = threading.Lock()
        self._settling = Settling(watch)  # guarded by _lock
        self._arrived: dict[Path, float] = {}  # path -> when an event first reported it; guarded by _lock

    def subscribe(self, wake: Wake) -> None:
        self._wake = wake

    def configure(self, watch: WatchConfig) -> None:
        with self._lock:
            self._settling.watch = watch

    def file_event(self, path: Path, kind: FileEvent) -> None:
        now = self._clock()
        with self._lock:
            first = kind is not FileEvent.DELETED and path not in self._arrived
            self._arrived.setdefault(path, now)
            immediate = self._settling.event(path, kind, now)
            if kind is FileEvent.DELETED:
                self._arrived.pop(path, None)
        if first:
            # One event per file arriving, not per write: a plain `cp` sends dozens of write events.
            self._bus.publish(CheckpointSeen(self.model, path, kind, shown(path)))
        # A file still settling only moves the next deadline; a pass now would find it unfinished.
        self._wake(immediate)

    def name(self, path: Path) -> str:
        return shown(path)

    def listing(self, now: float) -> Listing:
        arriving = self.arriving(now)
        error = None if self.folder.is_dir() else f"checkpoints folder {self.folder} is missing"
        return Listing(tuple(scan(self.folder)), arriving, error)

    def arriving(self, now: float) -> frozenset[Path]:
        with self._lock:
            return frozenset(self._settling.unsettled(now))

    def fetch(self, candidate: Candidate) -> Path:
        return candidate.path

    def unchanged(self, candidate: Candidate) -> bool:
        """The file is still what the listing saw (same inode, size and mtime)."""
        return stat_candidate(candidate.path) == candidate

    def next_due(self) -> float | None:
        with self._lock:
            return self._settling.next_due()

    def next_poll(self) -> float | None:
        return None  # the watcher reports changes (and polls, where `watch.poll` says so)

    def retry(self, path: Path, now: float) -> None:
        with self._lock:
            self._settling.retry(path, now)

    def take_arrival(self, path: Path) -> float | None:
        """When the file was first reported, forgetting it: a rewrite of the path is a new arrival."""
        with self._lock:
            return self._arrived.pop(path, None)

    def keep(self, live: Path | None) -> None:
        pass  # the folder is the files themselves
