"""One model's reload job: ask the policy what to do, have the gate judge files, swap the verdicts in.

One worker thread per model, so one reload runs per model at a time while different models reload at
once. Source events and rescans only mark work and wake the thread: a burst coalesces into one pass.

Each model moves through these states; only a swap changes what serves, and nothing else takes a
version out of service (a model leaves only when the config drops it):

    NOT READY --a file arrives--> VALIDATING --it passes--> LIVE --a newer file arrives--> VALIDATING
                                   |                          ^                               |
                                   |                          +-------- it passes ------------+
                                   +-- it fails a check: REJECTED, cached by content; the state before stands
                                   +-- it is still being written: INCOMPLETE, looked at again once settled

With a `canary` and a version live, "it passes" leads to CANARY (promotion.py): LIVE if it agrees on live traffic.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .caches import CheckpointCache
from .canary import Canaries, Canary, NoTraffic, Traffic
from .compute import hand_over, lower_thread_priority
from .config import ModelConfig
from .errors import ConfigError, FetchFailed
from .events import CheckpointJudged, EventBus, Outcome, ReloadFailed, SourceStatus
from .gate import SHORTAGE_RETRY_S, Gate, Judgement, Prepare
from .policy import FileStatus, Hash, Judge, LiveFile, Serving, Settled, plan, same_definition
from .promotion import Promotion
from .registry import LiveModel, Registry
from .report import EvaluationResult
from .source import CheckpointSource, Clock
from .threads import LoopThread, on_own_thread, stop_if_asked

logger = logging.getLogger("reloader.jobs")  # the name log filters know (see logs.py)


@dataclass(frozen=True)
class FileState:
    path: Path
    name: str  # as people see it (see CheckpointSource.name)
    version: int
    size: int
    mtime_ns: int
    sha256: str | None
    status: FileStatus
    reason: str | None


@dataclass(frozen=True)
class Found:
    """What the last pass found, for the status listing."""

    files: tuple[FileState, ...]
    error: str | None
    live_file: LiveFile


@dataclass(frozen=True)
class Shared:
    """What every model's worker shares: the registry it swaps into, the bus it reports on, how a judged
    module is prepared to serve, the clock (a fake one in tests), and where canaries meet live batches."""

    registry: Registry
    bus: EventBus
    prepare: Prepare = lambda module, config: module  # as it is
    clock: Clock = time.monotonic
    canaries: Canaries = field(default_factory=Canaries)  # read by the batcher after each live batch
    traffic: Traffic = field(default_factory=NoTraffic)  # the batcher: canaries run on its inference thread


class ModelWorker(LoopThread):
    """Owns one model's reloads. The gate and the cache are touched only by its thread, or one it waits for."""

    def __init__(self, name: str, config: ModelConfig, source: CheckpointSource, shared: Shared) -> None:
        super().__init__(f"reload-{name}")
        self.name = name
        self.registry = shared.registry
        self._bus = shared.bus
        self._prepare = shared.prepare
        self._clock = shared.clock
        self._promotion = Promotion(
            name, shared.registry, shared.bus, shared.canaries, shared.traffic, shared.clock, self.rescan
        )
        self._idle = threading.Event()
        self._lock = threading.Lock()
        self._config = config  # guarded by _lock
        self._source = source  # guarded by _lock
        self._dirty = True  # guarded by _lock: a pass is owed regardless of deadlines
        self._found = Found((), None, LiveFile.NONE)  # guarded by _lock
        self._gate: Gate | None = None
        self._gate_config: ModelConfig | None = None  # the last config a gate was built for
        self._cache = CheckpointCache()
        self._source_error: str | None = None
        self._scores: dict[tuple[str, str], EvaluationResult | None] = {}  # (live sha256, set digest) -> its score
        self.passes = 0
        source.subscribe(self._changed)

    # -- called from other threads -------------------------------------------------------------

    def rescan(self) -> None:
        self._changed(True)

    def set_config(self, config: ModelConfig, source: CheckpointSource) -> None:
        with self._lock:
            self._config = config
            if source is not self._source:
                self._source = source
                source.subscribe(self._changed)
        self.rescan()

    @property
    def config(self) -> ModelConfig:
        with self._lock:
            return self._config

    @property
    def source(self) -> CheckpointSource:
        with self._lock:
            return self._source

    def stop(self) -> None:
        super().stop()
        self._promotion.end_canary()
        self._idle.set()  # it does no more work: whoever waits for it to be idle (a SIGHUP's reload) goes on

    @property
    def canary(self) -> Canary | None:
        return self._promotion.canary

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self._idle.wait(timeout)

    def found(self) -> Found:
        with self._lock:
            return self._found

    @property
    def reloading(self) -> bool:
        return not self._idle.is_set()

    def _changed(self, now: bool) -> None:
        with self._lock:
            self._dirty = self._dirty or now
            self._idle.clear()
        self.wake()

    # -- the worker thread -----------------------------------------------------------------------

    def setup(self) -> None:
        lower_thread_priority()

    def tick(self) -> float | None:
        if self._promotion.settle(self._cache, lambda path: self.source.take_arrival(path)):
            self.rescan()  # its file is live or rejected now: plan again
        with self._lock:
            source, dirty, self._dirty = self._source, self._dirty, False
        due, poll = source.next_due(), source.next_poll()
        if dirty or any(t is not None and t <= self._clock() for t in (due, poll)):
            self.passes += 1  # counted as it starts, so a swap seen from outside is already counted
            try:
                self._pass()
            except Exception as exc:  # a failing pass is recorded; it must never end the worker
                self._failed(exc)
        with self._lock:
            # Read under the lock an event's wake-up takes, so a deadline set meanwhile is not missed.
            due, poll = source.next_due(), source.next_poll()
            if not self._dirty and due is None:
                self._idle.set()  # a scheduled listing (`poll`) is not pending work
        wake_at = min((t for t in (due, poll) if t is not None), default=None)
        wait = None if wake_at is None else max(0.0, wake_at - self._clock())
        canary_wait = self._promotion.wait()
        return wait if canary_wait is None else min(canary_wait, math.inf if wait is None else wait)

    def _failed(self, exc: Exception) -> None:
        logger.exception("model %s: reload pass failed: %s: %s", self.name, type(exc).__name__, exc)
        self._bus.publish(ReloadFailed(self.name, f"{type(exc).__name__}: {exc}"))
        with self._lock:
            self._found = replace(self._found, error=f"reload pass failed: {type(exc).__name__}: {exc}")

    def _pass(self) -> None:
        with self._lock:
            config, source = self._config, self._source
        try:
            gate = self._current_gate(config)
        except ConfigError as exc:
            self._publish(source, Settled((), self._found.live_file, str(exc)))
            return
        listing = source.listing(self._clock(), signed=config.signature is not None)
        if listing.error != self._source_error:
            self._source_error = listing.error
            self._bus.publish(SourceStatus(self.name, source.location, listing.error))
        judged: dict[Path, tuple[FileStatus, str | None]] = {}
        while True:
            stop_if_asked("the rest of its reload pass is left undone")
            known, canary = self._cache.known(judged), self._promotion.shadowing(config)
            decision = plan(listing, self._serving(config), config.version, known, canary, config.max_checkpoint_bytes)
            if isinstance(decision, Settled):
                break
            self._idle.clear()  # a scheduled listing's pass too: `reloading` from its first file until it publishes
            path = decision.candidate.path
            if isinstance(decision, Hash):
                try:
                    self._cache.hash(decision.candidate, source.fetch(decision.candidate))
                except (OSError, FetchFailed):
                    live = self.registry.get(self.name)
                    if live is not None and live.path == path:
                        raise  # what serves cannot be told apart from what is on disk: fail the pass, retry
                    # Deleted or renamed since the listing: standby for now; its own event brings another pass.
                    judged[path] = (FileStatus.STANDBY, None)
                continue
            # A thread that ends with its verdict, and so does the OpenMP team its forward passes start (compute.py)
            verdict = on_own_thread(self._judge, gate, config, source, decision)
            if verdict is not None:
                judged[path] = verdict
        if not any(s is FileStatus.CANARY for _, s, _ in decision.files):
            self._promotion.end_canary()  # its file was deleted or changed, or a pin or a config moved on
        self._cache.keep_only(c.path for c in listing.candidates)
        self._publish(source, decision)
        live = self.registry.get(self.name)
        source.keep(None if live is None else live.path)

    def _serving(self, config: ModelConfig) -> Serving | None:
        live = self.registry.get(self.name)
        if live is None:
            return None
        current = same_definition(live.config, config)
        return Serving(live.path, live.version, live.report.mtime_ns or 0, live.sha256, current)

    def _current_gate(self, config: ModelConfig) -> Gate:
        if self._gate is None or self._gate_config != config:
            same = self._gate_config is not None and same_definition(self._gate_config, config)
            if not same:
                self._cache.forget_rejections()  # a file rejected under the old definition may fit the new one
            speeds = self._gate.speeds if same and self._gate is not None else None
            self._gate = None
            self._gate = Gate(self.name, config, self._prepare, speeds=speeds)
            self._gate_config = config
        return self._gate

    @hand_over()  # no serving pass between the gate's last pass and its swap
    def _judge(
        self, gate: Gate, config: ModelConfig, source: CheckpointSource, action: Judge
    ) -> tuple[FileStatus, str | None] | None:
        """Judge one file and act on the verdict: swap it in (None), or say why it does not serve."""
        cand = action.candidate
        try:
            local = source.fetch(cand)
        except FetchFailed as exc:  # the endpoint failed mid-pass: nothing was judged, the next listing retries
            return (FileStatus.INCOMPLETE, str(exc))
        judgement = gate.judge(local, source.name(cand.path), self._live_score(gate, config))
        # Left behind by its stop (in a hung read, say) and its model removed: no registry entry, no events, for it.
        stop_if_asked(f"{cand.path.name} was judged, but the verdict is not acted on")
        report = judgement.report
        unchanged = source.unchanged(cand)
        if report.sha256 is not None and unchanged:
            self._cache.remember(cand, report.sha256)
        still_written = not judgement.passed and cand.path in source.arriving(self._clock())
        if report.incomplete or report.short or not unchanged or still_written:
            # It failed on a file still changing, or a machine short of memory or disk: that says nothing of the file.
            reason = report.reason or "file changed while it was validated"
            source.retry(cand.path, self._clock(), SHORTAGE_RETRY_S if report.short and unchanged else None)
            self._bus.publish(CheckpointJudged(self.name, Outcome.INCOMPLETE, cand.path, reason, report))
            return (FileStatus.INCOMPLETE, reason)
        if not judgement.passed or (action.digest is not None and report.sha256 != action.digest):
            reason = report.reason or "file changed during validation"
            digest = action.digest
            if not judgement.passed:
                # Cached by content, so no later pass reads it again (a file torch cannot load has no
                # sha256 in its report: hash it now, once).
                try:
                    digest = report.sha256 or digest or self._cache.hash(cand, local)
                    self._cache.reject(digest, reason)
                except OSError:
                    pass
            source.take_arrival(cand.path)  # a rewrite of this path is a new arrival
            judged = CheckpointJudged(self.name, Outcome.REJECTED, cand.path, reason, report, sha256=digest)
            self._bus.publish(judged)
            return (FileStatus.REJECTED, reason)
        self._swap(config, source, cand.path, judgement)
        return None

    def _live_score(self, gate: Gate, config: ModelConfig) -> EvaluationResult | None:
        """The live version's score on this definition's evaluation set, computed once per sha256 and set."""
        live = self.registry.get(self.name)
        if gate.evaluation is None or live is None or live.config.labels != config.labels:
            return None  # nothing to compare with (other labels: other classes, not a regression)
        key = (live.sha256, gate.evaluation.spec.digest)
        if key not in self._scores:
            own = live.report.evaluation
            if own is not None and same_definition(live.config, config):
                score: EvaluationResult | None = replace(own, live_accuracy=None, live_recall=None)  # its gate
            else:
                score = gate.live_score(live.module)
            self._scores = {key: score}  # only the live version's is ever needed
        return self._scores[key]

    def _swap(self, config: ModelConfig, source: CheckpointSource, path: Path, judgement: Judgement) -> None:
        report = judgement.report
        assert judgement.module is not None and report.sha256 is not None
        new = LiveModel(
            self.name, config, report.version, report.sha256, path, judgement.module, judgement.preprocessor, report
        )
        self._promotion.passed(config, new, lambda: source.take_arrival(path))

    def _publish(self, source: CheckpointSource, settled: Settled) -> None:
        digest = self._cache.digest
        files = tuple(
            FileState(c.path, source.name(c.path), c.version, c.size, c.mtime_ns, digest(c.path), status, reason)
            for c, status, reason in settled.files
        )
        with self._lock:
            self._found = Found(files, settled.error, settled.live_file)
