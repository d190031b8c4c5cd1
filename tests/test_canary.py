"""The shadow canary against a real daemon: candidates that passed the gate are judged on live traffic."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from conftest import DEADLINE, Project, colours_yaml, png_bytes, sha256, wait_until
from test_metrics import Scrape
from tinynet import COLOURS, colour_state_dict

# Green and blue swapped: the one warm-up image (red) still answers right, so the gate passes it.
SWAPPED = (0, 2, 1)


def canary_yaml(requests: int = 30, max_wait_s: float = 120, on_timeout: str = "reject") -> str:
    config = colours_yaml()
    config = config.replace(
        "      images: [golden/red.png, golden/green.png, golden/blue.png]\n      expect: [red, green, blue]\n",
        "      images: [golden/red.png]\n      expect: [red]\n",
    )
    return config + (
        "    canary:\n"
        f"      requests: {requests}\n"
        "      min_agreement: 0.97\n"
        f"      max_wait_s: {max_wait_s}\n"
        f"      on_timeout: {on_timeout}\n"
    )


@contextmanager
def traffic(url: str) -> Iterator[list[tuple[str, int, str, int]]]:
    """Live requests, one after another, cycling through the colours: (colour, status, label, version)."""
    answers: list[tuple[str, int, str, int]] = []
    stop = threading.Event()

    def send() -> None:
        with httpx.Client(base_url=url, timeout=DEADLINE) as client:
            i = 0
            while not stop.is_set():
                colour = COLOURS[i % 3]
                i += 1
                headers = {"content-type": "image/png"}
                try:
                    r = client.post("/models/colours/predict", content=png_bytes(colour), headers=headers)
                    label = r.json()["predictions"][0]["label"] if r.status_code == 200 else ""
                    answers.append((colour, r.status_code, label, int(r.headers.get("x-model-version", -1))))
                except Exception as exc:  # a reset or a body not JSON: a failed answer (status -1), not a dead thread
                    answers.append((colour, -1, f"{type(exc).__name__}: {exc}", -1))

    thread = threading.Thread(target=send, name="test-traffic")
    thread.start()
    try:
        yield answers
    finally:
        stop.set()
        thread.join(DEADLINE)


def canary_of(daemon) -> dict | None:
    return daemon.status().get("canary")


def test_a_candidate_that_disagrees_on_live_traffic_is_rejected_and_never_answers(project: Project, start_daemon):
    project.write_config(canary_yaml())
    v1 = project.save("colours-v1.pt")
    daemon = start_daemon(project.config)
    daemon.wait_live(v1)  # nothing was live: the first version goes live at once, with no canary

    v2 = project.save("colours-v2.pt", colour_state_dict(permute=SWAPPED))
    canary = wait_until(lambda: canary_of(daemon), what="v2 to become the canary")
    assert canary["version"] == 2 and canary["state"] == "shadowing" and canary["requests"] == 30
    assert daemon.wait_file(v2, "canary")["status"] == "canary"
    assert daemon.live_sha() == sha256(v1)

    with traffic(daemon.url) as answers:
        rejected = daemon.wait_file(v2, "rejected")
    assert rejected["reason"].startswith("canary: top-1 agreement 0.3")
    assert rejected["reason"].endswith(" < 0.97 over 30 requests")
    assert canary_of(daemon) is None
    assert answers and all(status == 200 for _, status, _, _ in answers)
    assert {version for _, _, _, version in answers} == {1}, "a live answer came from the canary"
    assert all(label == colour for colour, _, label, _ in answers)
    assert Scrape(daemon).value("reloader_rejections_total", model="colours", check="canary") == 1
    assert "version 2 is the canary" in daemon.log()


def test_a_candidate_that_agrees_is_promoted_after_its_comparisons(project: Project, start_daemon):
    project.write_config(canary_yaml())
    v1 = project.save("colours-v1.pt")
    daemon = start_daemon(project.config)
    daemon.wait_live(v1)

    v2 = project.save("colours-v2.pt", colour_state_dict(scale=5.0))
    wait_until(lambda: canary_of(daemon), what="v2 to become the canary")
    with traffic(daemon.url) as answers:
        status = daemon.wait_live(v2)
        # Answers after the promotion come from version 2; none before it did.
        wait_until(lambda: any(version == 2 for *_, version in answers), what="an answer from version 2")
    swap = next(e for e in status["events"] if e["result"] == "live")
    assert swap["reason"] == "canary: top-1 agreement 1.000 >= 0.97 over 30 requests"
    assert all(status == 200 for _, status, _, _ in answers)
    versions = [version for *_, version in answers]
    assert versions == sorted(versions), "an answer from version 1 came after one from version 2"
    assert "promoted by its canary: top-1 agreement 1.000" in daemon.log()


def test_a_canary_without_traffic_times_out_as_on_timeout_says_and_a_newer_candidate_replaces_one(
    project: Project, start_daemon
):
    project.write_config(canary_yaml(max_wait_s=600))
    v1 = project.save("colours-v1.pt")
    daemon = start_daemon(project.config)
    daemon.wait_live(v1)
    v2 = project.save("colours-v2.pt", colour_state_dict(scale=5.0))
    wait_until(lambda: (canary_of(daemon) or {}).get("version") == 2, what="v2 to become the canary")

    # A newer candidate replaces the canary; the one it replaced waits as standby.
    v3 = project.save("colours-v3.pt", colour_state_dict(scale=6.0))
    wait_until(lambda: (canary_of(daemon) or {}).get("version") == 3, what="v3 to replace v2 as the canary")
    assert daemon.wait_file(v2, "standby")["status"] == "standby"

    # max_wait_s shortened by a config edit: no traffic came, so on_timeout (reject) decides.
    project.write_config(canary_yaml(max_wait_s=0.5))
    rejected = daemon.wait_file(v3, "rejected")
    assert rejected["reason"] == "canary: 0 of 30 requests compared in 0.5 s (agreement -); on_timeout: reject"
    assert daemon.live_sha() == sha256(v1)
