"""Prometheus metrics at /metrics: counters fed by the event bus and the request path, state read at scrape time.

Each daemon has its own CollectorRegistry, so several daemons (or tests) in one process never share series.
Labels are model names from the config and route templates, never raw paths, so cardinality stays bounded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .batching import Batcher
from .events import CheckpointJudged, ConfigApplied, ConfigRejected, Event, Outcome, ReloadFailed, SourceStatus
from .supervisor import Supervisor
from .watcher import Watcher

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Loading and validating spans milliseconds (a tiny net) to minutes (a large one compiled at warm-up).
RELOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The metric objects and the hooks that move them; `observe` adds what is read at scrape time."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "reloader_http_requests",
            "HTTP requests answered, by model, route and status",
            ["model", "route", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "reloader_http_request_duration_seconds", "Time to answer an HTTP request", ["model", "route"], registry=r
        )
        self.batch_size = Histogram(
            "reloader_batch_size", "Images per forward pass", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.forward = Histogram("reloader_forward_duration_seconds", "Time of one forward pass", ["model"], registry=r)
        self.swaps = Counter("reloader_swaps", "Checkpoints put in service", ["model"], registry=r)
        self.rejections = Counter(
            "reloader_rejections", "Checkpoints refused, by the check that failed", ["model", "check"], registry=r
        )
        self.reload_errors = Counter("reloader_reload_errors", "Reload passes that failed", ["model"], registry=r)
        self.reload_duration = Histogram(
            "reloader_reload_duration_seconds",
            "Time to load and validate one checkpoint, by result (swapped, rejected, incomplete)",
            ["model", "result"],
            buckets=RELOAD_BUCKETS,
            registry=r,
        )
        self.config_reloads = Counter(
            "reloader_config_reloads", "Config file reloads, by result (applied, rejected)", ["result"], registry=r
        )
        self.source_errors = Counter(
            "reloader_source_errors", "Times a model's checkpoint source became unreadable", ["model"], registry=r
        )

    # -- hooks, called from the event loop (requests, batches) and the reload threads (outcomes) --------

    def request_done(self, model: str, route: str, code: int, seconds: float) -> None:
        self.requests.labels(model, route, str(code)).inc()
        self.latency.labels(model, route).observe(seconds)

    def batch_done(self, model: str, size: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(size)
        self.forward.labels(model).observe(seconds)

    def on_event(self, event: Event) -> None:
        """A bus subscriber: swaps, rejections, failed passes, config reloads and source errors."""
        if isinstance(event, CheckpointJudged):
            if event.outcome is Outcome.SWAPPED:
                self.swaps.labels(event.model).inc()
            elif event.outcome is Outcome.REJECTED:
                self.rejections.labels(event.model, failed_check(event)).inc()
            self.reload_duration.labels(event.model, event.outcome.value).observe(event.report.total_ms / 1000.0)
        elif isinstance(event, ReloadFailed):
            self.reload_errors.labels(event.model).inc()
        elif isinstance(event, ConfigApplied) and not event.initial:
            self.config_reloads.labels("applied").inc()
        elif isinstance(event, ConfigRejected):
            self.config_reloads.labels("rejected").inc()
        elif isinstance(event, SourceStatus) and event.error is not None:
            self.source_errors.labels(event.model).inc()

    # -- wiring -----------------------------------------------------------------------------------------

    def observe(self, supervisor: Supervisor, batcher: Batcher, unhealthy: Callable[[], list[str]]) -> None:
        """Also report, at each scrape: live versions, queue depths, liveness and the config's age."""
        self.registry.register(_State(supervisor, batcher, unhealthy))

    def route(self) -> Route:
        async def metrics(request: Request) -> Response:
            # On the event loop on purpose: the batcher's queues are only ever touched from the loop thread.
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

        return Route("/metrics", metrics)


def failed_check(event: CheckpointJudged) -> str:
    """The rejection's category: the gate check that failed (load/structure/finite/warmup)."""
    failed = event.report.failed_check
    if failed is None and (event.reason or "").startswith("canary:"):
        return "canary"  # it passed the gate, and disagreed with the live version on live traffic
    # Every check passed but the file's digest moved while it was read: it was replaced mid-validation.
    return "changed" if failed is None else failed.name


class _State(Collector):
    def __init__(self, supervisor: Supervisor, batcher: Batcher, unhealthy: Callable[[], list[str]]) -> None:
        self.supervisor = supervisor
        self.batcher = batcher
        self.unhealthy = unhealthy

    def collect(self) -> Iterable[Metric]:
        supervisor = self.supervisor
        names = list(supervisor.config.models)
        live = supervisor.registry.snapshot()
        info = InfoMetricFamily("reloader_live_model", "The checkpoint in service, per model", labels=["model"])
        version = GaugeMetricFamily("reloader_live_version", "Version number in service", labels=["model"])
        for name, record in live.items():
            labels = {"version": str(record.version), "sha256": record.sha256}
            info.add_metric([name], labels | {"precision": record.report.precision, "device": record.report.device})
            version.add_metric([name], record.version)
        ready = GaugeMetricFamily("reloader_model_ready", "1 when the model has a live version", labels=["model"])
        depth = GaugeMetricFamily("reloader_queue_depth", "Requests waiting for a forward pass", labels=["model"])
        for name in names:
            ready.add_metric([name], float(name in live))
            depth.add_metric([name], self.batcher.queue_depth(name))
        compared = GaugeMetricFamily(
            "reloader_canary_compared", "Live requests the canary has been compared on", labels=["model", "version"]
        )
        agreement = GaugeMetricFamily(
            "reloader_canary_agreement",
            "The canary's top-1 agreement with the live version so far",
            labels=["model", "version"],
        )
        for worker in supervisor.workers():
            canary = worker.canary
            if canary is not None:
                series = [worker.name, str(canary.candidate.version)]
                compared.add_metric(series, canary.compared)
                agreement.add_metric(series, canary.agreement or 0.0)
        yield from (info, version, ready, depth, compared, agreement)
        dead = self.unhealthy()
        up = "1 while the watcher and reload workers run, none stuck (as /healthz)"
        yield GaugeMetricFamily("reloader_up", up, value=0 if dead else 1)
        yield GaugeMetricFamily(
            "reloader_watcher_alive", "1 while the file watcher runs", value=int(Watcher.PART not in dead)
        )
        age = time.time() - supervisor.config_loaded_at
        yield GaugeMetricFamily("reloader_config_age_seconds", "Seconds since the config last loaded", value=age)
        yield GaugeMetricFamily(
            "reloader_config_error",
            "1 while the file on disk is rejected and the last good config runs",
            value=int(supervisor.config_error is not None),
        )


class RequestMetrics:
    """ASGI middleware: counts and times every request, labelled after routing has run.

    The router stores the matched route in the scope; handlers that resolve a model store its name in
    `request.state.model` (that also covers /predict, which names no model in its path).
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, models: Callable[[], Iterable[str]]) -> None:
        self.app = app
        self.metrics = metrics
        self.models = models

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.request_done(self._model(scope), route, status, time.perf_counter() - started)

    def _model(self, scope: Scope) -> str:
        state: dict[str, Any] = scope.get("state") or {}
        name = state.get("model") or scope.get("path_params", {}).get("name")
        # A name from the path is a client's string: only configured names become label values.
        return name if isinstance(name, str) and name in self.models() else ""
