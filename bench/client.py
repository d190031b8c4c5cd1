"""The one load generator used for every server: N closed-loop workers over aiohttp, for a fixed duration."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import numpy as np

# A request waiting longer than this is a failure of the server, not a slow answer.
REQUEST_TIMEOUT_S = 120.0
# What reloader's batcher says when its bounded queue is full (reloader/batching.py, Overloaded).
QUEUE_FULL = "requests queued, its limit"


@dataclass(frozen=True)
class Sample:
    started: float  # time.time() when the request was sent
    finished: float
    status: int  # 0 for a transport error or a client-side timeout
    sha256: str | None
    detail: str | None  # error body or exception, for anything but a 200


@dataclass
class LoadResult:
    """Samples of one run; only requests sent inside `windows` count (the rest are warm-up or between blocks)."""

    concurrency: int
    windows: list[tuple[float, float]] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    def _inside(self, t: float) -> bool:
        return any(a <= t < b for a, b in self.windows)

    @property
    def measured(self) -> list[Sample]:
        return [s for s in self.samples if self._inside(s.started)]

    @property
    def window_s(self) -> float:
        return sum(b - a for a, b in self.windows)

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.measured if s.status == 200]

    @property
    def throughput(self) -> float:
        """Images answered 200 inside the windows, per second of window."""
        done = sum(1 for s in self.samples if s.status == 200 and self._inside(s.finished))
        return done / self.window_s if self.window_s else float("nan")

    def latency_ms(self, q: float) -> float:
        lat = [(s.finished - s.started) * 1000.0 for s in self.ok]
        return float(np.percentile(lat, q)) if lat else float("nan")

    @property
    def n503(self) -> int:
        return sum(1 for s in self.measured if s.status == 503)

    @property
    def n503_queue_full(self) -> int:
        return sum(1 for s in self.measured if s.status == 503 and QUEUE_FULL in (s.detail or ""))

    @property
    def errors(self) -> int:
        """Everything that is neither a 200 nor a 503 saying the queue is full: timeouts, 5xx, resets."""
        return len(self.measured) - len(self.ok) - self.n503_queue_full

    @property
    def error_kinds(self) -> Counter[str]:
        return Counter(
            f"{s.status} {(s.detail or '')[:60]}"
            for s in self.measured
            if s.status != 200 and not (s.status == 503 and QUEUE_FULL in (s.detail or ""))
        )

    @property
    def shas(self) -> Counter[str]:
        """sha256 of the version that answered, over every 200 of the run (warm-up included)."""
        return Counter(s.sha256 for s in self.samples if s.status == 200 and s.sha256)

    def within(self, windows: list[tuple[float, float]]) -> LoadResult:
        return LoadResult(self.concurrency, windows, self.samples)

    def summary(self) -> dict[str, float | int]:
        return {
            "c": self.concurrency,
            "n": len(self.measured),
            "img_s": self.throughput,
            "p50_ms": self.latency_ms(50),
            "p99_ms": self.latency_ms(99),
            "errors": self.errors,
            "n503": self.n503,
            "n503_queue_full": self.n503_queue_full,
        }


class LoadGenerator:
    """POSTs raw JPEG bodies to `url` from `concurrency` workers; every server gets exactly this client."""

    def __init__(self, url: str, images: list[bytes], concurrency: int, *, honor_retry_after: bool = True) -> None:
        self.url = url
        self.images = images
        self.concurrency = concurrency
        self.honor_retry_after = honor_retry_after

    async def run(self, duration_s: float, warmup_s: float = 0.0) -> LoadResult:
        """Load without pause for warm-up + duration; only requests sent after the warm-up are measured.

        Workers stop sending at the end and the requests in flight are awaited: their latency counts,
        and the next run starts on an idle server.
        """
        t0 = time.time() + warmup_s
        result = LoadResult(self.concurrency, [(t0, t0 + duration_s)])
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(warmup_s + duration_s, stop.set)
        await self.run_until(stop, result)
        return result

    async def run_until(self, stop: asyncio.Event, result: LoadResult) -> None:
        """Post until `stop` is set, appending to `result` as answers arrive (for watching a swap happen)."""
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await asyncio.gather(*(self._worker(session, i, stop, result) for i in range(self.concurrency)))

    async def _worker(
        self, session: aiohttp.ClientSession, index: int, stop: asyncio.Event, result: LoadResult
    ) -> None:
        n = index
        while not stop.is_set():
            body = self.images[n % len(self.images)]
            n += self.concurrency
            sample, retry_after = await self._one(session, body)
            result.samples.append(sample)
            if retry_after and self.honor_retry_after:
                # A well-behaved client backs off as told instead of hammering a full queue.
                try:
                    await asyncio.wait_for(stop.wait(), retry_after)
                except asyncio.TimeoutError:
                    pass

    async def _one(self, session: aiohttp.ClientSession, body: bytes) -> tuple[Sample, float]:
        started = time.time()
        try:
            async with session.post(self.url, data=body, headers={"content-type": "image/jpeg"}) as response:
                raw = await response.read()
                status = response.status
                retry_after = float(response.headers.get("retry-after", 0) or 0)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return Sample(started, time.time(), 0, None, f"{type(exc).__name__}: {exc}"), 0.0
        finished = time.time()
        if status != 200:
            return Sample(started, finished, status, None, raw[:200].decode(errors="replace")), retry_after
        try:
            sha = json.loads(raw).get("sha256")
        except ValueError:
            return Sample(started, finished, -1, None, f"200 with a body that is not JSON: {raw[:80]!r}"), 0.0
        return Sample(started, finished, 200, sha, None), 0.0


def failed(*summaries: dict) -> int:
    """Requests that failed in these levels (`LoadResult.summary()`): every answer but a 200, each once (errors
    already hold the 503s that do not say the queue is full). img/s and p99 count 200s only, so a level with
    failures judges nothing."""
    return sum(s["errors"] + s["n503_queue_full"] for s in summaries)


def measure(url: str, images: list[bytes], concurrency: int, duration_s: float, warmup_s: float = 0.0) -> LoadResult:
    return asyncio.run(LoadGenerator(url, images, concurrency).run(duration_s, warmup_s))
