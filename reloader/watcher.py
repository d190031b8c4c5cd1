"""Filesystem events in, reload requests out. watchdog runs handlers on one dispatch thread, so the
handler only filters paths and hands them to the supervisor; loading happens on the model's worker.

A watch ends when its folder is deleted (watchdog's emitter stops on IN_DELETE_SELF, or when a poll
finds the folder gone), and an inotify watch follows its folder when it is renamed away, so another
folder moved into its place (or a symlink pointed elsewhere) goes unwatched. A repair loop notices
both, watches whatever folder is at the path once there is one, and has it rescanned; a folder
missing at start is picked up the same way.
"""

from __future__ import annotations

import logging
import os
import stat
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

from .checkpoints import is_checkpoint_name, is_signature_name
from .config import Config
from .events import ConfigApplied, Event, EventBus
from .settle import FileEvent
from .supervisor import Supervisor
from .threads import LoopThread

logger = logging.getLogger("reloader.watcher")

# How often the repair loop looks for ended watches and folders that came back.
REPAIR_INTERVAL_S = 0.5


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
            self._checkpoint(src, FileEvent.DELETED)
            if dest is not None:
                self._checkpoint(dest, FileEvent.MOVED)
        elif isinstance(event, FileClosedEvent):
            self._checkpoint(src, FileEvent.CLOSED)
        elif isinstance(event, FileCreatedEvent):
            self._checkpoint(src, FileEvent.CREATED)
        elif isinstance(event, FileModifiedEvent):
            self._checkpoint(src, FileEvent.WRITTEN)
        elif isinstance(event, FileDeletedEvent):
            self._checkpoint(src, FileEvent.DELETED)
        # opened / closed-without-write events come from readers (our own loads among them): ignored.

    def _checkpoint(self, path: Path, kind: FileEvent) -> None:
        if path.parent in self._watcher.folders and is_checkpoint_name(path.name):
            self._watcher.supervisor.file_event(path, kind)
        elif path.parent in self._watcher.signed_folders and is_signature_name(path.name):
            # A checkpoint's .sig (only where its model requires signatures): its source judges the checkpoint
            # when the .sig lands, and holds it while the .sig is being written.
            self._watcher.supervisor.file_event(path, kind)


def _text(path: str | bytes) -> str:
    return path.decode() if isinstance(path, bytes) else path


class Watcher(LoopThread):
    """Watches the config's folder and every model's checkpoints folder, following config edits.

    Its own thread is the repair loop; watchdog's observer runs the handler on a thread of its own."""

    PART = "file watcher"  # its name among the daemon's parts, as /healthz reports it

    def __init__(self, supervisor: Supervisor, bus: EventBus) -> None:
        super().__init__("watch-repair")
        self.supervisor = supervisor
        self._bus = bus
        self.config_dir = supervisor.config_path.parent
        self.config_name = supervisor.config_path.name
        watch = supervisor.config.watch
        self.polling = watch.poll
        self._observer: BaseObserver = PollingObserver(timeout=watch.poll_interval) if watch.poll else Observer()
        self._handler = _Handler(self)
        self._lock = threading.Lock()
        self._watches: dict[Path, ObservedWatch] = {}
        self._identities: dict[Path, tuple[int, int] | None] = {}  # (st_dev, st_ino) of what each watch watches
        self._wanted: frozenset[Path] = frozenset()
        self._unwatchable: set[Path] = set()  # already logged as missing or failing
        self.folders: frozenset[Path] = frozenset()
        self.signed_folders: frozenset[Path] = frozenset()  # of models that require signatures

    def is_config_path(self, path: Path | None) -> bool:
        return (
            path is not None
            and path.parent == self.config_dir
            and (path.name == self.config_name or path.name.startswith(".."))
        )

    def start(self) -> None:
        # Started first: an observer that starts with a watch on a missing folder raises from start().
        self._observer.start()
        self._schedule(self.config_dir)
        self._follow(self.supervisor.config)
        self._bus.subscribe(self._on_event)
        super().start()
        logger.info(
            "watching %s and %d checkpoint folder(s) with %s",
            self.config_dir,
            len(self.folders),
            "polling" if self.polling else "inotify",
        )

    def stop(self) -> None:
        super().stop()
        self._observer.stop()
        if self._observer.is_alive():
            self._observer.join()

    def is_alive(self) -> bool:
        """The dispatch thread and the repair loop run; a deleted folder's ended watch is the loop's to mend."""
        return self._observer.is_alive() and super().is_alive()

    def _schedule(self, folder: Path) -> bool:
        # Read before scheduling: if the folder is replaced in between, the next repair sees a mismatch.
        self._identities[folder] = _identity(folder)
        try:
            self._watches[folder] = self._observer.schedule(self._handler, str(folder), recursive=False)
        except OSError as exc:
            if folder not in self._unwatchable:
                logger.warning("cannot watch %s: %s; watching it as soon as it can be", folder, exc)
                self._unwatchable.add(folder)
            return False
        if folder in self._unwatchable:
            logger.info("watching %s again", folder)
            self._unwatchable.discard(folder)
        return True

    def tick(self) -> float:
        try:
            changed = self._repair()
        except Exception:  # never let one failed repair end the loop that keeps the daemon healthy
            logger.exception("repairing folder watches failed")
            return REPAIR_INTERVAL_S
        for folder in changed:
            if folder == self.config_dir:
                self.supervisor.config_touched()
            self.supervisor.rescan_folder(folder)
        return REPAIR_INTERVAL_S

    def _repair(self) -> list[Path]:
        """Drop watches whose folder went away or was replaced, and watch what is at the path now.

        Returns the folders to rescan: events still queued from a dropped watch are dropped with it."""
        changed: list[Path] = []
        with self._lock:
            running = {e.watch for e in set(self._observer.emitters) if e.is_alive()}
            for folder in sorted(self._wanted | {self.config_dir}):
                watch = self._watches.get(folder)
                now = _identity(folder)
                if watch is not None and watch in running and now == self._identities.get(folder):
                    continue
                if watch is not None:
                    self._observer.unschedule(self._watches.pop(folder))
                    changed.append(folder)
                    if now is None:
                        logger.warning("%s is gone; watching it again when it comes back", folder)
                        self._unwatchable.add(folder)
                    else:
                        logger.warning("%s is another folder now; watching that one", folder)
                if now is not None and self._schedule(folder) and folder not in changed:
                    changed.append(folder)
        return changed

    def _on_event(self, event: Event) -> None:
        if isinstance(event, ConfigApplied):
            self._follow(event.config)

    def _follow(self, config: Config) -> None:
        """Watch exactly the folders the current config names."""
        # A bucket is listed by its own source; only folders on this machine are watched.
        wanted = {m.checkpoints for m in config.models.values() if isinstance(m.checkpoints, Path)}
        if config.watch.poll != self.polling:
            logger.warning("watch.poll changes take effect after a restart")
        with self._lock:
            self._wanted = frozenset(wanted)
            self._unwatchable &= wanted | {self.config_dir}
            for folder in set(self._watches) - wanted - {self.config_dir}:
                self._observer.unschedule(self._watches.pop(folder))
                self._identities.pop(folder, None)
            for folder in wanted - set(self._watches):
                self._schedule(folder)
            # Not only the watched ones: events a folder's watch queued before it ended must get through.
            self.folders = self._wanted
            self.signed_folders = frozenset(
                m.checkpoints for m in config.models.values() if isinstance(m.checkpoints, Path) and m.signature
            )


def _identity(folder: Path) -> tuple[int, int] | None:
    """Which directory the path names now (through symlinks), or None when it names none."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None
