"""The live versions: one immutable record per model, swapped by rebinding a single reference."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .config import ModelConfig
from .images import Preprocessor
from .report import ValidationReport


@dataclass(frozen=True, eq=False)
class LiveModel:
    """Everything one request needs, fixed for the whole request: it never sees half a swap."""

    name: str
    config: ModelConfig
    version: int
    sha256: str
    path: Path
    module: nn.Module
    preprocessor: Preprocessor
    report: ValidationReport
    loaded_at: float = field(default_factory=time.time)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.config.labels

    def answer_headers(self) -> dict[str, str]:
        """On every prediction, so a load balancer's log shows which version answered."""
        return {"X-Model-Version": str(self.version), "X-Model-Sha256": self.sha256}

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "sha256": self.sha256,
            "path": self.report.path,  # as the gate named it: the file, or the object it came from
            "loaded_at": self.loaded_at,
            "precision": self.report.precision,
            "device": self.report.device,
        }


class Registry:
    """Readers take `get(name)` once per request; writers replace whole records under a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: Mapping[str, LiveModel] = {}
        self.swaps = 0

    def get(self, name: str) -> LiveModel | None:
        return self._live.get(name)

    def snapshot(self) -> Mapping[str, LiveModel]:
        return self._live

    def swap(self, live: LiveModel) -> LiveModel | None:
        """Put `live` in service and return the record it replaced (the caller drops it)."""
        with self._lock:
            previous = self._live.get(live.name)
            # A new mapping each time, so a reader holding the old one keeps a consistent view.
            self._live = {**self._live, live.name: live}
            self.swaps += 1
        return previous

    def remove(self, name: str) -> LiveModel | None:
        with self._lock:
            live = dict(self._live)
            previous = live.pop(name, None)
            self._live = live
        return previous
