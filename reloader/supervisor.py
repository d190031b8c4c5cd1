"""Keeps one reload worker per configured model, and applies config edits as a diff."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import Config, load_config
from .errors import ConfigError
from .jobs import Clock, ModelWorker, Outcome, Prepare
from .registry import Registry

logger = logging.getLogger("reloader.supervisor")
MAX_CONFIG_DELAY_FACTOR = 5


class Supervisor:
    """Owner of the current config and the workers; the watcher and SIGHUP talk to it, nothing else."""

    def __init__(
        self,
        config: Config,
        registry: Registry | None = None,
        *,
        prepare: Prepare = lambda m, c: m,
        on_outcome: Callable[[Outcome], None] = lambda o: None,
        on_config: Callable[[Config | None, str | None], None] = lambda c, e: None,
        clock: Clock = time.monotonic,
    ) -> None:
        assert config.path is not None, "a Supervisor needs a config read from a file"
        self.config = config
        self.registry = registry or Registry()
        self.config_error: str | None = None
        self.config_loaded_at = time.time()
        self._prepare = prepare
        self._on_outcome = on_outcome
        self._on_config = on_config
        self._clock = clock
        self._lock = threading.RLock()
        self._workers: dict[str, ModelWorker] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._config_due: float | None = None
        self._config_first_touch: float | None = None
        self._thread = threading.Thread(target=self._run, name="config-reload", daemon=True)
        self.config_listeners: list[Callable[[Config], None]] = []

    @property
    def config_path(self) -> Path:
        assert self.config.path is not None
        return self.config.path

    def start(self) -> None:
        self._log_loaded(self.config)
        with self._lock:
            for name, model in self.config.models.items():
                self._add(name, model)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
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
        return self._thread.is_alive() and all(w.is_alive() for w in self.workers())

    # -- events --------------------------------------------------------------------------------

    def file_event(self, path: Path, kind: str) -> None:
        """Route a checkpoint file event to every model whose folder holds the file."""
        for worker in self.workers():
            if worker.folder == path.parent:
                worker.file_event(path, kind)

    def rescan_folder(self, folder: Path) -> None:
        """A folder's watch was dropped or set anew (the folder went, came back, or was replaced): look again."""
        for worker in self.workers():
            if worker.folder == folder:
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
        self._wake.set()

    def reload(self) -> bool:
        """Re-read the config now and rescan every model (SIGHUP). True when the config applied."""
        applied = self._reload_config(force=True)
        for worker in self.workers():
            worker.rescan()
        return applied

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                due = self._config_due
            self._wake.wait(None if due is None else max(0.0, due - self._clock()))
            self._wake.clear()
            if self._stop.is_set():
                break
            with self._lock:
                if self._config_due is None or self._config_due > self._clock():
                    continue
                self._config_due = None
                self._config_first_touch = None
            try:
                self._reload_config(force=False)
            except Exception:  # never let one bad reload end config watching
                logger.exception("config reload failed")

    def _reload_config(self, *, force: bool) -> bool:
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            with self._lock:
                changed = self.config_error != str(exc)
                self.config_error = str(exc)
            if changed or force:
                logger.error(
                    "config rejected, the running config stays: %s",
                    exc,
                    extra={"event": "config_rejected", "config": str(self.config_path), "error": str(exc)},
                )
                self._on_config(None, str(exc))
            return False
        with self._lock:
            if new.digest == self.config.digest and not force and self.config_error is None:
                return True
            old, self.config = self.config, new
            self.config_error = None
            self.config_loaded_at = time.time()
            self._apply(old, new)
        self._log_loaded(new)
        self._on_config(new, None)
        for listener in self.config_listeners:
            listener(new)
        return True

    def _log_loaded(self, config: Config) -> None:
        logger.info(
            "config loaded from %s: models %s",
            config.path,
            ", ".join(config.models) or "(none)",
            extra={"event": "config_loaded", "config": str(config.path), "models": list(config.models)},
        )

    def _apply(self, old: Config, new: Config) -> None:
        if (old.server.host, old.server.port) != (new.server.host, new.server.port):
            logger.warning("server.host/port changes take effect after a restart")
        for name in old.models.keys() - new.models.keys():
            worker = self._workers.pop(name)
            worker.stop()
            self.registry.remove(name)
            logger.info("model %s: removed from the config and unloaded", name)
        for name, model in new.models.items():
            if name not in self._workers:
                self._add(name, model)
                logger.info("model %s: added", name)
            elif old.models[name] != model or old.watch != new.watch:
                self._workers[name].set_config(model, new.watch)
                logger.info("model %s: definition changed; validating before it replaces the live one", name)

    def _add(self, name: str, model: Any) -> None:
        worker = ModelWorker(
            name,
            model,
            self.registry,
            self.config.watch,
            prepare=self._prepare,
            on_outcome=self._on_outcome,
            clock=self._clock,
        )
        self._workers[name] = worker
        worker.start()

    def describe(self) -> dict[str, Any]:
        return {
            "config": {
                "path": str(self.config_path),
                "loaded_at": self.config_loaded_at,
                "sha256": self.config.digest,
                "error": self.config_error,
            },
            "models": {w.name: w.describe() for w in self.workers()},
        }
