"""Filesystem events in, reload requests out. watchdog runs handlers on one dispatch thread, so the
handler only filters paths and hands them to the supervisor; loading happens on the model's worker."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

from .checkpoints import is_checkpoint_name
from .config import Config
from .supervisor import Supervisor

logger = logging.getLogger("reloader.watcher")


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        src = Path(_text(event.src_path))
        dest = Path(_text(event.dest_path)) if event.dest_path else None
        # Editors replace the file and ConfigMaps swap a `..data` link; other files in the folder are not ours.
        if any(self._watcher.is_config_path(p) for p in (src, dest)):
            if event.event_type not in ("opened", "closed_no_write"):
                self._watcher.supervisor.config_touched()
        if event.is_directory:
            return
        if isinstance(event, FileMovedEvent):
            self._checkpoint(src, "deleted")
            if dest is not None:
                self._checkpoint(dest, "moved")
        elif isinstance(event, FileClosedEvent):
            self._checkpoint(src, "closed")
        elif isinstance(event, FileCreatedEvent):
            self._checkpoint(src, "created")
        elif isinstance(event, FileModifiedEvent):
            self._checkpoint(src, "written")
        elif isinstance(event, FileDeletedEvent):
            self._checkpoint(src, "deleted")
        # opened / closed-without-write events come from readers (our own loads among them): ignored.

    def _checkpoint(self, path: Path, kind: str) -> None:
        if path.parent in self._watcher.folders and is_checkpoint_name(path.name):
            self._watcher.supervisor.file_event(path, kind)


def _text(path: str | bytes) -> str:
    return path.decode() if isinstance(path, bytes) else path


class Watcher:
    """Watches the config's folder and every model's checkpoints folder, following config edits."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.config_dir = supervisor.config_path.parent
        self.config_name = supervisor.config_path.name
        watch = supervisor.config.watch
        self.polling = watch.poll
        self._observer: BaseObserver = PollingObserver(timeout=watch.poll_interval) if watch.poll else Observer()
        self._handler = _Handler(self)
        self._lock = threading.Lock()
        self._watches: dict[Path, ObservedWatch] = {}
        self.folders: frozenset[Path] = frozenset()

    def is_config_path(self, path: Path | None) -> bool:
        return (
            path is not None
            and path.parent == self.config_dir
            and (path.name == self.config_name or path.name.startswith(".."))
        )

    def start(self) -> None:
        self._schedule(self.config_dir)
        self._follow(self.supervisor.config)
        self.supervisor.config_listeners.append(self._follow)
        self._observer.start()
        logger.info(
            "watching %s and %d checkpoint folder(s) with %s",
            self.config_dir,
            len(self.folders),
            "polling" if self.polling else "inotify",
        )

    def stop(self) -> None:
        self._observer.stop()
        if self._observer.is_alive():
            self._observer.join()

    def is_alive(self) -> bool:
        return self._observer.is_alive() and all(e.is_alive() for e in self._observer.emitters)

    def _schedule(self, folder: Path) -> bool:
        try:
            self._watches[folder] = self._observer.schedule(self._handler, str(folder), recursive=False)
        except OSError as exc:
            logger.warning("cannot watch %s: %s; it is rescanned on SIGHUP and config reloads", folder, exc)
            return False
        return True

    def _follow(self, config: Config) -> None:
        """Watch exactly the folders the current config names."""
        wanted = {model.checkpoints for model in config.models.values()}
        if config.watch.poll != self.polling:
            logger.warning("watch.poll changes take effect after a restart")
        with self._lock:
            for folder in set(self._watches) - wanted - {self.config_dir}:
                self._observer.unschedule(self._watches.pop(folder))
            for folder in wanted - set(self._watches):
                self._schedule(folder)
            self.folders = frozenset(f for f in wanted if f in self._watches)
