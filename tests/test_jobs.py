"""The reload worker in-process: failures are recorded and never end it."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Project, sha256, wait_until
from tinynet import colour_state_dict

from reloader import jobs
from reloader.config import load_config
from reloader.registry import Registry


@pytest.fixture
def worker(project: Project):
    config = load_config(project.config)
    registry = Registry()
    outcomes = []
    worker = jobs.ModelWorker("colours", config.models["colours"], registry, config.watch, on_outcome=outcomes.append)
    worker.start()
    yield worker, registry, outcomes
    worker.stop()


def test_a_reload_pass_that_raises_is_logged_and_recorded_and_the_worker_goes_on(
    project: Project, worker, monkeypatch, caplog
):
    worker, registry, outcomes = worker
    assert worker.wait_idle(30)
    real_scan = jobs.scan
    calls = []

    def failing_once(folder: Path):
        calls.append(folder)
        if len(calls) == 1:
            raise RuntimeError("disk on fire")
        return real_scan(folder)

    monkeypatch.setattr(jobs, "scan", failing_once)
    first = project.save("colours-v1.pt")
    worker.rescan()
    wait_until(lambda: any(e["event"] == "error" for e in worker.describe()["events"]), what="the error event")

    assert worker.is_alive()
    assert "reload pass failed: RuntimeError: disk on fire" in caplog.text
    error = next(e for e in worker.describe()["events"] if e["event"] == "error")
    assert error["reason"] == "RuntimeError: disk on fire"

    worker.rescan()
    wait_until(lambda: registry.get("colours") is not None, what="the next pass to swap")
    assert registry.get("colours").sha256 == sha256(first)
    assert [o.kind for o in outcomes] == ["error", "swapped"]


def test_a_failing_outcome_hook_does_not_undo_a_swap(project: Project):
    config = load_config(project.config)
    registry = Registry()

    def broken_hook(outcome):
        raise ValueError("metrics backend down")

    worker = jobs.ModelWorker("colours", config.models["colours"], registry, config.watch, on_outcome=broken_hook)
    good = project.save("colours-v1.pt", colour_state_dict())
    worker.start()
    try:
        assert worker.wait_idle(30)
        assert registry.get("colours").sha256 == sha256(good)
        assert worker.is_alive()
    finally:
        worker.stop()
