"""Dynamic batching: concurrent requests for one model share a forward pass on one inference thread.

There is one forward pass at a time in the process, so torch's intra-op threads use every core and are
never oversubscribed by parallel passes. A batch forms from whatever queued while the previous pass
ran. Where it is not full and other requests for that model are still being decoded, it waits for them,
at most `max_wait_ms` from when the inference thread came free (or from its first request, if later):
under load, a request whose decoding the last pass delayed joins the next one instead of waiting a whole
pass more, and a lone request never waits.

A request is bound to the live version when it is admitted, and may move to a newer one while it still
waits, in the queue or for its pass's turn at the forward lock: once a swap is done, no forward pass
starts on the version it replaced. Only requests that allow it move (one image, no version asked for),
and only to a version of the same model definition, so their preprocessing, labels and number of
classes still hold.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch

from .compute import name_thread, run_forward, turn
from .errors import NoFiniteAnswer, OutOfDeviceMemory, Overloaded, RequestTimedOut, out_of_memory
from .images import stack_images
from .registry import LiveModel
from .threads import Stopping

T = TypeVar("T")


class Shadow(Protocol):
    """A candidate run on copies of live batches (canary.Canary)."""

    def offer(self, live: LiveModel, batch: torch.Tensor, probs: torch.Tensor) -> None: ...


@dataclass(eq=False)
class _Item:
    live: LiveModel
    tensor: torch.Tensor
    follow: bool
    future: asyncio.Future[tuple[torch.Tensor, LiveModel]]
    enqueued: float = field(default_factory=time.perf_counter)


def forward(
    live: LiveModel, batch: torch.Tensor, newest: Callable[[], LiveModel | None] | None = None
) -> tuple[torch.Tensor, LiveModel]:
    """Probabilities for a batch of preprocessed images, and the record that computed them: `live`, or the
    version `newest` finds live once the pass has its turn, where the batch may move (`newest` given)."""
    try:
        with turn():
            # A gate's last pass kept its turn for its swap (compute.hand_over): the pass after it is the new version's.
            live = _moved(live, newest() if newest is not None else None)
            return run_forward(live.module, batch).float().softmax(dim=1), live
    except Exception as exc:
        if not out_of_memory(exc):  # out of memory (a trainer on the same GPU, say) is no fault of the request
            raise
    # Raised out of the except block: the memory error's traceback holds the forward's frames, and with them its
    # tensors on the device, which the next batch needs freed.
    raise OutOfDeviceMemory(f"{live.name!r} ran out of memory for a batch of {len(batch)}; retry")


def stacked_forward(
    live: LiveModel, tensors: list[torch.Tensor], newest: Callable[[], LiveModel | None] | None
) -> tuple[torch.Tensor, LiveModel, torch.Tensor]:
    """`forward` on the images stacked into one batch, here on the inference thread and not on the event loop:
    while serving, no other thread runs torch work that spreads over the cores (compute.py, "one team").
    Returns the batch too, for a canary to run on."""
    batch = stack_images(tensors)
    probs, live = forward(live, batch, newest)
    return probs, live, batch


def _moved(live: LiveModel, newest: LiveModel | None) -> LiveModel:
    """The version a request bound to `live` may move to: a newer one of the same definition."""
    return newest if newest is not None and newest is not live and newest.config == live.config else live


def answer(live: LiveModel, row: torch.Tensor) -> tuple[torch.Tensor, LiveModel]:
    """One image's probabilities; NoFiniteAnswer where the live version gave NaN or inf (an fp16 form that
    overflowed on this image, say: the gate checks its own images only). The batch's other images are answered."""
    if not bool(torch.isfinite(row).all()):
        raise NoFiniteAnswer(f"version {live.version} of {live.name!r} answered this image with NaN or inf")
    return row, live


class Batcher:
    """Lives on the event loop: every method but the executor's work, pressure and on_inference_thread runs on the
    loop thread."""

    def __init__(
        self,
        *,
        current: Callable[[str], LiveModel | None] = lambda name: None,
        on_batch: Callable[[str, int, float], None] = lambda name, size, s: None,
        shadow: Callable[[str], Shadow | None] = lambda name: None,
    ) -> None:
        self._current = current
        self._shadow = shadow
        self._forward_seconds: dict[str, float] = {}  # per model, for a canary's share of the forward time
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference", initializer=name_thread)
        self._queues: dict[str, deque[_Item]] = {}
        self._decoding: dict[str, int] = {}
        self._running = False
        self._free_since = 0.0  # perf_counter when the inference thread last finished a pass
        self._timer: asyncio.TimerHandle | None = None
        self._on_batch = on_batch

    def queue_depth(self, name: str) -> int:
        return len(self._queues.get(name, ()))

    def waiting(self, name: str) -> int:
        """Requests for the model's forward pass: queued, or still being decoded (under load, with full batches,
        the queue is empty for most of each pass while the next batch decodes)."""
        return self.queue_depth(name) + self._decoding.get(name, 0)

    def pressure(self, name: str) -> tuple[int, float]:
        """Requests waiting for the model's forward pass (`waiting`), and the seconds its passes have taken so
        far. Read from a canary's thread: each value is read whole (CPython), and a stale one only delays it."""
        return self.waiting(name), self._forward_seconds.get(name, 0.0)

    def on_inference_thread(self, fn: Callable[[], T]) -> T:
        """`fn()` on the inference thread, queued behind the pass in progress as the next batch is; the calling
        thread (a canary's, not the loop's) waits. Its torch work then runs on serving's OpenMP team, not on a
        second one (compute.py, "one team"). Stopping once the batcher is closed."""
        try:
            future = self._executor.submit(fn)
        except RuntimeError:  # close() came first
            raise Stopping("serving has stopped") from None
        try:
            return future.result()
        except CancelledError:  # close() dropped it
            raise Stopping("serving has stopped") from None

    def admit(self, live: LiveModel, count: int) -> None:
        """Refuse work before it is decoded when the queue would be full by the time it is: decoding
        requests that are then turned away only slows the ones already admitted."""
        waiting = self.waiting(live.name)
        if waiting + count > live.config.batch.queue_size:
            raise Overloaded(f"model {live.name!r} has {waiting} requests queued, its limit (counting those decoding)")

    def decoding(self, name: str, delta: int) -> None:
        """Count requests being decoded, so a forming batch knows whether more are coming."""
        self._decoding[name] = self._decoding.get(name, 0) + delta

    async def submit(
        self, live: LiveModel, tensor: torch.Tensor, timeout: float, *, follow: bool = False
    ) -> tuple[torch.Tensor, LiveModel]:
        """The image's probabilities, and the version that computed them: `live`, or with `follow` a
        newer version of the same definition that went live while the image waited. Overloaded when the
        queue is full, RequestTimedOut after `timeout` seconds."""
        queue = self._queues.setdefault(live.name, deque())
        if len(queue) >= live.config.batch.queue_size:
            raise Overloaded(f"model {live.name!r} has {len(queue)} requests queued, its limit")
        item = _Item(live, tensor, follow, asyncio.get_running_loop().create_future())
        queue.append(item)
        self._kick()
        try:
            return await asyncio.wait_for(asyncio.shield(item.future), timeout)
        except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11 on
            raise RequestTimedOut(f"timed out after {timeout} s waiting for model {live.name!r}") from None
        finally:
            if not item.future.done():
                item.future.cancel()  # a timed-out request leaves the queue instead of costing a pass

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _kick(self) -> None:
        if self._running:
            return
        for name, queue in self._queues.items():
            while queue and queue[0].future.done():
                queue.popleft()
            if not queue:
                continue
            spec = queue[0].live.config.batch
            if len(queue) < spec.max_size and self._decoding.get(name, 0) > 0 and spec.max_wait_ms > 0:
                waited = time.perf_counter() - max(queue[0].enqueued, self._free_since)
                if waited * 1000.0 < spec.max_wait_ms:
                    self._arm_timer(spec.max_wait_ms / 1000.0 - waited)
                    continue
            self._start(self._take(queue, spec.max_size, self._current(name)))
            # Round robin: the model served now goes to the back of the line.
            self._queues[name] = self._queues.pop(name)
            return

    def _arm_timer(self, delay: float) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._kick()

    @staticmethod
    def _take(queue: deque[_Item], max_size: int, newest: LiveModel | None) -> list[_Item]:
        if newest is not None:
            for item in queue:
                if item.follow:
                    item.live = _moved(item.live, newest)
        # One pass serves one version: items that may not move stay together on the record they came with.
        first = queue[0].live
        batch: list[_Item] = []
        while queue and len(batch) < max_size and queue[0].live is first:
            item = queue.popleft()
            if not item.future.done():
                batch.append(item)
        return batch

    def _start(self, batch: list[_Item]) -> None:
        if not batch:
            self._kick()
            return
        self._running = True
        loop = asyncio.get_running_loop()
        live = batch[0].live
        started = time.perf_counter()
        newest = (lambda: self._current(live.name)) if all(item.follow for item in batch) else None
        tensors = [item.tensor for item in batch]
        done = loop.run_in_executor(self._executor, stacked_forward, live, tensors, newest)

        def finished(fut: asyncio.Future[tuple[torch.Tensor, LiveModel, torch.Tensor]]) -> None:
            self._running = False
            self._free_since = time.perf_counter()
            seconds = time.perf_counter() - started
            self._forward_seconds[live.name] = self._forward_seconds.get(live.name, 0.0) + seconds
            self._on_batch(live.name, len(batch), seconds)
            exc = None if fut.cancelled() else fut.exception()
            probs, served, stacked = (None, live, None) if fut.cancelled() or exc is not None else fut.result()
            shadow = self._shadow(live.name)
            if shadow is not None and probs is not None and stacked is not None:
                shadow.offer(served, stacked, probs)  # a copy to compare on; it never delays these answers
            for i, item in enumerate(batch):
                if item.future.done():
                    continue
                if exc is not None:
                    item.future.set_exception(exc)
                elif probs is None:  # cancelled
                    item.future.cancel()
                else:
                    try:
                        item.future.set_result(answer(served, probs[i]))
                    except NoFiniteAnswer as wrong:
                        item.future.set_exception(wrong)
            self._kick()

        done.add_done_callback(finished)
