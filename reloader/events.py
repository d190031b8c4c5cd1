"""The one channel the reload core tells the rest through: typed events, published on one bus.

Workers publish what they judged and swapped, the supervisor what became of the config, sources what
arrived and what failed. Logs, metrics, systemd status lines and the status listing subscribe; the core
never calls any of them directly (TF Serving's `EventBus<ServableState>` plays this part there).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from .report import ValidationReport
from .settle import FileEvent

if TYPE_CHECKING:
    from .config import Config

logger = logging.getLogger("reloader.events")


class Outcome(str, Enum):
    """What became of one checkpoint the gate looked at, or of a whole reload pass."""

    SWAPPED = "swapped"  # it passed and serves now
    REJECTED = "rejected"  # it failed a check; it never serves (until its content changes)
    INCOMPLETE = "incomplete"  # it was still being written; it is looked at again once settled
    CANARY = "canary"  # it passed the gate and shadows live traffic; its canary decides (SWAPPED or REJECTED)
    ERROR = "error"  # the pass itself failed (a bug or the machine); the next pass tries again


@dataclass(frozen=True)
class CheckpointSeen:
    """A source reported a checkpoint arriving (once per arrival, not once per write)."""

    model: str
    path: Path
    how: FileEvent
    file: str  # how the file is named to people: its path, or the object it came from


@dataclass(frozen=True)
class CheckpointJudged:
    """The gate's verdict on one file, and for a swap the version it replaced."""

    model: str
    outcome: Outcome
    path: Path
    reason: str | None
    report: ValidationReport
    sha256: str | None = None  # of the content judged, where known
    version: int | None = None
    previous_version: int | None = None
    since_detected_ms: float | None = None

    def timings_ms(self) -> dict[str, float]:
        since = {} if self.since_detected_ms is None else {"since_detected": self.since_detected_ms}
        return self.report.timings_ms() | since


@dataclass(frozen=True)
class ReloadFailed:
    """A reload pass raised; the worker goes on and the next pass tries again."""

    model: str
    error: str


@dataclass(frozen=True)
class SourceStatus:
    """A model's source started failing (`error` set) or recovered (`error` None); sent on changes only."""

    model: str
    location: str
    error: str | None


@dataclass(frozen=True)
class ConfigApplied:
    """A config is in force: the first one at start (`initial`), or a reload that applied."""

    config: Config
    initial: bool = False


@dataclass(frozen=True)
class ConfigRejected:
    """The config file on disk was refused; the running config stays."""

    path: Path
    error: str


Event = CheckpointSeen | CheckpointJudged | ReloadFailed | SourceStatus | ConfigApplied | ConfigRejected
Subscriber = Callable[[Event], None]


class EventBus:
    """Delivers each event to every subscriber, in order, on the publisher's thread.

    A failing subscriber is logged and skipped: a broken metrics backend must not undo a swap."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: tuple[Subscriber, ...] = ()

    def subscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers = (*self._subscribers, subscriber)

    def publish(self, event: Event) -> None:
        for subscriber in self._subscribers:
            try:
                subscriber(event)
            except Exception:
                logger.exception("event subscriber %r failed on %s", subscriber, type(event).__name__)
