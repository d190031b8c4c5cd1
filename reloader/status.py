"""The status listing (`GET /models[/{name}]`): each model's live version, files, error and last events.

Built from what the worker's last pass found, the registry, and the events the bus carried; it only reads.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from .events import CheckpointJudged, Event, Outcome, ReloadFailed
from .policy import same_definition
from .registry import LiveModel
from .worker import ModelWorker

MAX_EVENTS = 50
RESULT = {
    Outcome.SWAPPED: "live",
    Outcome.REJECTED: "rejected",
    Outcome.INCOMPLETE: "incomplete",
    Outcome.CANARY: "canary",
}


class EventLog:
    """A bus subscriber keeping each model's last MAX_EVENTS verdicts and failed passes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, deque[dict[str, Any]]] = {}  # guarded by _lock

    def __call__(self, event: Event) -> None:
        entry: dict[str, Any]
        if isinstance(event, CheckpointJudged):
            entry = {"event": event.outcome, "result": RESULT[event.outcome], "reason": event.reason}
            entry |= {"file": event.report.path, "timings_ms": event.timings_ms()}
        elif isinstance(event, ReloadFailed):
            entry = {"event": Outcome.ERROR, "result": "error", "reason": event.error}
        else:
            return
        with self._lock:
            self._events.setdefault(event.model, deque(maxlen=MAX_EVENTS)).append({"time": time.time(), **entry})

    def newest_first(self, model: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._events.get(model, ()))[::-1]

    def forget(self, model: str) -> None:
        with self._lock:
            self._events.pop(model, None)


def describe_model(worker: ModelWorker, live: LiveModel | None, events: list[dict[str, Any]]) -> dict[str, Any]:
    found = worker.found()
    config = worker.config
    return {
        "name": worker.name,
        "state": "ready" if live is not None else "not ready",
        "live": None if live is None else {**live.describe(), "file": found.live_file, "report": live.report.to_dict()},
        "definition_current": live is None or same_definition(live.config, config),
        "error": found.error,
        "arch": config.arch,
        "num_classes": config.num_classes,
        "checkpoints": worker.source.location,
        "version_policy": config.version,
        "files": [
            {
                "path": f.name,
                "version": f.version,
                "size": f.size,
                "mtime_ns": f.mtime_ns,
                "sha256": f.sha256,
                "status": f.status,
                "reason": f.reason,
            }
            for f in found.files
        ],
        "canary": None if worker.canary is None else worker.canary.describe(),
        "passes": worker.passes,
        "reloading": worker.reloading,
        "events": events,
    }
