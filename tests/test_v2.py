"""The Open Inference Protocol v2, spoken by the real tritonclient.http against a real daemon."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest
import tritonclient.http as triton
from conftest import Project, colours_yaml, png_bytes
from tritonclient.utils import InferenceServerException

import reloader

LABELS = ["red", "green", "blue"]


@pytest.fixture
def daemon(project: Project, start_daemon):
    project.save("colours-v1.pt")
    return start_daemon(project.config)


@pytest.fixture
def client(daemon):
    # geventhttpclient runs in the test's own thread; the client is closed before the daemon stops.
    with triton.InferenceServerClient(url=f"127.0.0.1:{daemon.port}", network_timeout=30.0) as client:
        yield client


def images_input(colours: list[str], *, binary: bool) -> triton.InferInput:
    images = [png_bytes(c) for c in colours]
    # Image bytes are not UTF-8: in plain JSON each element travels base64-encoded.
    elements = images if binary else [base64.b64encode(image) for image in images]
    tensor = triton.InferInput("IMAGE", [len(colours)], "BYTES")
    tensor.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=binary)
    return tensor


def test_health_and_metadata_answer_tritonclient(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("colours")
    assert client.is_model_ready("colours", "1")
    assert not client.is_model_ready("colours", "2")
    assert not client.is_model_ready("nope")

    server = client.get_server_metadata()
    assert server == {
        "name": "reloader",
        "version": reloader.__version__,
        "extensions": ["classification", "binary_tensor_data"],
    }
    model = client.get_model_metadata("colours")
    assert model["name"] == "colours"
    assert model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "IMAGE", "datatype": "BYTES", "shape": [-1]}]
    assert model["outputs"] == [{"name": "PROBABILITIES", "datatype": "FP32", "shape": [-1, 3]}]
    assert client.get_model_metadata("colours", "1") == model


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_returns_probabilities_for_a_batch(client, binary: bool):
    colours = ["green", "red", "blue", "green"]
    output = triton.InferRequestedOutput("PROBABILITIES", binary_data=binary)

    result = client.infer("colours", [images_input(colours, binary=binary)], outputs=[output], request_id="r-7")

    probs = result.as_numpy("PROBABILITIES")
    assert probs.dtype == np.float32
    assert probs.shape == (4, 3)
    assert [LABELS[i] for i in probs.argmax(axis=1)] == colours
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs.max(axis=1) > 0.9).all()
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("colours", "1", "r-7")
    assert ("parameters" in response["outputs"][0]) is binary


def test_infer_matches_predict_for_the_same_image(client, daemon):
    result = client.infer("colours", [images_input(["blue"], binary=True)])

    predicted = daemon.predict("blue").json()["predictions"]
    probs = result.as_numpy("PROBABILITIES")[0]
    for p in predicted:
        assert probs[p["index"]] == pytest.approx(p["probability"], abs=1e-6)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_classification_returns_score_index_label_strings(client, binary: bool):
    output = triton.InferRequestedOutput("PROBABILITIES", binary_data=binary, class_count=2)

    result = client.infer("colours", [images_input(["red", "blue"], binary=True)], outputs=[output])

    top = result.as_numpy("PROBABILITIES")
    assert top.shape == (2, 2)
    rows = [[(e.decode() if isinstance(e, bytes) else e).split(":") for e in row] for row in top]
    assert [row[0][1:] for row in rows] == [["0", "red"], ["2", "blue"]]
    for row in rows:
        scores = [float(score) for score, _, _ in row]
        assert scores == sorted(scores, reverse=True)
        assert scores[0] > 0.9


def test_classification_count_is_capped_at_the_number_of_classes(client):
    output = triton.InferRequestedOutput("PROBABILITIES", class_count=10)

    result = client.infer("colours", [images_input(["green"], binary=True)], outputs=[output])

    labels = [e.decode().split(":")[2] for e in result.as_numpy("PROBABILITIES")[0]]
    assert labels[0] == "green"
    assert sorted(labels) == sorted(LABELS)


def test_infer_on_the_live_version_path_works_and_another_version_is_a_404(client):
    inputs = [images_input(["red"], binary=True)]

    assert client.infer("colours", inputs, model_version="1").as_numpy("PROBABILITIES").argmax() == 0
    with pytest.raises(InferenceServerException) as wrong:
        client.infer("colours", inputs, model_version="7")

    assert wrong.value.status() == "404"
    assert "no version '7'" in wrong.value.message()
    assert "the live version is 1" in wrong.value.message()


def test_unknown_model_and_undecodable_image_are_client_errors(client):
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("nope", [images_input(["red"], binary=True)])
    tensor = triton.InferInput("IMAGE", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as garbage:
        client.infer("colours", [tensor])

    assert unknown.value.status() == "404"
    assert "unknown model 'nope'" in unknown.value.message()
    assert garbage.value.status() == "400"


def test_a_model_without_a_live_version_is_not_ready(project: Project, start_daemon):
    project.save("colours-v1.pt")
    (project.root / "checkpoints" / "empty").mkdir()
    extra = (
        "  empty:\n    arch: tinynet:colour_net\n    num_classes: 3\n    labels: [red, green, blue]\n"
        "    checkpoints: checkpoints/empty\n"
    )
    project.write_config(colours_yaml(extra_model=extra))
    daemon = start_daemon(project.config, ready=False)

    with triton.InferenceServerClient(url=f"127.0.0.1:{daemon.port}") as client:
        assert client.is_server_live()
        assert not client.is_server_ready()
        assert client.is_model_ready("colours")
        assert not client.is_model_ready("empty")
        with pytest.raises(InferenceServerException) as not_ready:
            client.infer("empty", [images_input(["red"], binary=True)])

    assert not_ready.value.status() == "503"
    assert "not ready" in not_ready.value.message()


def binary_request(header: dict, payload: bytes, length: int | None = None) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + payload, {"Inference-Header-Content-Length": str(len(head) if length is None else length)}


def test_malformed_requests_are_400_with_an_error_message(daemon):
    image = png_bytes("red")
    good = base64.b64encode(image).decode()
    one = {"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [good]}
    framed = struct.pack("<I", len(image)) + image
    sized = {"name": "IMAGE", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(framed)}}
    nested = {"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], "data": [[good]]}
    cases = {
        "not JSON": (b"{inputs", {}),
        "JSON but not an object": (b"[1, 2]", {}),
        "deeply nested JSON": (b"[" * 5000 + b"]" * 5000, {}),
        "no inputs": (json.dumps({}).encode(), {}),
        "two inputs": (json.dumps({"inputs": [one, one]}).encode(), {}),
        "unknown input name": (json.dumps({"inputs": [{**one, "name": "INPUT0"}]}).encode(), {}),
        "wrong datatype": (json.dumps({"inputs": [{**one, "datatype": "FP32", "data": [1.0]}]}).encode(), {}),
        "bad base64": (json.dumps({"inputs": [{**one, "data": ["%%% not base64"]}]}).encode(), {}),
        "element not a string": (json.dumps({"inputs": [{**one, "data": [17]}]}).encode(), {}),
        "shape disagrees with data": (json.dumps({"inputs": [{**one, "shape": [3]}]}).encode(), {}),
        "shape not a list": (json.dumps({"inputs": [{**one, "shape": "1"}]}).encode(), {}),
        "no images": (json.dumps({"inputs": [{**one, "shape": [0], "data": []}]}).encode(), {}),
        "two outputs": (json.dumps({"inputs": [one], "outputs": [{"name": "PROBABILITIES"}] * 2}).encode(), {}),
        "unknown output": (json.dumps({"inputs": [one], "outputs": [{"name": "LOGITS"}]}).encode(), {}),
        "classification not a number": (
            json.dumps(
                {"inputs": [one], "outputs": [{"name": "PROBABILITIES", "parameters": {"classification": "x"}}]}
            ).encode(),
            {},
        ),
        "binary_data_output not a bool": (
            json.dumps({"inputs": [one], "parameters": {"binary_data_output": "yes"}}).encode(),
            {},
        ),
        "header length not a number": binary_request({"inputs": [sized]}, framed, length=-3),
        "header length past the body": binary_request({"inputs": [sized]}, framed, length=10**6),
        "binary size disagrees": binary_request(
            {"inputs": [{**sized, "parameters": {"binary_data_size": len(framed) + 5}}]}, framed
        ),
        "element length past the data": binary_request(
            {"inputs": [sized]}, struct.pack("<I", len(image) + 100) + image
        ),
        "truncated length prefix": binary_request(
            {"inputs": [{**sized, "parameters": {"binary_data_size": 2}}]}, b"\x01\x00"
        ),
        "binary data nobody declared": binary_request({"inputs": [one]}, framed),
        "shared memory": (
            json.dumps({"inputs": [{**one, "parameters": {"shared_memory_region": "r"}}]}).encode(),
            {},
        ),
    }
    for what, (body, headers) in cases.items():
        response = daemon.client.post("/v2/models/colours/infer", content=body, headers=headers)
        assert response.status_code == 400, f"{what}: {response.status_code} {response.text}"
        assert response.json()["error"], what
    # The same request, well formed, succeeds: the cases above failed for the reason named.
    for body, headers in [
        (json.dumps({"inputs": [one]}).encode(), {}),
        (json.dumps({"inputs": [nested]}).encode(), {}),
        binary_request({"inputs": [sized]}, framed),
    ]:
        response = daemon.client.post("/v2/models/colours/infer", content=body, headers=headers)
        assert response.status_code == 200, response.text


def test_infer_bodies_over_max_body_bytes_are_refused(project: Project, start_daemon):
    project.save("colours-v1.pt")
    project.write_config(colours_yaml(server="  max_body_bytes: 5000\n"))
    daemon = start_daemon(project.config)
    big = base64.b64encode(b"\0" * 6000).decode()
    body = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [big]}]}

    response = daemon.client.post("/v2/models/colours/infer", json=body)

    assert response.status_code == 413
    assert "max_body_bytes" in response.json()["error"]
