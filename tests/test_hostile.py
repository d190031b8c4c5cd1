"""Hostile input and faults (issue 13): work bounded per request, per file and per config, and no 500s."""

from __future__ import annotations

import json
import os
import re
import socket
import threading

import pytest
import torch
from conftest import DEADLINE, Project, colours_yaml, png_bytes, wait_until
from PIL import Image

from reloader.checkpoints import load_checkpoint, sha256_file
from reloader.config import Preprocess, load_config
from reloader.errors import CheckpointRejected, ConfigError, InvalidImage
from reloader.images import Preprocessor, decode_image


def finishes(fn, seconds: float = 20.0):
    """Run `fn` on a thread and fail, rather than hang the suite, if it does not return in time."""
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn} did not return in {seconds} s"
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result.get("value")


# -- files -------------------------------------------------------------------------------------------


def test_a_checkpoint_path_that_became_a_symlink_to_dev_zero_is_refused_without_reading(project: Project):
    link = project.checkpoints / "colours-v9.pt"
    link.symlink_to("/dev/zero")
    with pytest.raises(CheckpointRejected, match="a symbolic link, not a regular file"):
        finishes(lambda: load_checkpoint(link))
    with pytest.raises(OSError, match="symbolic link"):
        finishes(lambda: sha256_file(link))


def test_a_checkpoint_path_that_became_a_fifo_is_refused_without_blocking(project: Project):
    fifo = project.checkpoints / "colours-v9.pt"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointRejected, match=r"not a regular file \(mode p"):
        finishes(lambda: load_checkpoint(fifo))


# -- requests ----------------------------------------------------------------------------------------


def _serving(project: Project, start_daemon, *, preprocess: str):
    """A daemon serving colours-v1.pt, with the config's preprocess line replaced by `preprocess`."""
    project.save("colours-v1.pt")
    project.config.write_text(colours_yaml().replace("{resize: 32, crop: 32}", preprocess))
    return start_daemon(project.config)


def test_an_image_of_extreme_shape_is_resampled_only_where_the_crop_keeps(monkeypatch):
    sizes: list[tuple[int, int]] = []
    real_resize = Image.Image.resize

    def recording(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        return real_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    pre = Preprocessor(Preprocess(resize=256, crop=224))
    for shape in ((100_000, 1), (1, 100_000), (3000, 20)):
        tensor = pre(Image.new("RGB", shape, (200, 30, 30)))
        assert tuple(tensor.shape) == (3, 224, 224)
        assert float(tensor[0].mean()) == pytest.approx((200 / 255 - 0.485) / 0.229, abs=0.02)
    # Without the box, 100000x1 would have been resized to 25,600,000x256 first.
    assert max(w * h for w, h in sizes) <= 224 * 224


def test_an_image_over_max_pixels_is_refused_before_it_is_decoded():
    big = Image.new("RGB", (2000, 1000), (0, 0, 0))
    import io

    buf = io.BytesIO()
    big.save(buf, format="PNG")
    refused = r"2000x1000 pixels exceeds the limit of 1000000 pixels \(preprocess.max_pixels\)"
    with pytest.raises(InvalidImage, match=refused):
        decode_image(buf.getvalue(), max_pixels=1_000_000)
    assert decode_image(buf.getvalue(), max_pixels=2_000_000).size == (2000, 1000)


def test_a_v2_request_whose_images_together_exceed_max_request_pixels_is_refused_before_decoding(
    project: Project, start_daemon
):
    import base64

    daemon = _serving(project, start_daemon, preprocess="{resize: 32, crop: 32, max_request_pixels: 5000000}")

    def infer(count: int):
        big = png_bytes("green", size=2000)  # 4,000,000 pixels, a few kB on the wire
        data = [base64.b64encode(big).decode()] * count
        doc = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [count], "data": data}]}
        return daemon.client.post("/v2/models/colours/infer", json=doc)

    refused = infer(4)
    assert refused.status_code == 413
    assert refused.json()["error"] == (
        "the request's 4 image(s) hold 16000000 pixels together, over the limit of 5000000 "
        "(preprocess.max_request_pixels)"
    )
    assert infer(1).status_code == 200
    # One image alone is held to the lower of max_pixels and max_request_pixels.
    alone = daemon.client.post("/models/colours/predict", content=png_bytes("red", size=2300))
    assert alone.status_code == 400
    assert "exceeds the limit of 5000000 pixels" in alone.json()["error"]


def test_an_inference_header_length_of_thousands_of_digits_is_a_400(project: Project, start_daemon):
    project.save("colours-v1.pt")
    daemon = start_daemon(project.config)
    body = b'{"inputs": []}'
    response = daemon.client.post(
        "/v2/models/colours/infer", content=body, headers={"Inference-Header-Content-Length": "9" * 5000}
    )
    assert response.status_code == 400
    assert "is not a length within the 14-byte body" in response.json()["error"]
    assert len(response.json()["error"]) < 200


def test_a_client_that_hangs_up_mid_upload_is_not_a_server_error(project: Project, start_daemon):
    from test_metrics import Scrape

    project.save("colours-v1.pt")
    daemon = start_daemon(project.config)
    with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
        head = "POST /models/colours/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        sock.sendall(f"{head}Content-Length: 100000\r\n\r\n".encode() + png_bytes("red")[:100])
    route = "/models/{name}/predict"
    wait_until(lambda: Scrape(daemon).value("reloader_http_requests_total", model="colours", route=route, code="499"))
    assert Scrape(daemon).value("reloader_http_requests_total", model="colours", route=route, code="500") == 0
    assert "unhandled error" not in daemon.log()
    assert daemon.predict("green").json()["predictions"][0]["label"] == "green"


# -- config ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("  port: 0\n", "  port: 0\n  port: 1\n"), "duplicate key 'port' (each key may appear"),
        (lambda t: t[: t.index("models:")] + "models: {}\n", "models: dictionary should have at least 1 item"),
        (lambda t: t + "watch: {config_debounce_ms: 1000000000}\n", "watch.config_debounce_ms: must be <= 10000"),
        (lambda t: t.replace("{resize: 32, crop: 32}", "{resize: 100000, crop: 32}"), "must be <= 4096"),
        (lambda t: t + "    batch: {queue_size: 10000000}\n", "must be <= 100000"),
        (lambda t: t.replace("labels: [red, green, blue]", "labels: /dev/zero"), "not a regular file (mode c"),
    ],
    ids=["duplicate key", "no models", "debounce", "resize", "queue", "labels from /dev/zero"],
)
def test_sizes_durations_and_files_a_config_names_are_bounded(project: Project, edit, message):
    project.write_config(edit(colours_yaml()))
    with pytest.raises(ConfigError, match=re.escape(message)):
        finishes(lambda: load_config(project.config))


def test_a_yaml_alias_bomb_is_refused_by_its_number_of_aliases(project: Project):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join(['*a' + str(i - 1)] * 12)}]" for i in range(1, 10)]  # 108 aliases
    bomb = "\n".join(levels) + "\n"
    project.write_config(bomb + colours_yaml().replace("labels: [red, green, blue]", "labels: *a9"))
    with pytest.raises(ConfigError, match="invalid YAML: more than 100 aliases"):
        finishes(lambda: load_config(project.config))


def test_a_bomb_within_the_alias_limit_gets_a_bounded_message(project: Project):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join(['*a' + str(i - 1)] * 8)}]" for i in range(1, 9)]
    bomb = "\n".join(levels) + "\n"  # 64 aliases, 8**9 = 134 million leaves
    project.write_config(bomb + colours_yaml().replace("labels: [red, green, blue]", "labels: *a8"))
    with pytest.raises(ConfigError) as raised:
        finishes(lambda: load_config(project.config))
    assert len(str(raised.value)) < 2000, len(str(raised.value))
    assert str(raised.value).endswith("more")  # ten problems named, the rest counted


def test_the_cli_answers_a_bounded_config_error_in_one_line(project: Project):
    from test_cli import run

    project.write_config(colours_yaml().replace("{resize: 32, crop: 32}", "{resize: 100000, crop: 32}"))
    result = run("validate", "--config", str(project.config), str(project.stage("good.pt")))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "must be <= 4096" in result.stderr
    assert torch.__version__  # the subprocess ran the real CLI with torch installed


def test_file_names_that_are_not_utf8_or_hold_a_newline_are_shown_escaped(project: Project, start_daemon):
    project.save("colours-v1.pt")
    daemon = start_daemon(project.config)
    folder = os.fsencode(project.checkpoints)
    for raw in (b"colours-v2\xff.pt", b"colours-v3\nINFO forged line.pt"):
        with open(folder + b"/" + raw, "wb") as fh:  # garbage content: each is looked at, then rejected
            fh.write(b"not a checkpoint")
    shown = [f"{project.checkpoints}/colours-v2\\xff.pt", f"{project.checkpoints}/colours-v3\\x0aINFO forged line.pt"]

    def rejected() -> bool:
        response = daemon.get("/models/colours")
        assert response.status_code == 200, response.text
        files = {f["path"]: f["status"] for f in response.json()["files"]}
        return all(files.get(name) == "rejected" for name in shown)

    wait_until(rejected, what="both odd names to be listed as rejected")
    assert daemon.get("/models").status_code == 200
    for raw in (b"colours-v2\xff.pt", b"colours-v3\nINFO forged line.pt"):
        os.remove(folder + b"/" + raw)  # gone from the folder, still in the events: still no 500
    wait_until(lambda: len(daemon.status()["files"]) == 1, what="the odd names to leave the listing")
    assert {e["file"] for e in daemon.status()["events"] if e["event"] == "rejected"} >= set(shown)
    assert not [line for line in daemon.log().splitlines() if line.startswith("INFO forged")]


@pytest.mark.parametrize("size", [300_000, 8_000_000])
def test_a_plain_client_sending_a_body_over_the_limit_reads_the_413(project: Project, start_daemon, size: int):
    """urllib (like requests) sends the whole body before it reads: the server must take it in to answer."""
    import urllib.error
    import urllib.request

    project.save("colours-v1.pt")
    project.write_config(colours_yaml(server="  max_body_bytes: 5000\n"))
    daemon = start_daemon(project.config)
    request = urllib.request.Request(
        f"{daemon.url}/models/colours/predict", data=b"\0" * size, headers={"Content-Type": "image/png"}
    )
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=DEADLINE)
    assert raised.value.code == 413
    assert "exceeds max_body_bytes (5000)" in json.loads(raised.value.read())["error"]
    assert daemon.get("/healthz").status_code == 200


def test_a_v2_shape_of_huge_numbers_is_refused_before_any_arithmetic():
    """[10**4000] * 1200 is a 4.8 MB body that held the GIL for about 37 s in math.prod."""
    from reloader.errors import InvalidRequest
    from reloader.v2 import parse_infer

    huge = "1" + "0" * 4000
    body = '{"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [%s], "data": []}]}'
    with pytest.raises(InvalidRequest, match="1200 dimensions; at most 8"):
        parse_infer((body % ",".join([huge] * 1200)).encode(), None, 64)
    with pytest.raises(InvalidRequest, match="has a shape dimension over 64") as raised:
        parse_infer((body % ",".join([huge] * 8)).encode(), None, 64)
    assert len(str(raised.value)) < 200
    with pytest.raises(InvalidRequest, match=r"must be an integer >= 0, got -1000.*\.\.\.") as raised:
        parse_infer((body % f"-{huge}").encode(), None, 64)
    assert len(str(raised.value)) < 200


def test_a_flood_of_slow_decodes_is_refused_503_before_decoding_and_keeps_no_one_out_for_good(
    project: Project, start_daemon
):
    import io

    import httpx
    import numpy as np

    daemon = _serving(project, start_daemon, preprocess="{resize: 32, crop: 32}\n    batch: {queue_size: 2}")
    noise = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="JPEG", quality=95)  # 12 MP: tens of ms to decode, each
    slow = buf.getvalue()
    start = threading.Barrier(16)
    answers: list[httpx.Response] = []
    errors: list[str] = []

    def send() -> None:
        start.wait()
        try:
            answers.append(httpx.post(f"{daemon.url}/models/colours/predict", content=slow, timeout=DEADLINE))
        except Exception as exc:  # recorded: a dead thread would only shorten `answers`
            errors.append(f"{type(exc).__name__}: {exc}")

    senders = [threading.Thread(target=send) for _ in range(16)]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join()

    assert errors == [] and len(answers) == 16
    refused = [a for a in answers if a.status_code == 503]
    assert refused, "16 slow decodes at once against a queue of 2: some must be refused"
    assert {a.status_code for a in answers} <= {200, 503}
    for answer in refused:
        assert answer.headers["retry-after"] == "1"
        assert "counting those decoding" in answer.json()["error"]
    assert daemon.predict("blue").json()["predictions"][0]["label"] == "blue"


def test_decoding_counts_toward_request_timeout_s(project: Project, start_daemon):
    """A 36-megapixel PNG takes far longer than 50 ms to decode: the request ends at its deadline with a 503."""
    import io

    project.save("colours-v1.pt")
    project.write_config(colours_yaml(server="  request_timeout_s: 0.05\n  max_body_bytes: 200000000\n"))
    daemon = start_daemon(project.config)
    buf = io.BytesIO()
    Image.new("RGB", (6000, 6000), (200, 30, 30)).save(buf, format="PNG")

    slow = daemon.client.post("/models/colours/predict", content=buf.getvalue(), headers={"content-type": "image/png"})

    assert slow.status_code == 503, slow.text
    assert slow.json()["error"] == "timed out after 0.05 s decoding the images for 'colours'"
    assert slow.headers["retry-after"] == "1"
    assert daemon.get("/healthz").status_code == 200


# -- reloads -----------------------------------------------------------------------------------------


def _release(fifo) -> bool:
    """Open the FIFO's writing end, which ends the stalled read; False while no one is reading it."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        return False
    return True


def test_a_reload_stuck_past_its_bound_fails_healthz_and_sigterm_still_ends_the_process(
    project: Project, start_daemon, tmp_path
):
    from tinynet import STALL, colour_state_dict

    fifo = tmp_path / "stall.fifo"
    os.mkfifo(fifo)
    project.save("colours-v1.pt")
    text = colours_yaml(server="  stuck_reload_s: 1\n").replace("tinynet:colour_net", "tinynet:stalling_net")
    project.config.write_text(text)
    daemon = start_daemon(project.config, env={"TINYNET_STALL_FIFO": str(fifo)})
    stalling = colour_state_dict()
    stalling["fc.bias"][0] = STALL

    stuck = project.save("colours-v2.pt", stalling)  # its load hangs
    wait_until(lambda: daemon.get("/healthz").status_code == 503, what="/healthz to notice the stuck reload")
    error = daemon.get("/healthz").json()["error"]
    assert "model 'colours''s reload has run for" in error and "(server.stuck_reload_s: 1)" in error
    assert "\nreloader_up 0.0\n" in daemon.get("/metrics").text
    assert daemon.predict("green").json()["version"] == 1  # the live version serves on

    wait_until(lambda: _release(fifo), what="the stalled warm-up to read the FIFO")
    daemon.wait_live(stuck)  # once its load goes on, it is an ordinary valid checkpoint
    wait_until(lambda: daemon.get("/healthz").status_code == 200, what="/healthz to recover")

    project.save("colours-v3.pt", {**stalling, "fc.weight": stalling["fc.weight"] * 2})
    wait_until(lambda: daemon.get("/healthz").status_code == 503, what="the next stuck reload")
    assert daemon.stop() == 0  # a thread stuck in a read does not hold the process
    assert "did not stop within 5 s" in daemon.log()


def test_a_model_taken_out_of_the_config_while_its_reload_is_stuck_does_not_come_back_when_the_read_ends(
    project: Project, start_daemon, tmp_path
):
    """Its worker, left behind by the stop, used to carry on once the read ended: it put the removed model back
    in the registry (in /metrics, with its memory, for good) and logged it live. And the server went on
    answering meanwhile."""
    from tinynet import STALL, colour_state_dict

    fifo = tmp_path / "stall.fifo"
    os.mkfifo(fifo)
    project.save("colours-v1.pt")
    second = project.checkpoints.parent / "second"
    second.mkdir()
    project.save("second-v1.pt", folder=second)
    model = colours_yaml().split("  colours:\n", 1)[1].replace("colour_net", "stalling_net")
    both = colours_yaml(
        server="  stuck_reload_s: 1\n", extra_model="  second:\n" + model.replace("/colours", "/second")
    )
    project.write_config(both)
    daemon = start_daemon(project.config, env={"TINYNET_STALL_FIFO": str(fifo)})
    stalling = colour_state_dict()
    stalling["fc.bias"][0] = STALL
    project.save("second-v2.pt", stalling, folder=second)  # its load hangs
    wait_until(lambda: daemon.get("/healthz").status_code == 503, what="/healthz to notice the stuck reload")

    project.write_config(colours_yaml(server="  stuck_reload_s: 1\n"))
    # Answered while the removal waits its 5 s for the stuck thread: it used to wait under the lock that
    # /healthz, /metrics and /models take on the event loop, and every request waited with it, predictions too.
    wait_until(lambda: "second" not in daemon.get("/models").json()["models"], what="a config without second")
    assert "did not stop within" not in daemon.log()
    wait_until(lambda: "model second: removed from the config" in daemon.log(), what="second's removal")
    assert "reload-second did not stop within 5 s" in daemon.log()
    wait_until(lambda: _release(fifo), what="the stalled load to read the FIFO")
    stops = "reload-second stops: second-v2.pt was judged, but the verdict is not acted on"
    wait_until(lambda: stops in daemon.log(), what="the worker left behind to end")
    assert "model second: version 2 live" not in daemon.log()
    metrics = daemon.get("/metrics").text
    assert 'reloader_live_version{model="colours"} 1.0' in metrics and 'live_version{model="second"}' not in metrics
    assert daemon.get("/healthz").status_code == 200
    assert daemon.predict("green").json()["predictions"][0]["label"] == "green"
