"""How a version that passed the gate comes to serve: at once, or after its canary decides on live traffic.

One per model, driven by its worker's thread only. With nothing live, a pin (a person chose the
version), a new model definition (nothing like it to compare with) or no `canary` in the config, a
version goes live at once. Otherwise it becomes the canary (canary.py): it shadows live traffic, and
`settle` carries out its decision, promoting it or recording its rejection by content.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .caches import CheckpointCache
from .canary import Canaries, Canary, CanaryState, Traffic
from .compute import give_back
from .config import ModelConfig
from .events import CheckpointJudged, EventBus, Outcome
from .memory import release
from .policy import Serving, same_definition
from .registry import LiveModel, Registry
from .source import Clock

Arrival = Callable[[], float | None]  # when the source first saw the file (and forget it), for since_detected


class Promotion:
    def __init__(
        self,
        name: str,
        registry: Registry,
        bus: EventBus,
        canaries: Canaries,
        traffic: Traffic,
        clock: Clock,
        decided: Callable[[], None],
    ) -> None:
        self.name = name
        self.registry = registry
        self._bus = bus
        self._canaries = canaries
        self._traffic = traffic
        self._clock = clock
        self._decided = decided  # wakes the worker when a canary has decided
        self.canary: Canary | None = None

    def passed(self, config: ModelConfig, new: LiveModel, arrival: Arrival) -> None:
        """`new` passed the gate: it serves now, or shadows live traffic first."""
        live = self.registry.get(self.name)
        if config.canary is not None and config.version == "latest" and live and same_definition(live.config, config):
            self._start_canary(new, config)
            return
        self.end_canary()
        self._go_live(new, arrival())

    def shadowing(self, config: ModelConfig) -> Serving | None:
        """The canary, as the policy bounds its search with it; an edited `canary:` applies to it from now."""
        canary = self.canary
        if canary is None or config.canary is None or config.version != "latest":
            return None
        canary.spec = config.canary
        new = canary.candidate
        return Serving(new.path, new.version, new.report.mtime_ns or 0, new.sha256, True)

    def wait(self) -> float | None:
        """Seconds until the canary's max_wait_s ends (it runs on the real clock), if there is one."""
        return None if self.canary is None else max(0.0, self.canary.deadline - time.monotonic())

    def settle(self, cache: CheckpointCache, arrival: Callable[[Path], float | None]) -> bool:
        """Carry out the canary's decision, or its timeout. True when one was carried out."""
        canary = self.canary
        if canary is None:
            return False
        if canary.expired(time.monotonic()):
            canary.time_out()
        if canary.state is CanaryState.SHADOWING:
            return False
        self.end_canary()
        new, reason = canary.candidate, canary.reason or "canary decided"
        if canary.state is CanaryState.PROMOTE:
            self._go_live(new, arrival(new.path), reason)
        else:
            cache.reject(new.sha256, reason)  # by content: the same bytes are not tried again
            judged = CheckpointJudged(self.name, Outcome.REJECTED, new.path, reason, new.report, sha256=new.sha256)
            self._bus.publish(judged)
            del canary, new, judged
            release()  # the rejected candidate's memory goes back now (a GPU's too), not at the next swap
        return True

    def end_canary(self) -> None:
        if self.canary is not None:
            give_back()  # a turn kept for a swap (compute.hand_over): the canary's thread, joined here, may await it
            self._canaries.set(self.name, None)
            self.canary.stop()
            self.canary = None

    def _start_canary(self, candidate: LiveModel, config: ModelConfig) -> None:
        assert config.canary is not None
        self.end_canary()  # a newer candidate replaces the one in shadow
        canary = Canary(candidate, config.canary, self._traffic, self._decided)
        self.canary = canary
        self._canaries.set(self.name, canary)
        canary.start()
        report = candidate.report
        judged = CheckpointJudged(self.name, Outcome.CANARY, candidate.path, None, report, sha256=candidate.sha256)
        self._bus.publish(replace(judged, version=candidate.version))

    def _go_live(self, new: LiveModel, seen: float | None, canary: str | None = None) -> None:
        previous = self.registry.swap(new)
        give_back()  # the turn the gate's last pass kept for this swap (compute.hand_over): serving's now
        since = None if seen is None else round((self._clock() - seen) * 1000.0, 3)
        self._bus.publish(
            CheckpointJudged(
                self.name,
                Outcome.SWAPPED,
                new.path,
                canary,  # how its canary decided, for a promotion
                new.report,
                sha256=new.sha256,
                version=new.version,
                previous_version=None if previous is None else previous.version,
                since_detected_ms=since,
            )
        )
        del previous  # requests still holding the old record finish on it, then it is freed
        release()
