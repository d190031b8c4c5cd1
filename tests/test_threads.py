"""threads.on_own_thread: what a reload judges runs on a thread that ends with it (reloader/compute.py, "one team")."""

from __future__ import annotations

import threading

import pytest
from conftest import DEADLINE, wait_until

from reloader.threads import LoopThread, Stopping, on_own_thread, stop_asked, stop_if_asked


def test_it_returns_what_the_call_returns_and_raises_what_it_raises_from_a_thread_that_has_ended():
    ran_on: list[threading.Thread] = []

    def add(x: int, *, y: int) -> int:
        ran_on.append(threading.current_thread())
        return x + y

    assert on_own_thread(add, 2, y=3) == 5
    assert ran_on[0] is not threading.current_thread() and not ran_on[0].is_alive()
    assert ran_on[0].name == threading.current_thread().name  # named after its caller
    with pytest.raises(ValueError, match="bad file"):
        on_own_thread(lambda: (_ for _ in ()).throw(ValueError("bad file")))


class _Judging(LoopThread):
    """A loop whose tick judges on a thread of its own, until it is asked to stop."""

    def __init__(self) -> None:
        super().__init__("judging")
        self.started = threading.Event()
        self.saw_stop: list[bool] = []
        self.raised: list[Stopping] = []

    def tick(self) -> float | None:
        def judge() -> None:
            self.started.set()
            wait_until(stop_asked, what="the loop's stop, read on the judging thread")
            self.saw_stop.append(True)
            stop_if_asked("the judging is left undone")

        try:
            on_own_thread(judge)
        except Stopping as exc:
            self.raised.append(exc)
            raise
        return None


def test_the_callers_stop_reaches_the_thread_and_its_stopping_ends_the_callers_loop():
    loop = _Judging()
    loop.start()
    assert loop.started.wait(DEADLINE)
    loop.stop()  # joins the loop, which ends on the Stopping its judging thread raised
    assert loop.saw_stop == [True] and not loop.is_alive()
    assert [str(exc) for exc in loop.raised] == ["the judging is left undone"]
