"""Keeps one reload worker and one source per configured model, and applies config edits as a diff."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from .bucket import BucketSource
from .config import Config, ModelConfig, load_config
from .errors import ConfigError
from .events import ConfigApplied, ConfigRejected
from .locations import S3Location
from .memory import release
from .settle import FileEvent
from .source import CheckpointSource, LocalFolder
from .status import EventLog, describe_model
from .threads import LoopThread
from .worker import ModelWorker, Shared

logger = logging.getLogger("reloader.supervisor")
MAX_CONFIG_DELAY_FACTOR = 5


class Supervisor(LoopThread):
    """Owner of the current config, the sources and the workers; the watcher and SIGHUP talk to it.

    Its own thread re-reads the config once a burst of edits is over."""

    PART = "reload workers"  # its name among the daemon's parts, as /healthz reports it

    def __init__(self, config: Config, shared: Shared) -> None:
        assert config.path is not None, "a Supervisor needs a config read from a file"
        super().__init__("config-reload")
        self.config_path: Path = config.path
        self.registry = shared.registry
        self._shared = shared
        self._bus = shared.bus
        self._clock = shared.clock
        self._events = EventLog()
        self._bus.subscribe(self._events)
        self._lock = threading.RLock()
        self._applying = threading.Lock()  # one config read and applied at a time; serving's reads take only _lock
        self._closing = False  # guarded by _lock: stop() has listed the workers to stop; no more start
        self.config = config  # guarded by _lock (replaced whole; readers take it once)
        self.config_error: str | None = None
        self.config_loaded_at = time.time()
        self._workers: dict[str, ModelWorker] = {}  # changed under _applying and _lock; read under either
        self._config_due: float | None = None  # guarded by _lock
        self._config_first_touch: float | None = None  # guarded by _lock

    def start(self) -> None:
        self._bus.publish(ConfigApplied(self.config, initial=True))
        with self._lock:
            for name, model in self.config.models.items():
                self._add(name, model, self._source(name, self.config))
        super().start()

    def stop(self) -> None:
        with self._lock:
            self._closing = True
        super().stop()
        for worker in self.workers():
            worker.stop()

    def wait_idle(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in self.workers():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not worker.wait_idle(left):
                return False
        return True

    def workers(self) -> list[ModelWorker]:
        with self._lock:
            return list(self._workers.values())

    def worker(self, name: str) -> ModelWorker | None:
        with self._lock:
            return self._workers.get(name)

    def is_alive(self) -> bool:
        return super().is_alive() and all(w.is_alive() for w in self.workers())

    def stuck(self) -> list[str]:
        """Reload threads whose work in progress has run past server.stuck_reload_s (what /healthz names)."""
        bound = self.config.server.stuck_reload_s
        busy = [(f"model {w.name!r}'s reload", w.busy_for()) for w in self.workers()]
        busy.append(("the config reload", self.busy_for()))
        return [f"{what} has run for {s:.0f} s (server.stuck_reload_s: {bound:g})" for what, s in busy if s > bound]

    # -- events --------------------------------------------------------------------------------

    def file_event(self, path: Path, kind: FileEvent) -> None:
        """Route a checkpoint file event to every model whose folder holds the file."""
        for source in self._folders():
            if source.folder == path.parent:
                source.file_event(path, kind)

    def rescan_folder(self, folder: Path) -> None:
        """A folder's watch was dropped or set anew (the folder went, came back, or was replaced): look again."""
        for worker in self.workers():
            source = worker.source
            if isinstance(source, LocalFolder) and source.folder == folder:
                worker.rescan()

    def config_touched(self) -> None:
        """Something changed in the config's folder: reload once the burst of events is over."""
        now = self._clock()
        debounce = self.config.watch.config_debounce_ms / 1000.0
        with self._lock:
            if self._config_first_touch is None:
                self._config_first_touch = now
            # Each event pushes the reload back, but never past a bound: a steady trickle of events
            # (a log file beside the config, say) must not postpone it forever.
            self._config_due = min(now + debounce, self._config_first_touch + MAX_CONFIG_DELAY_FACTOR * debounce)
        self.wake()

    def reload(self) -> bool:
        """Re-read the config now and rescan every model (SIGHUP). True when the config applied."""
        applied = self._reload_config(force=True)
        for worker in self.workers():
            worker.rescan()
        return applied

    def tick(self) -> float | None:
        with self._lock:
            due = self._config_due
            if due is None or due > self._clock():
                return None if due is None else max(0.0, due - self._clock())
            self._config_due = self._config_first_touch = None
        try:
            self._reload_config(force=False)
        except Exception:  # never let one bad reload end config watching
            logger.exception("config reload failed")
        return None

    def _folders(self) -> list[LocalFolder]:
        return [w.source for w in self.workers() if isinstance(w.source, LocalFolder)]

    def _reload_config(self, *, force: bool) -> bool:
        with self._applying:  # in the order read: a SIGHUP's reload and the watcher's, one config after the other
            try:
                new = load_config(self.config_path)
            except ConfigError as exc:
                with self._lock:
                    changed = self.config_error != str(exc)
                    self.config_error = str(exc)
                if changed or force:
                    self._bus.publish(ConfigRejected(self.config_path, str(exc)))
                return False
            old = self.config
            if new.digest == old.digest and not force and self.config_error is None:
                return True
            # Made or told outside _lock, which /healthz, /metrics and /models take on the event loop: a bucket's
            # source reads its cache's index, and deletes the checkpoints another location left there.
            sources = {
                name: self._source(name, new, worker.source if (worker := self._workers.get(name)) else None)
                for name, model in new.models.items()
                if name not in self._workers or old.models[name] != model or _sources_differ(old, new)
            }
            removed: list[tuple[str, ModelWorker]] = []
            try:
                with self._lock:
                    if self._closing:  # stop() has stopped the workers it found: start none it would not stop
                        return False
                    self.config, self.config_error, self.config_loaded_at = new, None, time.time()
                    removed = [(name, self._workers.pop(name)) for name in old.models.keys() - new.models.keys()]
                    self._apply(old, new, sources)
            finally:  # outside _lock too: a worker's stop waits up to 5 s for a reload stuck in a read, and every
                # request, predictions too, waited with it
                for name, worker in removed:
                    worker.stop()
                    self.registry.remove(name)
                    self._events.forget(name)
                    release()  # its memory goes back now (a GPU's too), as at a swap
                    logger.info("model %s: removed from the config and unloaded", name)
            self._bus.publish(ConfigApplied(new))
        return True

    def _apply(self, old: Config, new: Config, sources: dict[str, CheckpointSource]) -> None:
        """The new config's models' workers started, or told of their `sources`."""
        if (old.server.host, old.server.port) != (new.server.host, new.server.port):
            logger.warning("server.host/port changes take effect after a restart")
        for name, model in new.models.items():
            if name not in self._workers:
                self._add(name, model, sources[name])
                logger.info("model %s: added", name)
            elif name in sources:
                self._workers[name].set_config(model, sources[name])
                logger.info("model %s: definition changed; validating before it replaces the live one", name)

    def _source(self, name: str, config: Config, current: CheckpointSource | None = None) -> CheckpointSource:
        """The model's source: the current one, told the new settings, while the folder or prefix stays."""
        where, watch = config.models[name].checkpoints, config.watch
        if isinstance(where, S3Location):
            cache = config.cache_dir
            if isinstance(current, BucketSource) and (current.where, current.folder) == (where, cache / name):
                current.configure(watch, config.cache_keep)
                return current
            return BucketSource(name, where, watch, cache, config.cache_keep, self._bus, self._clock)
        if isinstance(current, LocalFolder) and current.folder == where:
            current.configure(watch)
            return current
        return LocalFolder(name, where, watch, self._bus, self._clock)

    def _add(self, name: str, model: ModelConfig, source: CheckpointSource) -> None:
        worker = ModelWorker(name, model, source, self._shared)
        self._workers[name] = worker
        worker.start()

    def describe(self) -> dict[str, Any]:
        with self._lock:
            config, error, loaded_at = self.config, self.config_error, self.config_loaded_at
        return {
            "config": {"path": str(self.config_path), "loaded_at": loaded_at, "sha256": config.digest, "error": error},
            "models": {w.name: self._describe(w) for w in self.workers()},
        }

    def describe_model(self, name: str) -> dict[str, Any] | None:
        worker = self.worker(name)
        return None if worker is None else self._describe(worker)

    def _describe(self, worker: ModelWorker) -> dict[str, Any]:
        return describe_model(worker, self.registry.get(worker.name), self._events.newest_first(worker.name))


def _sources_differ(old: Config, new: Config) -> bool:
    return (old.watch, old.cache_dir, old.cache_keep) != (new.watch, new.cache_dir, new.cache_keep)
