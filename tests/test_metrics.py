"""/metrics against a real daemon: counters move with predictions, swaps, rejections and config reloads."""

from __future__ import annotations

import base64
import os
import time

from conftest import Project, colours_yaml, png_bytes, sha256, wait_until
from prometheus_client.parser import text_string_to_metric_families
from tinynet import colour_state_dict


class Scrape:
    """One scrape of /metrics, parsed by prometheus_client's own parser."""

    def __init__(self, daemon) -> None:
        response = daemon.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        self.samples = [s for family in text_string_to_metric_families(response.text) for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sample's value, 0 when the series does not exist yet (a counter never incremented)."""
        found = [s.value for s in self.samples if s.name == name and s.labels == labels]
        assert len(found) <= 1, f"{name}{labels} is ambiguous"
        return found[0] if found else 0.0

    def labels(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == name]


def infer_batch(daemon, colours: list[str]):
    data = [base64.b64encode(png_bytes(c)).decode() for c in colours]
    body = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [len(data)], "data": data}]}
    return daemon.client.post("/v2/models/colours/infer", json=body)


def test_requests_latency_and_batch_sizes_count_every_prediction(project: Project, start_daemon):
    project.save("colours-v1.pt")
    daemon = start_daemon(project.config)
    before = Scrape(daemon)

    for colour in ["red", "green", "blue"]:
        assert daemon.predict(colour).status_code == 200
    assert daemon.client.post("/predict", content=png_bytes("red")).status_code == 200
    assert infer_batch(daemon, ["red", "green", "blue", "red"]).status_code == 200
    assert daemon.predict("red", model="nope").status_code == 404
    assert daemon.client.post("/predict", content=b"garbage").status_code == 400
    after = Scrape(daemon)

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    named = {"model": "colours", "route": "/models/{name}/predict"}
    assert delta("reloader_http_requests_total", **named, code="200") == 3
    assert delta("reloader_http_request_duration_seconds_count", **named) == 3
    assert delta("reloader_http_request_duration_seconds_sum", **named) > 0
    # /predict names no model in its path; the handler's resolved default model labels it.
    default = {"model": "colours", "route": "/predict"}
    assert delta("reloader_http_requests_total", **default, code="200") == 1
    assert delta("reloader_http_requests_total", **default, code="400") == 1
    assert delta("reloader_http_requests_total", model="colours", route="/v2/models/{name}/infer", code="200") == 1
    # An unknown name from the path never becomes a label value.
    assert delta("reloader_http_requests_total", model="", route="/models/{name}/predict", code="404") == 1
    assert not [labels for labels in after.labels("reloader_http_requests_total") if labels["model"] == "nope"]
    # Every image decoded went through exactly one forward pass: 3 + 1 + 4 images.
    assert delta("reloader_batch_size_sum", model="colours") == 8
    assert 1 <= delta("reloader_batch_size_count", model="colours") <= 8
    assert delta("reloader_forward_duration_seconds_count", model="colours") == delta(
        "reloader_batch_size_count", model="colours"
    )
    assert after.value("reloader_queue_depth", model="colours") == 0


def test_a_swap_and_a_rejection_move_their_counters_and_the_live_version(project: Project, start_daemon):
    first = project.save("colours-v1.pt")
    daemon = start_daemon(project.config)
    start = Scrape(daemon)
    assert start.value("reloader_swaps_total", model="colours") == 1  # the initial load is a swap too
    fp32 = {"precision": "fp32", "device": "cpu"}  # the config's defaults
    assert start.value("reloader_live_model_info", model="colours", version="1", sha256=sha256(first), **fp32) == 1

    second = project.save("colours-v2.pt", colour_state_dict(scale=5.0))
    daemon.wait_live(second)
    swapped = Scrape(daemon)

    assert swapped.value("reloader_swaps_total", model="colours") == 2
    serving_second = [{"model": "colours", "version": "2", "sha256": sha256(second), **fp32}]
    assert swapped.labels("reloader_live_model_info") == serving_second
    assert swapped.value("reloader_live_version", model="colours") == 2
    assert swapped.value("reloader_model_ready", model="colours") == 1
    assert swapped.value("reloader_reload_duration_seconds_count", model="colours", result="swapped") == 2
    assert swapped.value("reloader_rejections_total", model="colours", check="warmup") == 0

    bad = project.save("colours-v3.pt", colour_state_dict(permute=(1, 0, 2)))
    daemon.wait_file(bad, "rejected")
    rejected = Scrape(daemon)

    assert rejected.value("reloader_rejections_total", model="colours", check="warmup") == 1
    assert rejected.value("reloader_reload_duration_seconds_count", model="colours", result="rejected") == 1
    assert rejected.value("reloader_swaps_total", model="colours") == 2
    assert rejected.labels("reloader_live_model_info") == serving_second


def test_a_truncated_checkpoint_is_rejected_by_the_load_check(project: Project, start_daemon):
    project.save("colours-v1.pt")
    daemon = start_daemon(project.config)
    staged = project.stage("colours-v2.pt")
    staged.write_bytes(staged.read_bytes()[:100])
    broken = project.checkpoints / "colours-v2.pt"
    os.replace(staged, broken)

    daemon.wait_file(broken, "rejected")

    assert Scrape(daemon).value("reloader_rejections_total", model="colours", check="load") == 1


def test_liveness_and_config_age_are_read_at_scrape_time(project: Project, start_daemon):
    project.save("colours-v1.pt")
    # The daemon's log lives in the watched config folder: an access line per scrape would keep
    # restarting the config debounce, and the edit below would never be applied.
    daemon = start_daemon(project.config, "--no-access-log")
    first = Scrape(daemon)
    assert first.value("reloader_up") == 1
    assert first.value("reloader_watcher_alive") == 1
    assert first.value("reloader_config_error") == 0
    # Read at each scrape, the age grows with the clock rather than staying at its first value.
    age = first.value("reloader_config_age_seconds")
    wait_until(lambda: Scrape(daemon).value("reloader_config_age_seconds") > age, what="the config age to grow")

    edited_at = time.time()
    project.write_config(colours_yaml(server="  max_body_bytes: 123456\n"))
    wait_until(lambda: Scrape(daemon).value("reloader_config_reloads_total", result="applied") == 1, what="reload")
    reloaded = Scrape(daemon)
    assert reloaded.value("reloader_config_age_seconds") <= time.time() - edited_at

    project.write_config("models: [not, a, mapping]\n")
    wait_until(lambda: Scrape(daemon).value("reloader_config_error") == 1, what="the bad config to be seen")
    assert Scrape(daemon).value("reloader_config_reloads_total", result="rejected") == 1
