"""The HTTP API. Handlers only read the registry; decoding and forward passes run off the event loop."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import torch
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .batching import Batcher
from .compute import lower_thread_priority
from .errors import (
    ApiError,
    InvalidParameter,
    InvalidRequest,
    ModelNotFound,
    ModelNotReady,
    PayloadTooLarge,
    RequestTimedOut,
    Unhealthy,
)
from .images import pixels
from .registry import LiveModel
from .statuspage import status_page
from .supervisor import Supervisor

logger = logging.getLogger("reloader.app")
# A body over max_body_bytes is read and dropped up to this much more, for this long, before the 413 goes
# out: urllib and requests send the whole body before they read, and a server that stops reading resets
# the connection under them, so they never see the 413 (nginx lingers on close for the same reason).
DRAIN_BYTES = 64 << 20
DRAIN_S = 5.0


async def _drain(stream: AsyncIterator[bytes], budget: int) -> None:
    with anyio.move_on_after(DRAIN_S):
        async for chunk in stream:
            budget -= len(chunk)
            if budget < 0:
                return


class Service:
    """What the handlers need: the supervisor (config + registry), the batcher, and liveness probes."""

    def __init__(self, supervisor: Supervisor, batcher: Batcher, alive: Callable[[], list[str]]) -> None:
        self.supervisor = supervisor
        self.batcher = batcher
        self.alive = alive
        # Decoding releases the GIL; more threads than cores would only queue inside Pillow. Its own threads,
        # below the forward's priority (compute.py), and no one else's work on them.
        self.decode_pool = ThreadPoolExecutor(
            max(2, os.cpu_count() or 2), thread_name_prefix="decode", initializer=lower_thread_priority
        )

    def close(self) -> None:
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def registry(self):  # noqa: ANN201 - the Registry, read-only here
        return self.supervisor.registry

    def resolve(self, name: str | None) -> tuple[str, LiveModel]:
        """The live record for a model name (or the default), or the right 404/503."""
        config = self.supervisor.config
        if name is None:
            name = config.default_model
            if name is None:
                raise ModelNotFound(f"no default model: name one of {sorted(config.models)} in the path")
        if name not in config.models:
            raise ModelNotFound(f"unknown model {name!r}; known models: {sorted(config.models)}")
        live = self.registry.get(name)
        if live is None:
            worker = self.supervisor.worker(name)
            why = (worker.found().error if worker else None) or "no validated version yet"
            raise ModelNotReady(f"model {name!r} is not ready: {why}")
        return name, live

    def unready(self) -> list[str]:
        """Configured models with no live version (what /readyz and /v2/health/ready report)."""
        return [name for name in self.supervisor.config.models if self.registry.get(name) is None]

    async def read_body(self, request: Request) -> bytes:
        limit = self.supervisor.config.server.max_body_bytes
        declared = request.headers.get("content-length", "")
        # Compared by length first: int() of thousands of digits raises (and costs) before any comparison.
        if declared.isascii() and declared.isdigit() and (len(declared) > len(str(limit)) or int(declared) > limit):
            if len(declared) <= len(str(limit + DRAIN_BYTES)) and int(declared) <= limit + DRAIN_BYTES:
                await _drain(request.stream(), DRAIN_BYTES)
            raise PayloadTooLarge(f"body of {declared[:20]} bytes exceeds max_body_bytes ({limit})")
        chunks, size = [], 0
        stream = request.stream()
        async for chunk in stream:
            size += len(chunk)
            if size > limit:
                await _drain(stream, DRAIN_BYTES)
                raise PayloadTooLarge(f"body exceeds max_body_bytes ({limit})")
            chunks.append(chunk)
        return b"".join(chunks)

    async def image_bytes(self, request: Request) -> bytes:
        body = await self.read_body(request)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return body

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=4, max_fields=16)
        except HTTPException as exc:
            raise InvalidRequest(f"malformed multipart body: {exc.detail}") from exc
        field = form.get("file")
        if field is None:
            raise InvalidRequest("multipart body has no 'file' field")
        return await field.read() if isinstance(field, UploadFile) else field.encode()

    async def probabilities(
        self, live: LiveModel, images: list[bytes], *, follow: bool = False
    ) -> tuple[torch.Tensor, LiveModel]:
        """Decode, preprocess and run images on one live record: [len(images), num_classes], and the record.

        With `follow` (one image only), a newer version that goes live while the image waits may answer.
        Raises InvalidImage, Overloaded or RequestTimedOut, which the error handler answers."""
        batcher = self.batcher
        batcher.admit(live, len(images))
        batcher.decoding(live.name, len(images))
        # One deadline for the whole request: decoding counts, and what it leaves is the queue's wait.
        timeout = self.supervisor.config.server.request_timeout_s
        deadline = time.monotonic() + timeout
        try:
            decode = live.preprocessor.load
            with anyio.fail_after(timeout):
                if len(images) > 1:  # one image is held to the lower of both limits as it is decoded
                    limit = live.config.preprocess.max_request_pixels
                    await anyio.to_thread.run_sync(pixels, images, limit, abandon_on_cancel=True)
                # Abandoned at the deadline: the answer goes out; a decode not started is dropped, one
                # running finishes and its tensor is dropped.
                loop = asyncio.get_running_loop()
                tensors = await asyncio.gather(*(loop.run_in_executor(self.decode_pool, decode, d) for d in images))
        except TimeoutError:
            raise RequestTimedOut(f"timed out after {timeout} s decoding the images for {live.name!r}") from None
        finally:
            batcher.decoding(live.name, -len(images))
        follow = follow and len(tensors) == 1
        left = max(0.001, deadline - time.monotonic())
        rows = await asyncio.gather(*(batcher.submit(live, t, left, follow=follow) for t in tensors))
        return torch.stack([row for row, _ in rows]), rows[0][1]


def parse_top_k(request: Request, num_classes: int) -> int:
    raw = request.query_params.get("top_k", "5")
    try:
        top_k = int(raw)
    except ValueError:
        raise InvalidParameter(f"top_k must be a whole number, got {raw!r}") from None
    if top_k < 1:
        raise InvalidParameter(f"top_k must be >= 1, got {top_k}")
    return min(top_k, num_classes)


def prediction(live: LiveModel, probs: torch.Tensor, top_k: int) -> dict[str, Any]:
    values, indices = probs.topk(top_k)
    return {
        "model": live.name,
        "version": live.version,
        "sha256": live.sha256,
        "predictions": [
            {"label": live.labels[i], "index": i, "probability": round(float(p), 6)}
            for p, i in zip(values.tolist(), indices.tolist(), strict=True)
        ],
    }


async def api_error(request: Request, exc: Exception) -> Response:
    """The one place a domain error becomes an answer: {"error": message}, its status and headers."""
    assert isinstance(exc, ApiError)
    return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=dict(exc.headers))


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no such route, method not allowed), in the same JSON shape."""
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def client_gone(request: Request, exc: Exception) -> Response:
    """The client hung up before its body arrived: nobody reads an answer, and it is no server error.

    499 is nginx's "client closed request"; it reaches the metrics and the access log, not the client."""
    logger.info("client hung up during %s %s before its request was read", request.method, request.url.path)
    return Response(status_code=499)


async def unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)


# Registered once, on the app: handlers and parsers raise, these answer.
EXCEPTION_HANDLERS = {
    ApiError: api_error,
    HTTPException: http_error,
    ClientDisconnect: client_gone,
    Exception: unexpected,
}


def build_app(service: Service, extra_routes: list[Route] | None = None) -> Starlette:
    async def predict(request: Request) -> Response:
        name, live = service.resolve(request.path_params.get("name"))
        request.state.model = name  # the metrics middleware labels by model, also on the default route
        top_k = parse_top_k(request, live.config.num_classes)
        data = await service.image_bytes(request)
        probs, served = await service.probabilities(live, [data], follow=True)
        return JSONResponse(prediction(served, probs[0], top_k), headers=served.answer_headers())

    async def models(request: Request) -> Response:
        return JSONResponse(service.supervisor.describe())

    async def model(request: Request) -> Response:
        name = request.path_params["name"]
        described = service.supervisor.describe_model(name)
        if described is None:
            raise ModelNotFound(f"unknown model {name!r}")
        return JSONResponse(described)

    async def healthz(request: Request) -> Response:
        dead = service.alive()
        if dead:
            raise Unhealthy(f"not healthy: {', '.join(dead)}")
        return JSONResponse({"status": "alive"})

    async def readyz(request: Request) -> Response:
        missing = service.unready()
        if missing:
            raise Unhealthy(f"models with no live version: {', '.join(missing)}")
        return JSONResponse({"status": "ready", "models": list(service.supervisor.config.models)})

    routes = [
        Route("/", status_page),
        Route("/predict", predict, methods=["POST"]),
        Route("/models/{name}/predict", predict, methods=["POST"]),
        Route("/models", models),
        Route("/models/{name}", model),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        *(extra_routes or []),
    ]
    return Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS)
