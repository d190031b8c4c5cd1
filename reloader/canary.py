"""The shadow canary: a candidate that passed the gate runs on copies of live traffic before it may serve.

Live requests are answered by the live version as always. After each live batch, the batcher hands the
canary the same preprocessed tensor and the live top-1 labels; the canary's own thread, at reload
priority, has the candidate run on it and counts agreements. The candidate's forward passes run on serving's
inference thread, in line with the live ones (batching.Batcher.on_inference_thread): a canary delays a live
answer by at most one of its own passes, and starts no second OpenMP team (compute.py, "one team"). While no
request of the model waits (queued, or still being decoded) every batch is shadowed; while requests wait,
shadowing may spend at most `max_overhead` of the serving forward time since the canary started, so under
saturation it still finishes, just more slowly. After `requests` comparisons it decides: promote when the
top-1 agreement is at least `min_agreement`, else reject. The worker that started it carries the decision out.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import Any, Protocol, TypeVar

import torch

from .compute import lower_thread_priority, run_forward
from .config import CanaryConfig
from .registry import LiveModel
from .threads import Stopping

logger = logging.getLogger("reloader.canary")
PENDING = 16  # batches waiting for the canary; more are dropped (they are only copies)
BUDGET_POLL_S = 0.005


class CanaryState(str, Enum):
    SHADOWING = "shadowing"
    PROMOTE = "promote"  # decided; the worker swaps it in
    REJECT = "reject"  # decided; the worker records the rejection


T = TypeVar("T")


class Traffic(Protocol):
    """What a canary needs of live serving (batching.Batcher)."""

    def pressure(self, name: str) -> tuple[int, float]:
        """(requests waiting for the model's forward pass, seconds of its serving forward passes so far)"""
        ...

    def on_inference_thread(self, fn: Callable[[], T]) -> T:
        """`fn()` on the inference thread, in line with serving's passes; Stopping once serving has stopped."""
        ...


class NoTraffic:
    """No serving to shadow (tests, and workers built without a server): passes run on the calling thread."""

    def pressure(self, name: str) -> tuple[int, float]:
        return 0, 0.0

    def on_inference_thread(self, fn: Callable[[], T]) -> T:
        return fn()


class Canary:
    """One candidate in shadow. Fed by the event loop (`offer`), run by its own thread, read by anyone."""

    def __init__(
        self, candidate: LiveModel, spec: CanaryConfig, traffic: Traffic, on_decided: Callable[[], None]
    ) -> None:
        self.candidate = candidate
        self.spec = spec
        self._traffic = traffic
        self._on_decided = on_decided
        self.started = time.monotonic()
        self.started_at = time.time()
        self.compared = 0
        self.agreed = 0
        self.dropped = 0
        self.shadow_seconds = 0.0
        self.state = CanaryState.SHADOWING
        self.reason: str | None = None
        self._serving_at_start = traffic.pressure(candidate.name)[1]
        self._pending: deque[tuple[torch.Tensor, list[int]]] = deque()
        self._ready = threading.Condition()
        self._stopped = False
        self._halt = threading.Event()  # set by stop(): a wait for budget ends at once
        self._thread = threading.Thread(target=self._run, name=f"canary-{candidate.name}", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        with self._ready:
            self._stopped = True
            self._pending.clear()
            self._ready.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    # -- fed from the event loop -----------------------------------------------------------------

    def offer(self, live: LiveModel, batch: torch.Tensor, probs: torch.Tensor) -> None:
        """A live batch and its answers; ignored unless the candidate shares the live definition."""
        if self.state is not CanaryState.SHADOWING or live.config.labels != self.candidate.config.labels:
            return
        with self._ready:
            if len(self._pending) >= PENDING:
                self.dropped += len(batch)
                return
            # Row by row, as v2.encode_output: no OpenMP team on the event loop's thread (compute.py)
            self._pending.append((batch, [int(row.argmax()) for row in probs]))
            self._ready.notify()

    # -- read by the worker and the status listing -------------------------------------------------

    @property
    def agreement(self) -> float | None:
        return None if self.compared == 0 else self.agreed / self.compared

    def expired(self, now: float) -> bool:
        return self.state is CanaryState.SHADOWING and now - self.started >= self.spec.max_wait_s

    @property
    def deadline(self) -> float:
        return self.started + self.spec.max_wait_s

    def time_out(self) -> None:
        """`max_wait_s` passed before `requests` comparisons: decide as `on_timeout` says."""
        self._decide(
            CanaryState.PROMOTE if self.spec.on_timeout == "promote" else CanaryState.REJECT,
            f"canary: {self.compared} of {self.spec.requests} requests compared in {self.spec.max_wait_s:g} s "
            f"(agreement {self._agreement_text()}); on_timeout: {self.spec.on_timeout}",
        )

    def describe(self) -> dict[str, Any]:
        agreement = self.agreement
        return {
            "version": self.candidate.version,
            "sha256": self.candidate.sha256,
            "path": self.candidate.report.path,
            "state": self.state.value,
            "compared": self.compared,
            "requests": self.spec.requests,
            "agreement": None if agreement is None else round(agreement, 4),
            "min_agreement": self.spec.min_agreement,
            "dropped": self.dropped,
            "shadow_seconds": round(self.shadow_seconds, 3),
            "started_at": self.started_at,
            "reason": self.reason,
        }

    # -- the canary's thread ---------------------------------------------------------------------

    def _run(self) -> None:
        lower_thread_priority()
        while True:
            with self._ready:
                while not self._pending and not self._stopped:
                    self._ready.wait()
                if self._stopped:
                    return
                batch, live_top1 = self._pending.popleft()
            if not self._wait_for_budget():
                return
            need = max(1, self.spec.requests - self.compared)  # no more than the decision needs
            batch, live_top1 = batch[:need], live_top1[:need]
            started = time.perf_counter()
            try:
                top1 = self._traffic.on_inference_thread(functools.partial(self._top1, batch))
            except Stopping:
                return
            except Exception as exc:  # a candidate that fails on live traffic is not one to promote
                self._decide(CanaryState.REJECT, f"canary: forward pass failed on live traffic: {exc}")
                return
            self.shadow_seconds += time.perf_counter() - started
            self.agreed += sum(a == b for a, b in zip(top1, live_top1, strict=True))
            self.compared += len(top1)
            if self.compared >= self.spec.requests:
                agreement = self.agreed / self.compared
                verdict = CanaryState.PROMOTE if agreement >= self.spec.min_agreement else CanaryState.REJECT
                sign = ">=" if verdict is CanaryState.PROMOTE else "<"
                self._decide(
                    verdict,
                    f"canary: top-1 agreement {agreement:.3f} {sign} {self.spec.min_agreement:g} "
                    f"over {self.compared} requests",
                )
                return

    def _top1(self, batch: torch.Tensor) -> list[int]:
        return run_forward(self.candidate.module, batch).argmax(dim=1).tolist()

    def _wait_for_budget(self) -> bool:
        """Under saturation, wait until shadowing is within `max_overhead` of serving time. False: stopped."""
        while not self._halt.is_set():
            waiting, serving = self._traffic.pressure(self.candidate.name)
            if waiting == 0 or self.shadow_seconds <= self.spec.max_overhead * (serving - self._serving_at_start):
                return True
            self._halt.wait(BUDGET_POLL_S)
        return False

    def _decide(self, state: CanaryState, reason: str) -> None:
        if self.state is not CanaryState.SHADOWING:
            return
        self.reason = reason
        self.state = state
        logger.debug("canary %s: %s", self.candidate.name, reason)
        self._on_decided()

    def _agreement_text(self) -> str:
        agreement = self.agreement
        return "-" if agreement is None else f"{agreement:.3f}"


class Canaries:
    """Each model's canary, if any: set by its worker, read by the batcher after every live batch."""

    def __init__(self) -> None:
        self._canaries: dict[str, Canary] = {}

    def get(self, name: str) -> Canary | None:
        return self._canaries.get(name)

    def set(self, name: str, canary: Canary | None) -> None:
        canaries = dict(self._canaries)  # replaced whole: readers on other threads see one or the other
        if canary is None:
            canaries.pop(name, None)
        else:
            canaries[name] = canary
        self._canaries = canaries
