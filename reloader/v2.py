"""The Open Inference Protocol v2 (KServe v2, Triton's HTTP API), so tritonclient and KServe tooling just work.

Every model has one input, a batch of encoded images (BYTES, shape [-1]; in plain JSON each element is
base64, since image bytes are not UTF-8), and one output, the probabilities (FP32, [-1, num_classes]), or,
with the classification extension, the top k as "score:index:label" strings. A request runs on one live
record from start to end, through the same decoding and batching as /predict.

Errors are raised as the classes of reloader/errors.py, which name their statuses: an unknown model is
ModelNotFound, a model with no live version ModelNotReady (it is expected to become ready, which
InvalidRequest would not say), a version other than the live one ModelNotFound naming the live one, and
any malformed request InvalidRequest. Compressed request bodies (Content-Encoding) are
UnsupportedMediaType.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import reprlib
import struct
from dataclasses import dataclass
from typing import Any

import anyio
import torch
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import __version__
from .app import Service
from .errors import InvalidRequest, ModelNotFound, Unhealthy, UnsupportedMediaType
from .registry import LiveModel

INPUT = "IMAGE"
OUTPUT = "PROBABILITIES"
EXTENSIONS = ["classification", "binary_tensor_data"]
HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_DIGITS = 18  # any length a request can have fits; more digits is no length at all
MAX_RANK = 8  # dimensions of the input's shape ([n] is what the model takes; [n, 1] and such are accepted)
_SHORT = reprlib.Repr()  # values echoed in errors are cut: a request must not make a megabyte of error
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 60


@dataclass(frozen=True)
class Requested:
    """One requested output: binary or JSON data, and k > 0 for the classification extension."""

    binary: bool
    classes: int = 0


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    images: list[bytes]
    outputs: list[Requested]


def _int(value: Any, what: str, minimum: int) -> int:
    # bool is an int in Python, but `true` is no size in JSON.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidRequest(f"{what} must be an integer >= {minimum}, got {_SHORT.repr(value)}")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(f"{what} must be true or false, got {value!r}")
    return value


def _dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def split_bytes(raw: bytes) -> list[bytes]:
    """A binary BYTES tensor: each element is a 4-byte little-endian length, then that many bytes."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if len(raw) - offset < 4:
            raise InvalidRequest(f"binary BYTES element {len(elements)}: {len(raw) - offset} bytes left, no length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if size > len(raw) - offset:
            raise InvalidRequest(
                f"binary BYTES element {len(elements)} claims {size} bytes, only {len(raw) - offset} remain"
            )
        elements.append(raw[offset : offset + size])
        offset += size
    return elements


def join_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _flatten(data: Any) -> list[Any]:
    # The protocol allows row-major nested lists as well as a flat list. A loop, not recursion: JSON
    # nested a thousand deep must be an InvalidRequest, not a RecursionError.
    flat: list[Any] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    return flat


def _json_images(tensor: dict[str, Any]) -> list[bytes]:
    if "data" not in tensor:
        raise InvalidRequest(f"input {INPUT!r} has neither 'data' nor parameters.binary_data_size")
    images = []
    for i, element in enumerate(_flatten(tensor["data"])):
        if not isinstance(element, str):
            raise InvalidRequest(f"input {INPUT!r} element {i}: expected a base64 string, got {type(element).__name__}")
        try:
            images.append(base64.b64decode(element, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequest(f"input {INPUT!r} element {i} is not valid base64: {exc}") from None
    return images


def parse_infer(body: bytes, header_length: str | None, max_images: int) -> InferRequest:
    """The JSON header, plus binary tensor data after it when the header length is given."""
    binary = b""
    if header_length is not None:
        # Bounded before int(): 5,000 digits would raise inside int() itself.
        digits = header_length.isascii() and header_length.isdigit() and len(header_length) <= MAX_DIGITS
        if not digits or int(header_length) > len(body):
            shown = (
                header_length if len(header_length) <= 40 else f"{header_length[:40]}... ({len(header_length)} chars)"
            )
            raise InvalidRequest(f"{HEADER_LENGTH} {shown!r} is not a length within the {len(body)}-byte body")
        body, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        doc = _dict(json.loads(body), "the request")
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidRequest(f"the request header is not valid JSON: {exc}") from None
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        count = len(inputs) if isinstance(inputs, list) else "no"
        raise InvalidRequest(f"expected exactly one input, {INPUT!r} (BYTES), got {count} inputs")
    tensor = _dict(inputs[0], "inputs[0]")
    if tensor.get("name") != INPUT:
        raise InvalidRequest(f"unknown input {tensor.get('name')!r}: the only input is {INPUT!r}")
    if tensor.get("datatype") != "BYTES":
        raise InvalidRequest(f"input {INPUT!r} has datatype BYTES (encoded images), got {tensor.get('datatype')!r}")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape:
        raise InvalidRequest(f"input {INPUT!r} needs a shape such as [n], got {shape!r}")
    if len(shape) > MAX_RANK:
        raise InvalidRequest(f"input {INPUT!r} has {len(shape)} dimensions; at most {MAX_RANK}")
    shape = [_int(d, f"input {INPUT!r} shape dimension", 0) for d in shape]
    # Each dimension at most the image limit before any product: [10**4000] * 1200 would hold the GIL for
    # seconds in math.prod (and a wider shape cannot match an allowed image count anyway).
    if any(d > max_images for d in shape):
        raise InvalidRequest(f"input {INPUT!r} has a shape dimension over {max_images} (batch.queue_size)")
    params = _dict(tensor.get("parameters", {}), f"input {INPUT!r} parameters")
    if any(key.startswith("shared_memory") for key in params):
        raise InvalidRequest("shared memory is not supported: send the data in the request")
    if "binary_data_size" in params:
        size = _int(params["binary_data_size"], "binary_data_size", 0)
        if size != len(binary):
            raise InvalidRequest(f"binary_data_size is {size} but {len(binary)} bytes follow the JSON header")
        images = split_bytes(binary)
    elif binary:
        raise InvalidRequest(f"{len(binary)} bytes follow the JSON header but no input declares binary_data_size")
    else:
        images = _json_images(tensor)
    if math.prod(shape) != len(images):
        raise InvalidRequest(f"input {INPUT!r} has shape {shape} but carries {len(images)} elements")
    if not images:
        raise InvalidRequest(f"input {INPUT!r} carries no images")
    if len(images) > max_images:
        raise InvalidRequest(f"{len(images)} images in one request; the limit is {max_images} (batch.queue_size)")
    request_params = _dict(doc.get("parameters", {}), "parameters")
    binary_default = _bool(request_params.get("binary_data_output", False), "binary_data_output")
    request_id = doc.get("id")
    return InferRequest(request_id if isinstance(request_id, str) else None, images, _outputs(doc, binary_default))


def _outputs(doc: dict[str, Any], binary_default: bool) -> list[Requested]:
    outputs = doc.get("outputs", [])
    if outputs == []:
        return [Requested(binary_default)]  # none requested: every output, as Triton does
    if not isinstance(outputs, list) or len(outputs) != 1:
        count = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
        raise InvalidRequest(f"outputs must list at most one output, {OUTPUT!r}; got {count}")
    output = _dict(outputs[0], "outputs[0]")
    if output.get("name") != OUTPUT:
        raise InvalidRequest(f"unknown output {output.get('name')!r}: the only output is {OUTPUT!r}")
    params = _dict(output.get("parameters", {}), f"output {OUTPUT!r} parameters")
    if any(key.startswith("shared_memory") for key in params):
        raise InvalidRequest("shared memory is not supported: outputs come back in the response")
    binary = _bool(params.get("binary_data", binary_default), "binary_data")
    classes = _int(params.get("classification", 0), "classification", 0)
    return [Requested(binary, classes)]


def encode_output(live: LiveModel, probs: torch.Tensor, want: Requested) -> tuple[dict[str, Any], bytes | None]:
    """The output's JSON description and, when binary, its data."""
    if want.classes:
        k = min(want.classes, live.config.num_classes)
        # Row by row: on the event loop, a batch's topk spreads over the cores from 33 rows of 1000 classes on,
        # and leaves an OpenMP team on the loop's thread (compute.py, "one team").
        tops = [row.topk(k) for row in probs]
        strings = [
            f"{p:.6f}:{i}:{live.labels[i]}"
            for row_p, row_i in tops
            for p, i in zip(row_p.tolist(), row_i.tolist(), strict=True)
        ]
        out: dict[str, Any] = {"name": OUTPUT, "datatype": "BYTES", "shape": [len(probs), k]}
        raw = join_bytes([s.encode() for s in strings]) if want.binary else None
        data: list[Any] = strings
    else:
        out = {"name": OUTPUT, "datatype": "FP32", "shape": list(probs.shape)}
        raw = probs.float().numpy().astype("<f4").tobytes() if want.binary else None
        data = probs.flatten().tolist()
    if raw is None:
        out["data"] = data
    else:
        out["parameters"] = {"binary_data_size": len(raw)}
    return out, raw


def v2_routes(service: Service) -> list[Route]:
    """The routes of the protocol, to pass to build_app."""

    def live_model(request: Request) -> LiveModel:
        name, live = service.resolve(request.path_params["name"])
        request.state.model = name
        version = request.path_params.get("version")
        if version is not None and version != str(live.version):
            message = f"model {name!r} has no version {version!r} in service; the live version is {live.version}"
            raise ModelNotFound(message)
        return live

    async def server_live(request: Request) -> Response:
        dead = service.alive()
        if dead:
            raise Unhealthy(f"not healthy: {', '.join(dead)}")
        return JSONResponse({"live": True})

    async def server_ready(request: Request) -> Response:
        missing = service.unready()
        if missing:
            raise Unhealthy(f"models with no live version: {', '.join(missing)}")
        return JSONResponse({"ready": True})

    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": "reloader", "version": __version__, "extensions": EXTENSIONS})

    async def model_metadata(request: Request) -> Response:
        live = live_model(request)
        return JSONResponse(
            {
                "name": live.name,
                "versions": [str(live.version)],
                "platform": "pytorch",
                "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
                "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, live.config.num_classes]}],
            }
        )

    async def model_ready(request: Request) -> Response:
        live = live_model(request)
        return JSONResponse({"name": live.name, "ready": True})

    async def infer(request: Request) -> Response:
        live = live_model(request)
        if request.headers.get("content-encoding", "identity") != "identity":
            raise UnsupportedMediaType(f"Content-Encoding {request.headers['content-encoding']!r} is not supported")
        body = await service.read_body(request)
        # Parsing megabytes of JSON and base64 is CPU work: keep it off the event loop.
        parsed = await anyio.to_thread.run_sync(
            parse_infer, body, request.headers.get(HEADER_LENGTH), live.config.batch.queue_size
        )
        # A request that names a version gets that one; otherwise a newer one may answer it (one image only).
        follow = request.path_params.get("version") is None
        probs, live = await service.probabilities(live, parsed.images, follow=follow)
        header: dict[str, Any] = {"model_name": live.name, "model_version": str(live.version), "outputs": []}
        if parsed.id is not None:
            header["id"] = parsed.id
        parts = []
        for want in parsed.outputs:
            out, raw = encode_output(live, probs, want)
            header["outputs"].append(out)
            if raw is not None:
                parts.append(raw)
        if not parts:
            return JSONResponse(header, headers=live.answer_headers())
        head = json.dumps(header, separators=(",", ":")).encode()
        return Response(
            head + b"".join(parts),
            media_type="application/octet-stream",
            headers={HEADER_LENGTH: str(len(head)), **live.answer_headers()},
        )

    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    return [
        Route("/v2", server_metadata),
        Route("/v2/health/live", server_live),
        Route("/v2/health/ready", server_ready),
        *(Route(base, model_metadata) for base in (model, versioned)),
        *(Route(f"{base}/ready", model_ready) for base in (model, versioned)),
        *(Route(f"{base}/infer", infer, methods=["POST"]) for base in (model, versioned)),
    ]
