"""The daemon: wires supervisor, watcher, batcher and HTTP app together, and runs them under uvicorn."""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from types import FrameType

import uvicorn

from . import openapi, optimize, scratch
from .app import Service, build_app
from .batching import Batcher
from .canary import Canaries
from .checkpoints import check_environment
from .config import Config
from .connections import bounded_protocol
from .events import CheckpointJudged, ConfigRejected, Event, EventBus, Outcome
from .logs import log_event
from .metrics import Metrics, RequestMetrics
from .notify import Notifier
from .registry import Registry
from .supervisor import Supervisor
from .threads import Parts
from .v2 import v2_routes
from .watcher import Watcher
from .worker import Shared

logger = logging.getLogger("reloader.server")


# The hooks overridden here (capture_signals, handle_exit, startup, on_tick) and the attributes read
# (should_exit, force_exit, started) are uvicorn internals, not public API: tests/test_uvicorn_contract.py
# fails when a uvicorn release changes them, and pyproject.toml bounds uvicorn to the series it passed on.
class _Server(uvicorn.Server):
    """uvicorn, plus SIGHUP, systemd notifications and watchdog pings, and exit 0 on SIGTERM."""

    def __init__(self, config: uvicorn.Config, daemon: Daemon) -> None:
        super().__init__(config)
        self.daemon = daemon
        self._last_ping = 0.0

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises SIGTERM after shutdown, which would end the process with 143 instead of 0.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self.daemon.on_sighup)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            logger.warning("second %s: exiting without waiting for requests in flight", signal.Signals(sig).name)
            self.force_exit = True
            return
        logger.info(
            "%s received: finishing requests in flight, then exiting",
            signal.Signals(sig).name,
            extra={"event": "stopping", "signal": signal.Signals(sig).name},
        )
        self.daemon.notifier.stopping()
        self.should_exit = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.daemon.notifier.ready(self.daemon.summary())

    async def on_tick(self, counter: int) -> bool:
        # Pings come from the event loop itself, so a stuck loop or a dead watcher stops them.
        interval = self.daemon.notifier.watchdog_interval
        now = time.monotonic()
        if interval is not None and now - self._last_ping >= interval and not self.daemon.dead_parts():
            self.daemon.notifier.watchdog()
            self._last_ping = now
        return await super().on_tick(counter)


class Daemon:
    """One process serving one config file: its parts, wired by one event bus."""

    def __init__(
        self,
        config: Config,
        *,
        host: str | None = None,
        port: int | None = None,
        access_log: bool | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        check_environment()
        self.notifier = notifier or Notifier()
        self.bus = EventBus()
        self.registry = Registry()
        # Subscribed in this order: the status listing (the supervisor's), metrics and systemd's status
        # line are up to date by the time a log line tells a reader to look.
        self.metrics = Metrics()
        canaries = Canaries()
        self.batcher = Batcher(current=self.registry.get, on_batch=self.metrics.batch_done, shadow=canaries.get)
        prepare = optimize.prepare_module
        shared = Shared(self.registry, self.bus, prepare, canaries=canaries, traffic=self.batcher)
        self.supervisor = Supervisor(config, shared)
        self.bus.subscribe(self.metrics.on_event)
        self.bus.subscribe(self._on_event)
        self.bus.subscribe(log_event)
        self.watcher = Watcher(self.supervisor, self.bus)
        # In start order; stopped in reverse, and /healthz names the ones whose threads ended.
        self.parts = Parts([(Supervisor.PART, self.supervisor), (Watcher.PART, self.watcher)])
        self.metrics.observe(self.supervisor, self.batcher, self.dead_parts)
        self.service = Service(self.supervisor, self.batcher, self.dead_parts)
        self.app = build_app(self.service, [*v2_routes(self.service), self.metrics.route(), openapi.route()])
        self.app.add_middleware(RequestMetrics, metrics=self.metrics, models=lambda: self.supervisor.config.models)
        server = config.server
        self.server = _Server(
            uvicorn.Config(
                self.app,
                host=host or server.host,
                port=server.port if port is None else port,
                access_log=server.access_log if access_log is None else access_log,
                log_config=None,
                lifespan="off",
                # httptools, with a read deadline, a cap on connections and JSON errors (connections.py).
                http=bounded_protocol(lambda: self.supervisor.config.server),
                # uvicorn annotates an int but hands it to asyncio.wait_for, which takes seconds as a float.
                timeout_graceful_shutdown=server.shutdown_timeout_s,  # type: ignore[arg-type]
            ),
            self,
        )

    def dead_parts(self) -> list[str]:
        """What /healthz, the watchdog pings and reloader_up go by: parts whose threads ended or are stuck."""
        return self.parts.dead() + self.supervisor.stuck()

    def summary(self) -> str:
        live = self.registry.snapshot()
        names = self.supervisor.config.models
        parts = [f"{n} v{live[n].version}" if n in live else f"{n} not ready" for n in names]
        return "serving " + (", ".join(parts) or "no models")

    def on_sighup(self, sig: int, frame: FrameType | None) -> None:
        # Signal handlers run on the event loop's thread: do the reload elsewhere.
        threading.Thread(target=self._reload, name="sighup-reload", daemon=True).start()

    def _reload(self) -> None:
        logger.info("SIGHUP: re-reading the config and rescanning checkpoints", extra={"event": "reload"})
        self.notifier.reloading()
        self.supervisor.reload()
        self.supervisor.wait_idle(timeout=300)
        self.notifier.ready(self.summary())

    def _on_event(self, event: Event) -> None:
        """systemd's status line follows swaps, rejections and rejected configs."""
        if isinstance(event, CheckpointJudged) and event.outcome in (Outcome.SWAPPED, Outcome.REJECTED):
            what = "live" if event.outcome is Outcome.SWAPPED else f"rejected ({event.reason})"
            self.notifier.status(f"{event.model}: {event.path.name} {what}; {self.summary()}")
        elif isinstance(event, ConfigRejected):
            self.notifier.status(f"config rejected: {event.error}")

    def run(self) -> int:
        """Load every model, then serve until SIGTERM/SIGINT. Returns the exit code."""
        logger.info(
            "reloader starting with %s",
            self.supervisor.config_path,
            extra={"event": "start", "config": str(self.supervisor.config_path)},
        )
        for path, size in scratch.sweep():
            logger.warning(
                "removed %s (%.1f MiB), left by a reloader process that died",
                path,
                size / 2**20,
                extra={"event": "swept", "path": str(path), "bytes": size},
            )
        # Outside the try: Ctrl-C during a long initial load exits at once, without joining the workers.
        self.parts.start(Supervisor.PART)
        self.supervisor.wait_idle()
        # Everything allocated so far (torch, the models' modules) lives as long as the process: keep
        # it out of the collector, so the gc.collect() after each swap takes milliseconds, not 150.
        gc.freeze()
        logger.info("initial load done: %s", self.summary(), extra={"event": "loaded"})
        optimize.SERVING.set()  # a compile not done yet runs in a child process from now on
        try:
            self.parts.start(Watcher.PART)
            self.server.run()
        finally:
            self.parts.stop()
            self.batcher.close()
            self.service.close()
            self.notifier.close()
        code = 1 if self.server.force_exit else 0
        logger.info("reloader stopped (exit %d)", code, extra={"event": "stop", "exit_code": code})
        return code
