"""Sources say which checkpoints exist for a model; they never load or judge one.

A source lists candidates (newest first), says which are still arriving and must not be loaded yet,
hands the gate a local file for a candidate, and tells its worker when something changed. `LocalFolder`
is driven by watcher events and the settle rules. A remote source (a polled bucket listing) fits the
same shape (`bucket.BucketSource`): its candidates' paths are where `fetch` puts each object in a local
cache, their signature changes with the object's ETag, its worker lists it again at `next_poll`, and
`error` says why the endpoint cannot be listed while the worker keeps serving from memory.

Where the model requires signatures (`listing(now, signed=True)`), each candidate carries its `.sig`'s
identity, and a checkpoint is still arriving while its `.sig` is being written, or, with none beside it,
for `settle_ms` after it settled (signing.SignatureWait); then the gate judges it (and rejects it unsigned).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .checkpoints import Candidate, is_signature_name, scan, stat_candidate
from .config import WatchConfig
from .events import CheckpointSeen, EventBus
from .files import shown
from .settle import FileEvent, Settling
from .signing import SIG_SUFFIX, SignatureWait

Clock = Callable[[], float]
# Called by a source when something changed: True when a pass should run now, False when only the time
# of the next one moved (a file still being written).
Wake = Callable[[bool], None]


@dataclass(frozen=True)
class Listing:
    candidates: tuple[Candidate, ...]  # newest first
    arriving: frozenset[Path]  # still being written or fetched: not to be loaded yet
    error: str | None  # why the source cannot be listed; the live version keeps serving meanwhile
    # why an arriving file is not to be loaded yet, where that is not "still being written"
    waiting: Mapping[Path, str] = field(default_factory=dict)


class CheckpointSource(Protocol):
    """Where one model's checkpoints come from."""

    location: str

    def subscribe(self, wake: Wake) -> None: ...

    def name(self, path: Path) -> str:
        """How a candidate's file is named to people: its path, or the object it came from."""
        ...

    def listing(self, now: float, signed: bool = False) -> Listing:
        """What is there now; `signed`: the model requires signatures (each candidate's `.sig` counts)."""
        ...

    def arriving(self, now: float) -> frozenset[Path]: ...

    def fetch(self, candidate: Candidate) -> Path: ...

    def unchanged(self, candidate: Candidate) -> bool: ...

    def next_due(self) -> float | None:
        """When a file still arriving should be looked at again; None when nothing is arriving."""
        ...

    def next_poll(self) -> float | None:
        """When the source should be listed again on a schedule (not pending work); None: only on news."""
        ...

    def retry(self, path: Path, now: float, after_s: float | None = None) -> None: ...

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
        self._signed = False  # the last listing's: signatures are required; guarded by _lock
        self._unsigned = SignatureWait()  # guarded by _lock

    def subscribe(self, wake: Wake) -> None:
        self._wake = wake

    def configure(self, watch: WatchConfig) -> None:
        with self._lock:
            self._settling.watch = watch

    def file_event(self, path: Path, kind: FileEvent) -> None:
        """A checkpoint's event, or its `.sig`'s (the watcher sends those for models that require signatures)."""
        now = self._clock()
        if is_signature_name(path.name):
            with self._lock:  # settled under its own path: the checkpoint's own writing state stays as it is
                immediate = self._settling.event(path, kind, now)
            self._wake(immediate)
            return
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

    def listing(self, now: float, signed: bool = False) -> Listing:
        with self._lock:
            self._signed = signed
        arriving = self._unsettled(now, forget=True)
        error = None if self.folder.is_dir() else f"checkpoints folder {self.folder} is missing"
        candidates = tuple(scan(self.folder, signed=True) if signed else scan(self.folder))
        with self._lock:
            wait_s = self._settling.settle_s
            waiting = self._unsigned.hold(candidates if signed else (), arriving, now, wait_s)
        return Listing(candidates, arriving | waiting.keys(), error, waiting)

    def arriving(self, now: float) -> frozenset[Path]:
        return self._unsettled(now, forget=False)

    def _unsettled(self, now: float, forget: bool) -> frozenset[Path]:
        """Files still being written; with signatures required, also those whose `.sig` is being written."""
        with self._lock:
            unsettled = self._settling.unsettled(now, forget)
            signed = self._signed
        files = {p for p in unsettled if not is_signature_name(p.name)}
        if signed:
            files |= {p.with_name(p.name[: -len(SIG_SUFFIX)]) for p in unsettled if is_signature_name(p.name)}
        return frozenset(files)

    def fetch(self, candidate: Candidate) -> Path:
        return candidate.path

    def unchanged(self, candidate: Candidate) -> bool:
        """The file is still what the listing saw (same inode, size and mtime; and the same `.sig`, if any)."""
        return stat_candidate(candidate.path, signed=bool(candidate.sig)) == candidate

    def next_due(self) -> float | None:
        with self._lock:
            due = [t for t in (self._settling.next_due(), self._unsigned.next_due()) if t is not None]
        return min(due, default=None)

    def next_poll(self) -> float | None:
        return None  # the watcher reports changes (and polls, where `watch.poll` says so)

    def retry(self, path: Path, now: float, after_s: float | None = None) -> None:
        with self._lock:
            self._settling.retry(path, now, after_s)

    def take_arrival(self, path: Path) -> float | None:
        """When the file was first reported, forgetting it: a rewrite of the path is a new arrival."""
        with self._lock:
            return self._arrived.pop(path, None)

    def keep(self, live: Path | None) -> None:
        pass  # the folder is the files themselves
