"""The reload job of one model: decide which file should serve, validate it, swap it in.

One worker thread per model, so one reload runs per model at a time while different models reload
at once. Watcher events and rescans only mark work and wake the thread: bursts coalesce into one pass.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoints import Candidate, scan, sha256_file, stat_candidate
from .compute import lower_thread_priority
from .config import ModelConfig, WatchConfig
from .errors import ConfigError
from .memory import release
from .registry import LiveModel, Registry
from .settle import Settling
from .validation import Gate, ValidationReport

logger = logging.getLogger("reloader.jobs")

Clock = Callable[[], float]
Prepare = Callable[[torch.nn.Module, ModelConfig], torch.nn.Module]
MAX_EVENTS = 50


@dataclass(frozen=True)
class Outcome:
    """What one reconcile pass did, for hooks such as metrics and systemd status lines."""

    model: str
    kind: str  # "swapped", "rejected", "incomplete", "error"
    path: str | None
    reason: str | None
    report: ValidationReport | None


class ModelWorker:
    """Owns one model's reloads. All mutable state is touched by its own thread or under `_lock`."""

    def __init__(
        self,
        name: str,
        config: ModelConfig,
        registry: Registry,
        watch: WatchConfig,
        *,
        prepare: Prepare = lambda m, c: m,
        on_outcome: Callable[[Outcome], None] = lambda o: None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.name = name
        self.registry = registry
        self._prepare = prepare
        self._on_outcome = on_outcome
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._config = config
        self._gate: Gate | None = None
        self._gate_config: ModelConfig | None = None
        self._settling = Settling(watch)
        self._seen_at: dict[Path, float] = {}  # path -> when the watcher first reported it, for timings
        self._hashes: dict[Path, tuple[tuple[int, int, int], str]] = {}
        self._rejected: dict[str, str] = {}  # sha256 -> reason, for the current definition
        self._files: list[dict[str, Any]] = []
        self._error: str | None = None
        self._live_file: str = "none"
        self._dirty = True
        self.passes = 0
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self._thread = threading.Thread(target=self._run, name=f"reload-{name}", daemon=True)

    # -- called from other threads -------------------------------------------------------------

    def start(self) -> None:
        self._wake.set()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def rescan(self) -> None:
        with self._lock:
            self._dirty = True
            self._idle.clear()
            self._wake.set()

    def set_config(self, config: ModelConfig, watch: WatchConfig) -> None:
        with self._lock:
            self._config = config
            self._settling.watch = watch
        self.rescan()

    def file_event(self, path: Path, kind: str) -> None:
        """kind: "moved" (renamed into place), "closed" (after writing), "created", "written", or "deleted"."""
        now = self._clock()
        with self._lock:
            first = kind != "deleted" and path not in self._seen_at
            self._seen_at.setdefault(path, now)
            immediate = self._settling.event(path, kind, now)
            if kind == "deleted":
                self._seen_at.pop(path, None)
        if first:
            # One line per file arriving, not per event: a plain `cp` sends dozens of write events.
            logger.info(
                "model %s: checkpoint %s seen (%s)",
                self.name,
                path.name,
                kind,
                extra={"event": "checkpoint_seen", "model": self.name, "file": str(path), "how": kind},
            )
        with self._lock:
            # A file still settling only moves the next deadline; a pass now would find it unfinished.
            self._dirty = self._dirty or immediate
            self._idle.clear()
            self._wake.set()

    @property
    def folder(self) -> Path:
        with self._lock:
            return self._config.checkpoints

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self._idle.wait(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def describe(self) -> dict[str, Any]:
        live = self.registry.get(self.name)
        with self._lock:
            config, files, error, live_file = self._config, list(self._files), self._error, self._live_file
            events = list(self.events)
        return {
            "name": self.name,
            "state": "ready" if live is not None else "not ready",
            "live": None if live is None else {**live.describe(), "file": live_file, "report": live.report.to_dict()},
            "definition_current": live is None or same_definition(live.config, config),
            "error": error,
            "arch": config.arch,
            "num_classes": config.num_classes,
            "checkpoints": str(config.checkpoints),
            "version_policy": config.version,
            "files": files,
            "passes": self.passes,
            "reloading": not self._idle.is_set(),
            "events": events[::-1],
        }

    # -- the worker thread -----------------------------------------------------------------------

    def _run(self) -> None:
        lower_thread_priority()
        while not self._stop.is_set():
            self._wake.wait(self._until_next_due())
            if self._stop.is_set():
                break
            with self._lock:
                self._wake.clear()
                now = self._clock()
                due = self._dirty or self._settling.due_now(now)
                self._dirty = False
            if not due:
                continue
            self.passes += 1  # counted as it starts, so a swap seen from outside is already counted
            try:
                self._reconcile()
            except Exception as exc:  # a failing pass is recorded; it must never kill the worker
                logger.exception("model %s: reload pass failed: %s: %s", self.name, type(exc).__name__, exc)
                self._record("error", None, "error", f"{type(exc).__name__}: {exc}")
                with self._lock:
                    self._error = f"reload pass failed: {type(exc).__name__}: {exc}"
            with self._lock:
                if not self._dirty and not self._settling.waiting():
                    self._idle.set()

    def _until_next_due(self) -> float | None:
        with self._lock:
            due = self._settling.next_due()
        return None if due is None else max(0.0, due - self._clock())

    def unsettled(self, now: float) -> set[Path]:
        """Files still being written: events too recent, or written without a close yet."""
        with self._lock:
            return self._settling.unsettled(now)

    def _sha256(self, candidate: Candidate) -> str:
        cached = self._hashes.get(candidate.path)
        if cached is not None and cached[0] == candidate.signature:
            return cached[1]
        digest = sha256_file(candidate.path)
        self._hashes[candidate.path] = (candidate.signature, digest)
        return digest

    def _current_gate(self, config: ModelConfig) -> Gate:
        if self._gate is None or self._gate_config != config:
            if self._gate_config is None or not same_definition(self._gate_config, config):
                self._rejected.clear()  # a file rejected under the old definition may fit the new one
            self._gate = None
            self._gate = Gate(self.name, config, self._prepare)
            self._gate_config = config
        return self._gate

    def _reconcile(self) -> None:
        with self._lock:
            config = self._config
        try:
            gate = self._current_gate(config)
        except ConfigError as exc:
            self._set_status([], str(exc), self._live_file)
            return
        unsettled = self.unsettled(self._clock())
        live = self.registry.get(self.name)
        candidates = scan(config.checkpoints)
        folder_error = None if config.checkpoints.is_dir() else f"checkpoints folder {config.checkpoints} is missing"
        pool = candidates if config.version == "latest" else [c for c in candidates if c.version == config.version]
        by_path = {c.path: c for c in candidates}
        live_file = _live_file_state(live, by_path.get(live.path) if live else None, self._sha256)
        # A live model bounds the search: older files are standby, unless its file was deleted, the pin
        # moved off its version, or its definition changed (then everything must be re-validated).
        current = live is not None and same_definition(live.config, config)
        bound = None
        if live is not None and current and live_file != "deleted":
            if config.version in ("latest", live.version):
                bound = (live.version, live.report.mtime_ns or 0)
        status: dict[Path, tuple[str, str | None]] = {}
        swapped = False
        for cand in pool:
            if bound is not None and (cand.version, cand.mtime_ns) < bound:
                break
            if cand.path in unsettled:
                status[cand.path] = ("incomplete", "still being written")
                continue
            # A path never seen before goes straight to the gate, which hashes it as it loads: hashing it
            # here too would read the file twice on the way to going live. A path seen before is re-hashed
            # when its stat changed, so a rejected file touched but unchanged is not validated again.
            try:
                digest = self._sha256(cand) if cand.path in self._hashes else None
            except OSError:
                continue  # deleted or renamed since the scan; its own event brings another pass
            if digest is not None:
                if live is not None and current and digest == live.sha256 and cand.path == live.path:
                    break
                if digest in self._rejected:
                    status[cand.path] = ("rejected", self._rejected[digest])
                    continue
            new, report = gate.run(cand.path)
            unchanged = stat_candidate(cand.path) == cand
            if report.sha256 is not None and unchanged:
                self._hashes[cand.path] = (cand.signature, report.sha256)
            if report.incomplete or not unchanged or (not report.passed and self._still_written(cand)):
                reason = report.reason or "file changed while it was validated"
                status[cand.path] = ("incomplete", reason)
                self._retry_later(cand.path)
                self._record("incomplete", report, "incomplete", reason)
                continue
            if new is None or (digest is not None and report.sha256 != digest):
                reason = report.reason or "file changed during validation"
                if new is None:
                    # Cached by content, so no later pass re-reads it (a file torch cannot load has no
                    # sha256 in its report: hash it now, once).
                    try:
                        digest = report.sha256 or digest or self._sha256(cand)
                        self._rejected[digest] = reason
                    except OSError:
                        pass
                status[cand.path] = ("rejected", reason)
                with self._lock:
                    self._seen_at.pop(cand.path, None)  # a rewrite of this path is a new arrival
                self._record("rejected", report, "rejected", reason)
                logger.warning(
                    "model %s: rejected %s: %s",
                    self.name,
                    cand.path.name,
                    reason,
                    extra={
                        "event": "checkpoint_rejected",
                        "model": self.name,
                        "file": str(cand.path),
                        "sha256": digest,
                        "reason": reason,
                    },
                )
                continue
            self._swap(new, report)
            live, swapped, live_file, current = new, True, "present", True
            break
        error = folder_error
        if not swapped and live is not None and not current:
            error = "the changed definition has no valid checkpoint yet; the previous definition keeps serving"
        elif config.version != "latest" and (live is None or live.version != config.version):
            error = f"pinned version {config.version} has no valid checkpoint; " + (
                "nothing serves" if live is None else f"version {live.version} keeps serving"
            )
        elif live is None and not folder_error:
            error = "no valid checkpoint" if candidates else "no checkpoint files"
        files = [
            {
                "path": str(c.path),
                "version": c.version,
                "size": c.size,
                "mtime_ns": c.mtime_ns,
                "sha256": self._hashes.get(c.path, (None, None))[1],
                "status": _file_status(c, live, status),
                "reason": status.get(c.path, (None, None))[1],
            }
            for c in candidates
        ]
        # Forget files that are gone, so a daemon that sees thousands of checkpoints stays the same size.
        self._hashes = {p: h for p, h in self._hashes.items() if p in by_path}
        present = {digest for _, digest in self._hashes.values()}
        self._rejected = {d: r for d, r in self._rejected.items() if d in present}
        self._set_status(files, error, live_file)

    def _set_status(self, files: list[dict[str, Any]], error: str | None, live_file: str) -> None:
        with self._lock:
            self._files, self._error, self._live_file = files, error, live_file

    def _still_written(self, cand: Candidate) -> bool:
        """Write events arrived while it was validated: the failure says nothing about the finished file."""
        return cand.path in self.unsettled(self._clock())

    def _retry_later(self, path: Path) -> None:
        with self._lock:
            self._settling.retry(path, self._clock())

    def _swap(self, new: LiveModel, report: ValidationReport) -> None:
        checks = {c.name: c.ms for c in report.checks}
        logger.info(
            "model %s: %s passed validation (%s)",
            self.name,
            new.path.name,
            ", ".join(f"{name} {ms:.0f} ms" for name, ms in checks.items()),
            extra={
                "event": "checkpoint_validated",
                "model": self.name,
                "file": str(new.path),
                "sha256": new.sha256,
                "timings_ms": checks,
            },
        )
        previous = self.registry.swap(new)
        with self._lock:
            seen = self._seen_at.pop(new.path, None)
        timings = self._record("swapped", report, "live", None, seen)["timings_ms"]
        detected = timings.get("since_detected")
        logger.info(
            "model %s: version %s live (%s, sha256 %s) in %.0f ms%s, replacing %s",
            self.name,
            new.version,
            new.path.name,
            new.sha256[:12],
            report.total_ms,
            "" if detected is None else f", {detected:.0f} ms after it was seen",
            "nothing" if previous is None else f"version {previous.version}",
            extra={
                "event": "checkpoint_swapped",
                "model": self.name,
                "file": str(new.path),
                "version": new.version,
                "sha256": new.sha256,
                "previous_version": None if previous is None else previous.version,
                "timings_ms": timings,
            },
        )
        del previous  # requests still holding the old record finish on it, then it is freed
        release()

    def _record(
        self, event: str, report: ValidationReport | None, result: str, reason: str | None, seen: float | None = None
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {"time": time.time(), "event": event, "result": result, "reason": reason}
        if report is not None:
            entry["file"] = report.path
            entry["timings_ms"] = {c.name: c.ms for c in report.checks} | {"total": report.total_ms}
            if seen is not None:
                entry["timings_ms"]["since_detected"] = round((self._clock() - seen) * 1000.0, 3)
        with self._lock:
            self.events.append(entry)
        try:
            self._on_outcome(Outcome(self.name, event, entry.get("file"), reason, report))
        except Exception:  # a failing hook (metrics, notify) must not undo a swap or stop the worker
            logger.exception("model %s: outcome hook failed", self.name)
        return entry


def same_definition(a: ModelConfig, b: ModelConfig) -> bool:
    """Equal but for `version`: a pin moves between files of one definition, it does not change it."""
    return a.model_copy(update={"version": b.version}) == b


def _live_file_state(live: LiveModel | None, cand: Candidate | None, sha: Callable[[Candidate], str]) -> str:
    if live is None:
        return "none"
    if cand is None:
        return "deleted"
    return "present" if sha(cand) == live.sha256 else "replaced"


def _file_status(cand: Candidate, live: LiveModel | None, status: dict[Path, tuple[str, str | None]]) -> str:
    if cand.path in status:
        return status[cand.path][0]
    if live is not None and cand.path == live.path:
        return "live"
    return "standby"
