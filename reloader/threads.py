"""The daemon's background loops, and the ordered list of parts that /healthz reads.

Every loop thread has the same life: start, wake it when there is work, stop it (which joins it), and
ask whether it still runs. A loop waits on an Event, never in `time.sleep`, so stop() is prompt.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import ParamSpec, Protocol, TypeVar

logger = logging.getLogger("reloader.threads")
# stop() waits this long for a tick in progress; a thread stuck past it (a read from a hung mount) is left
# behind, a daemon thread, so SIGTERM still ends the process.
STOP_WAIT_S = 5.0


class Stopping(BaseException):
    """Raised on a loop thread by work that ends early because the thread is asked to stop: a build in a child
    process (packages.package), which would otherwise hold the stop for as long as it compiles; a reload pass
    whose stop left it behind (worker.py), which acts on nothing more. A BaseException, as
    asyncio.CancelledError is: the `except Exception` that makes a failing check a rejection, or a failing form
    under `precision: auto` a reason to try the next, lets it by, so a stop is never read as a verdict on a
    checkpoint. The loop ends on it, with a line at INFO."""


_running = threading.local()
T = TypeVar("T")
P = ParamSpec("P")


def stop_asked() -> bool:
    """Whether the loop thread that calls is asked to stop; never on any other thread (the main thread:
    `reloader validate`)."""
    stop: threading.Event | None = getattr(_running, "stop", None)
    return stop is not None and stop.is_set()


def stop_if_asked(why: str) -> None:
    """Raise Stopping, saying `why`, where the loop thread that calls is asked to stop."""
    if stop_asked():
        raise Stopping(why)


def on_own_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`fn(*args, **kwargs)` on a new thread that ends with it, the calling thread waiting: what it returns, or
    what it raises. For torch work that spreads over the cores off the inference thread (a reload's gate): the
    OpenMP team torch starts for a thread lasts as long as the thread (compute.py, "one team"). The new thread
    has the caller's name and, on Linux, its priority; stop_if_asked reads the caller's stop."""
    stop = getattr(_running, "stop", None)
    outcome: list[T] = []
    raised: list[BaseException] = []

    def run() -> None:
        _running.stop = stop
        try:
            outcome.append(fn(*args, **kwargs))
        except BaseException as exc:  # Stopping included: the caller raises it
            raised.append(exc)

    thread = threading.Thread(target=run, name=threading.current_thread().name, daemon=True)
    thread.start()
    thread.join()
    if raised:
        raise raised.pop()
    return outcome[0]


class LoopThread:
    """A daemon thread that calls `tick()` whenever it is woken, or when the wait `tick()` asked for ends.

    `tick()` returns how long to wait before the next tick (None: until woken). It runs once at start."""

    def __init__(self, name: str) -> None:
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._busy_since: float | None = None  # monotonic start of the tick in progress

    def start(self) -> None:
        self._wake.set()
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(STOP_WAIT_S)
            if self._thread.is_alive():
                logger.warning(
                    "%s did not stop within %.0f s (its work has run for %.0f s); leaving it behind",
                    self._thread.name,
                    STOP_WAIT_S,
                    self.busy_for(),
                )

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def busy_for(self) -> float:
        """How long the tick in progress has run (0 while the thread waits)."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    def setup(self) -> None:
        """Runs first, on the thread itself."""

    def tick(self) -> float | None:
        raise NotImplementedError

    def _run(self) -> None:
        _running.stop = self._stop
        self.setup()
        wait: float | None = None
        while True:
            self._wake.wait(wait)
            if self._stop.is_set():
                return
            # Cleared before the work, so a wake that arrives during it brings another tick.
            self._wake.clear()
            self._busy_since = time.monotonic()
            try:
                wait = self.tick()
            except Stopping as exc:
                logger.info("%s stops: %s", self._thread.name, exc)
                return
            finally:
                self._busy_since = None


class Part(Protocol):
    """Something the daemon starts, stops, and watches for liveness."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def is_alive(self) -> bool: ...


class Parts:
    """The daemon's parts in start order: each started by name, all stopped in reverse, named when dead."""

    def __init__(self, parts: Sequence[tuple[str, Part]]) -> None:
        self._parts = tuple(parts)

    def start(self, name: str) -> None:
        dict(self._parts)[name].start()

    def stop(self) -> None:
        """Stop every part, last first (stopping a part that never started is a no-op)."""
        for _, part in reversed(self._parts):
            part.stop()

    def dead(self) -> list[str]:
        """The parts whose threads are not running, last started first (as they are stopped)."""
        return [name for name, part in reversed(self._parts) if not part.is_alive()]
