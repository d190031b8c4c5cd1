"""GET /openapi.json: a valid OpenAPI 3.1 description of exactly the daemon's routes, and of what they answer."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import httpx
import pytest
import schemathesis
from conftest import Project, colours_yaml, png_bytes
from schemathesis.core.result import Ok

from reloader import errors, status, v2
from reloader.canary import CanaryState
from reloader.config import load_config
from reloader.events import Outcome
from reloader.openapi import DOCUMENT
from reloader.policy import FileStatus, LiveFile
from reloader.server import Daemon

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
SCHEMAS = DOCUMENT["components"]["schemas"]


def described_routes() -> dict[str, set[str]]:
    return {path: {m.upper() for m in item if m in METHODS} for path, item in DOCUMENT["paths"].items()}


def test_the_description_lists_exactly_the_apps_routes(project: Project):
    # The app as reloader/server.py builds it (v2, /metrics and /openapi.json included), polling so that
    # building the file watcher starts no inotify thread; nothing is started.
    project.write_config(colours_yaml(watch="watch:\n  poll: true\n"))
    daemon = Daemon(load_config(project.config), port=0)
    try:
        # Starlette answers HEAD on every GET route by itself: the GET's description covers it.
        routes = {route.path: set(route.methods) - {"HEAD"} for route in daemon.app.routes}
    finally:
        daemon.batcher.close()
        daemon.notifier.close()

    assert routes == described_routes()
    assert {"/", "/metrics", "/openapi.json", "/v2/models/{name}/versions/{version}/infer"} <= set(routes)


def test_it_is_a_valid_openapi_3_1_document_whose_every_operation_loads():
    schema = schemathesis.openapi.from_dict(DOCUMENT)

    schema.validate()  # against the OpenAPI 3.1 meta-schema
    operations = list(schema.get_all_operations())
    assert all(isinstance(result, Ok) for result in operations), [r for r in operations if not isinstance(r, Ok)]
    assert len(operations) == sum(len(methods) for methods in described_routes().values())
    assert DOCUMENT["openapi"] == "3.1.0"
    assert DOCUMENT["info"]["version"] == __import__("reloader").__version__


def enum_of(schema: dict[str, Any]) -> set[str]:
    return set(schema["enum"])


def test_it_names_the_values_the_code_uses():
    status_props = SCHEMAS["ModelStatus"]["properties"]
    assert enum_of(status_props["state"]) == {"ready", "not ready"}
    assert enum_of(SCHEMAS["CheckpointFile"]["properties"]["status"]) == {s.value for s in FileStatus}
    assert enum_of(SCHEMAS["LiveVersion"]["properties"]["file"]) == {f.value for f in LiveFile}
    assert enum_of(SCHEMAS["Canary"]["properties"]["state"]) == {s.value for s in CanaryState}
    assert enum_of(SCHEMAS["Event"]["properties"]["event"]) == {o.value for o in Outcome}
    assert enum_of(SCHEMAS["Event"]["properties"]["result"]) == {*status.RESULT.values(), "error"}
    assert enum_of(SCHEMAS["ServerMetadata"]["properties"]["extensions"]["items"]) == set(v2.EXTENSIONS)
    tensor = SCHEMAS["InferRequest"]["properties"]["inputs"]["items"]["properties"]
    assert tensor["name"]["const"] == v2.INPUT
    assert SCHEMAS["InferRequest"]["properties"]["outputs"]["items"]["properties"]["name"]["const"] == v2.OUTPUT
    assert SCHEMAS["InferResponse"]["properties"]["outputs"]["items"]["properties"]["name"]["const"] == v2.OUTPUT
    assert v2.HEADER_LENGTH in DOCUMENT["components"]["parameters"]


def api_errors() -> list[type[errors.ApiError]]:
    found, todo = [], [errors.ApiError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls is not errors.ApiError:
            found.append(cls)
    return found


def test_every_status_an_api_error_maps_to_is_described_with_its_headers():
    responses = DOCUMENT["components"]["responses"]
    described: dict[int, set[str]] = {}
    for item in DOCUMENT["paths"].values():
        for operation in item.values():
            for code, response in operation["responses"].items():
                if "$ref" in response:
                    response = responses[response["$ref"].rpartition("/")[2]]
                described.setdefault(int(code), set()).update(response.get("headers", {}))
    for cls in api_errors():
        assert cls.status in described, f"{cls.__name__} answers {cls.status}, which no operation describes"
        assert set(cls.headers) <= described[cls.status], (cls.__name__, cls.headers)
    assert 499 not in described and 500 not in described  # never sent: see the description's header


# -- real answers, in states the fuzz does not reach, against the description ---------------------------

EMPTY_MODEL = (
    "  empty:\n    arch: tinynet:colour_net\n    num_classes: 3\n    labels: [red, green, blue]\n"
    "    checkpoints: checkpoints/empty\n"
)


@pytest.fixture
def described_daemon(project: Project, start_daemon):
    """colours serves v1 with a rejected v2 beside it; `empty` has no checkpoint; bodies over 5000 bytes get 413."""
    project.save("colours-v1.pt")
    (project.checkpoints / "colours-v2.pt").write_bytes(b"not a checkpoint")
    (project.root / "checkpoints" / "empty").mkdir()
    project.write_config(colours_yaml(extra_model=EMPTY_MODEL, server="  max_body_bytes: 5000\n"))
    daemon = start_daemon(project.config, ready=False)
    daemon.wait_file(project.checkpoints / "colours-v2.pt", "rejected")
    return daemon


def documented_media_types(path: str, method: str, code: int) -> set[str]:
    response = DOCUMENT["paths"][path][method.lower()]["responses"][str(code)]
    if "$ref" in response:
        response = DOCUMENT["components"]["responses"][response["$ref"].rpartition("/")[2]]
    return set(response["content"])


def image_request(colours: list[str], **extra: Any) -> dict[str, Any]:
    data = [base64.b64encode(png_bytes(c)).decode() for c in colours]
    return {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [len(colours)], "data": data}], **extra}


def binary_request(colours: list[str]) -> tuple[bytes, dict[str, str]]:
    framed = b"".join(struct.pack("<I", len(p)) + p for p in (png_bytes(c) for c in colours))
    tensor = {"name": "IMAGE", "datatype": "BYTES", "shape": [len(colours)], "parameters": {"binary_data_size": 0}}
    tensor["parameters"]["binary_data_size"] = len(framed)
    head = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    return head + framed, {v2.HEADER_LENGTH: str(len(head))}


def test_real_answers_in_every_state_conform_to_the_description(described_daemon):
    schema = schemathesis.openapi.from_dict(DOCUMENT)
    client = described_daemon.client
    post = client.post
    classify = {"outputs": [{"name": "PROBABILITIES", "parameters": {"classification": 2}}], "id": "r1"}
    big = b"\0" * 6000
    body, headers = binary_request(["red", "blue"])
    cases: list[tuple[str, str, httpx.Response, int]] = [
        ("GET", "/", client.get("/"), 200),
        ("GET", "/models", client.get("/models"), 200),
        ("GET", "/models/{name}", client.get("/models/colours"), 200),
        ("GET", "/models/{name}", client.get("/models/empty"), 200),
        ("GET", "/models/{name}", client.get("/models/nope"), 404),
        ("GET", "/healthz", client.get("/healthz"), 200),
        ("GET", "/readyz", client.get("/readyz"), 503),
        ("GET", "/metrics", client.get("/metrics"), 200),
        ("GET", "/openapi.json", client.get("/openapi.json"), 200),
        ("POST", "/predict", post("/predict?top_k=2", content=png_bytes("red")), 200),
        ("POST", "/predict", post("/predict", files={"file": ("x.png", png_bytes("blue"), "image/png")}), 200),
        ("POST", "/predict", post("/predict", content=b"not an image"), 400),
        ("POST", "/predict", post("/predict?top_k=0", content=png_bytes("red")), 422),
        ("POST", "/predict", post("/predict", content=big), 413),
        ("POST", "/models/{name}/predict", post("/models/empty/predict", content=png_bytes("red")), 503),
        ("POST", "/models/{name}/predict", post("/models/nope/predict", content=png_bytes("red")), 404),
        ("GET", "/v2", client.get("/v2"), 200),
        ("GET", "/v2/health/live", client.get("/v2/health/live"), 200),
        ("GET", "/v2/health/ready", client.get("/v2/health/ready"), 503),
        ("GET", "/v2/models/{name}", client.get("/v2/models/colours"), 200),
        ("GET", "/v2/models/{name}", client.get("/v2/models/empty"), 503),
        ("GET", "/v2/models/{name}/versions/{version}", client.get("/v2/models/colours/versions/1"), 200),
        ("GET", "/v2/models/{name}/versions/{version}", client.get("/v2/models/colours/versions/2"), 404),
        ("GET", "/v2/models/{name}/ready", client.get("/v2/models/colours/ready"), 200),
        ("GET", "/v2/models/{name}/ready", client.get("/v2/models/empty/ready"), 503),
        ("GET", "/v2/models/{name}/versions/{version}/ready", client.get("/v2/models/colours/versions/1/ready"), 200),
        ("POST", "/v2/models/{name}/infer", post("/v2/models/colours/infer", json=image_request(["red"])), 200),
        (
            "POST",
            "/v2/models/{name}/infer",
            post("/v2/models/colours/infer", json=image_request(["red"], **classify)),
            200,
        ),
        ("POST", "/v2/models/{name}/infer", post("/v2/models/colours/infer", content=body, headers=headers), 200),
        ("POST", "/v2/models/{name}/infer", post("/v2/models/colours/infer", json={"inputs": []}), 400),
        ("POST", "/v2/models/{name}/infer", post("/v2/models/empty/infer", json=image_request(["red"])), 503),
        ("POST", "/v2/models/{name}/infer", post("/v2/models/colours/infer", content=big), 413),
        (
            "POST",
            "/v2/models/{name}/infer",
            post("/v2/models/colours/infer", json=image_request(["red"]), headers={"Content-Encoding": "gzip"}),
            415,
        ),
        (
            "POST",
            "/v2/models/{name}/versions/{version}/infer",
            post("/v2/models/colours/versions/1/infer", json=image_request(["green", "blue"])),
            200,
        ),
    ]
    for method, path, response, expected in cases:
        what = f"{method} {response.request.url.path}: {response.status_code} {response.text[:200]}"
        assert response.status_code == expected, what
        operation = schema[path][method]
        assert operation.responses.find_by_status_code(response.status_code) is not None, what
        media_type = response.headers["content-type"].partition(";")[0]
        assert media_type in documented_media_types(path, method, response.status_code), what
        response.request.read()  # a multipart request streams; Schemathesis reads what was sent
        operation.validate_response(response)  # the body against the status's schema, by its content type
        if response.status_code == 503 and "{name}" in path:
            assert response.headers["Retry-After"].isdigit(), what
        if response.status_code == 200 and path.endswith(("predict", "infer")):
            assert response.headers["X-Model-Version"] == "1", what
    assert client.get("/openapi.json").json() == json.loads(json.dumps(DOCUMENT))
    empty = client.get("/models/empty").json()
    assert empty["state"] == "not ready" and empty["live"] is None
    rejected = client.get("/models/colours").json()["files"]
    assert {f["status"] for f in rejected} == {"live", "rejected"}
