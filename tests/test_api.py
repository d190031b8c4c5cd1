"""The HTTP API against a real daemon on a real socket."""

from __future__ import annotations

import asyncio
import inspect
import io
import os
import signal
import threading
from pathlib import Path

import httpx
from conftest import Project, colours_yaml, png_bytes, sha256, wait_until
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from tinynet import colour_state_dict

from reloader import errors
from reloader.app import EXCEPTION_HANDLERS


def test_predict_returns_the_documented_answer_for_a_raw_body(project: Project, start_daemon):
    ckpt = project.save("colours-v1.pt")
    daemon = start_daemon(project.config)

    response = daemon.predict("green")

    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "colours"
    assert body["version"] == 1
    assert body["sha256"] == sha256(ckpt)
    assert sorted(p["label"] for p in body["predictions"]) == ["blue", "green", "red"]
    top = body["predictions"][0]
    assert (top["label"], top["index"]) == ("green", 1)
    assert top["probability"] > 0.9
    probabilities = [p["probability"] for p in body["predictions"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert abs(sum(probabilities) - 1.0) < 1e-3


def test_predict_accepts_multipart_and_the_default_model_route(project: Project, start_daemon):
    project.save("colours-v1.pt")
    daemon = start_daemon(project.config)

    response = daemon.client.post("/predict?top_k=1", files={"file": ("x.png", png_bytes("blue"), "image/png")})

    assert response.status_code == 200, response.text
    assert [p["label"] for p in response.json()["predictions"]] == ["blue"]


def test_top_k_is_capped_at_num_classes(project: Project, start_daemon):
    project.save("colours-v1.pt")
    daemon = start_daemon(project.config)

    response = daemon.predict("red", params={"top_k": 50})

    assert len(response.json()["predictions"]) == 3


def test_every_http_error_is_json_with_its_status_code(project: Project, start_daemon):
    project.save("colours-v1.pt")
    project.write_config(colours_yaml(server="  max_body_bytes: 5000\n"))
    daemon = start_daemon(project.config)
    post = daemon.client.post
    good = png_bytes("red")
    truncated = good[: len(good) // 2]
    cases = {
        "empty body": (post("/models/colours/predict", content=b""), 400),
        "random bytes": (post("/models/colours/predict", content=bytes(range(256)) * 4), 400),
        "truncated image": (post("/models/colours/predict", content=truncated), 400),
        "multipart without file": (post("/predict", files={"other": ("x", b"1")}), 400),
        "unknown model": (post("/models/nope/predict", content=good), 404),
        "unknown model status": (daemon.get("/models/nope"), 404),
        "body too large": (post("/models/colours/predict", content=b"\0" * 6000), 413),
        "top_k not a number": (post("/predict?top_k=abc", content=good), 422),
        "top_k zero": (post("/predict?top_k=0", content=good), 422),
    }
    for what, (response, status) in cases.items():
        assert response.status_code == status, f"{what}: {response.status_code} {response.text}"
        assert response.json()["error"], what


def test_every_api_error_declares_a_status_and_reaches_the_client_with_it():
    classes = {
        name: cls
        for name, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.ApiError) and cls is not errors.ApiError
    }
    assert {"InvalidRequest", "InvalidImage", "ModelNotFound", "Overloaded", "Unhealthy"} <= classes.keys()
    assert errors.ModelNotReady.headers == {"Retry-After": "5"} and errors.Overloaded.headers == {"Retry-After": "1"}

    async def fail(request: Request):
        raise classes[request.path_params["name"]](f"raised {request.path_params['name']}")

    app = Starlette(routes=[Route("/{name}", fail)], exception_handlers=EXCEPTION_HANDLERS)

    async def get_each() -> dict[str, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return {name: await client.get(f"/{name}") for name in classes}

    for name, response in asyncio.run(get_each()).items():
        cls = classes[name]
        assert 400 <= cls.status <= 599, name
        assert response.status_code == cls.status, name
        assert response.json() == {"error": f"raised {name}"}, name
        assert {h: response.headers.get(h) for h in cls.headers} == dict(cls.headers), name


def test_a_decompression_bomb_is_a_400(project: Project, start_daemon):
    project.save("colours-v1.pt")
    daemon = start_daemon(project.config)
    buf = io.BytesIO()
    # 20000 x 20000 pixels compress to a few hundred KB as a 1-bit PNG but exceed Pillow's bomb limit.
    Image.new("1", (20000, 20000)).save(buf, format="PNG")

    response = daemon.client.post("/predict", content=buf.getvalue())

    assert response.status_code == 400
    assert response.json()["error"].startswith("decompression bomb refused")


def test_a_model_without_a_valid_checkpoint_answers_503_while_others_serve(project: Project, start_daemon):
    project.save("colours-v1.pt")
    empty = project.root / "checkpoints" / "empty"
    empty.mkdir()
    extra = (
        "  empty:\n    arch: tinynet:colour_net\n    num_classes: 3\n    labels: [red, green, blue]\n"
        "    checkpoints: checkpoints/empty\n"
    )
    project.write_config(colours_yaml(extra_model=extra))
    daemon = start_daemon(project.config, ready=False)

    assert daemon.predict("red").status_code == 200
    not_ready = daemon.predict("red", model="empty")
    assert not_ready.status_code == 503
    assert "not ready" in not_ready.json()["error"]
    readyz = daemon.get("/readyz")
    assert readyz.status_code == 503
    assert "empty" in readyz.json()["error"]
    assert daemon.get("/healthz").status_code == 200


def test_status_lists_live_version_report_and_every_candidate(project: Project, start_daemon):
    good = project.save("colours-v1.pt")
    older = project.save("colours-v0.pt")
    bad = project.save("colours-v2.pt", colour_state_dict(permute=(1, 0, 2)))
    daemon = start_daemon(project.config)

    status = daemon.status()

    assert status["state"] == "ready"
    assert status["live"]["version"] == 1
    assert status["live"]["path"] == str(good)
    assert status["live"]["loaded_at"] > 0
    assert [c["name"] for c in status["live"]["report"]["checks"]] == ["load", "structure", "finite", "warmup"]
    files = {f["path"]: f for f in status["files"]}
    assert files[str(good)]["status"] == "live"
    assert files[str(older)]["status"] == "standby"
    assert files[str(bad)]["status"] == "rejected"
    assert "expected 'red', got 'green'" in files[str(bad)]["reason"]
    everything = daemon.get("/models").json()
    assert everything["models"]["colours"]["live"]["version"] == 1
    assert everything["config"]["error"] is None


def test_sigterm_finishes_requests_in_flight_and_exits_zero(project: Project, start_daemon):
    project.save("colours-v1.pt")
    # A slow body keeps a request in flight while the signal arrives.
    daemon = start_daemon(project.config)
    body = png_bytes("blue")
    sent_first_half = []

    def slow_body():
        yield body[:10]
        sent_first_half.append(True)
        wait_until(lambda: "SIGTERM received" in daemon.log(), what="the daemon to see SIGTERM")
        yield body[10:]

    results = []

    def send() -> None:
        with httpx.Client(timeout=30) as client:
            results.append(client.post(f"{daemon.url}/predict", content=slow_body()))

    sender = threading.Thread(target=send)
    sender.start()
    wait_until(lambda: sent_first_half, what="the request to be in flight")
    daemon.signal(signal.SIGTERM)
    sender.join(timeout=30)

    assert daemon.proc.wait(timeout=30) == 0
    assert results and results[0].status_code == 200
    assert results[0].json()["predictions"][0]["label"] == "blue"


def _thread_priorities(pid: int) -> dict[str, set[tuple[int, int]]]:
    """Each OS thread name in a process, with the (nice value, scheduling policy) of the threads so named (/proc)."""
    found: dict[str, set[tuple[int, int]]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        found.setdefault(name, set()).add((int(fields[16]), int(fields[38])))  # fields 19 and 41 of stat
    return found


def test_decoding_and_reloading_run_below_the_priority_of_serving_s_forward_pass(project: Project, start_daemon):
    project.save("colours-v1.pt")
    daemon = start_daemon(project.config)
    for colour in ("red", "green", "blue"):  # three at once: both decode threads start
        assert daemon.predict(colour).status_code == 200

    threads = _thread_priorities(daemon.proc.pid)

    background = (19, os.SCHED_IDLE)
    decoders = set().union(*(seen for name, seen in threads.items() if name.startswith("decode_")))
    assert decoders == {background}, threads
    assert threads["inference_0"] == {(0, os.SCHED_OTHER)}, threads  # the forward pass, at the process's priority
    assert threads["reload-colours"] == {background}, threads
