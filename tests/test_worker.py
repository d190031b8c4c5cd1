"""The reload worker in-process: failures are recorded and never end it; subscribers cannot undo a swap; a swap
comes in the turn of the gate's last forward pass."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest
import torch
from conftest import Project, colours_yaml, sha256, threads_named, torch_threads, wait_until
from test_evaluation import with_evaluation
from test_precision import BF16_ONLY
from tinynet import colour_state_dict

from reloader import source as sources
from reloader.compute import FORWARD_LOCK
from reloader.config import load_config
from reloader.events import CheckpointJudged, Event, EventBus, Outcome, ReloadFailed
from reloader.hardware import Hardware
from reloader.registry import LiveModel, Registry
from reloader.source import LocalFolder
from reloader.worker import ModelWorker, Shared


def make_worker(project: Project, bus: EventBus, registry: Registry | None = None) -> tuple[ModelWorker, Registry]:
    config = load_config(project.config)
    model = config.models["colours"]
    registry = registry or Registry()
    folder = LocalFolder("colours", model.checkpoints, config.watch, bus)
    return ModelWorker("colours", model, folder, Shared(registry, bus)), registry


@pytest.fixture
def worker(project: Project):
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    worker, registry = make_worker(project, bus)
    worker.start()
    yield worker, registry, events
    worker.stop()


def outcomes(events: list[Event]) -> list[str]:
    return [
        e.outcome.value if isinstance(e, CheckpointJudged) else "error"
        for e in events
        if isinstance(e, (CheckpointJudged, ReloadFailed))
    ]


def test_a_reload_pass_that_raises_is_logged_and_recorded_and_the_worker_goes_on(
    project: Project, worker, monkeypatch, caplog
):
    worker, registry, events = worker
    assert worker.wait_idle(30)
    real_scan = sources.scan
    calls = []

    def failing_once(folder: Path):
        calls.append(folder)
        if len(calls) == 1:
            raise RuntimeError("disk on fire")
        return real_scan(folder)

    monkeypatch.setattr(sources, "scan", failing_once)
    first = project.save("colours-v1.pt")
    worker.rescan()
    wait_until(lambda: any(isinstance(e, ReloadFailed) for e in events), what="the failed pass's event")

    assert worker.is_alive()
    assert "reload pass failed: RuntimeError: disk on fire" in caplog.text
    failed = next(e for e in events if isinstance(e, ReloadFailed))
    assert failed.error == "RuntimeError: disk on fire"
    assert worker.found().error == "reload pass failed: RuntimeError: disk on fire"

    worker.rescan()
    wait_until(lambda: registry.get("colours") is not None, what="the next pass to swap")
    assert registry.get("colours").sha256 == sha256(first)
    assert outcomes(events) == ["error", "swapped"]


def test_a_failing_subscriber_does_not_undo_a_swap_nor_keep_events_from_the_others(project: Project):
    bus = EventBus()

    def broken(event: Event) -> None:
        raise ValueError("metrics backend down")

    events: list[Event] = []
    bus.subscribe(broken)
    bus.subscribe(events.append)
    worker, registry = make_worker(project, bus)
    good = project.save("colours-v1.pt", colour_state_dict())
    worker.start()
    try:
        assert worker.wait_idle(30)
        assert registry.get("colours").sha256 == sha256(good)
        assert worker.is_alive()
        assert outcomes(events) == ["swapped"]
        (swapped,) = [e for e in events if isinstance(e, CheckpointJudged)]
        assert swapped.outcome is Outcome.SWAPPED and swapped.sha256 == sha256(good)
    finally:
        worker.stop()


@pytest.mark.parametrize(
    "shortage",
    [
        lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),  # a trainer's GPU
        # A cuBLAS handle made on a full GPU (torch raises it as a plain error; no GPU here).
        lambda: torch.AcceleratorError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        lambda: OSError(errno.ENOSPC, "No space left on device"),  # /tmp full under a compile, say
    ],
    ids=["device-memory", "cuda-library-handle", "disk"],
)
def test_a_checkpoint_judged_while_the_machine_is_short_of_memory_or_disk_is_judged_again_not_rejected(
    project: Project, monkeypatch, shortage
):
    """It used to be rejected and remembered by its content: a good checkpoint lost until a restart."""
    import reloader.worker as worker_module
    from reloader.optimize import prepare_module

    monkeypatch.setattr(worker_module, "SHORTAGE_RETRY_S", 0.5)  # 30 s in service
    prepared = []

    def short_once(module, config):
        prepared.append(module)
        if len(prepared) == 1:
            raise shortage()
        return prepare_module(module, config)

    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    config = load_config(project.config)
    model = config.models["colours"]
    registry = Registry()
    folder = LocalFolder("colours", model.checkpoints, config.watch, bus)
    worker = ModelWorker("colours", model, folder, Shared(registry, bus, short_once))
    first = project.save("colours-v1.pt")
    worker.start()
    try:
        wait_until(lambda: registry.get("colours") is not None, what="the file to be judged again, and go live")
    finally:
        worker.stop()

    assert registry.get("colours").sha256 == sha256(first)
    assert outcomes(events) == ["incomplete", "swapped"]  # no event of its own brought it back
    held = next(e for e in events if isinstance(e, CheckpointJudged))
    assert held.reason.startswith("warmup: ")
    assert "(this machine was short of memory or disk: judged again" in held.reason


def test_what_a_failed_file_built_is_released_when_it_is_judged_not_at_the_next_swap(project: Project, monkeypatch):
    """glibc's heap pages and torch's CUDA cache are given back after a rejection too (memory.release)."""
    import weakref

    from reloader import gate as gates
    from reloader.gate import Gate
    from reloader.optimize import prepare_module

    released, built = [], []
    real_release = gates.release
    monkeypatch.setattr(gates, "release", lambda: (released.append(len(built)), real_release())[1])

    def prepare(module, config):
        built.append(weakref.ref(module))
        return prepare_module(module, config)

    gate = Gate("colours", load_config(project.config).models["colours"], prepare)
    wrong = gate.judge(project.save("colours-v2.pt", colour_state_dict(permute=(1, 0, 2))))  # fails its warm-up
    assert not wrong.passed and wrong.report.failed_check.name == "warmup"
    assert released == [1] and built[0]() is None  # gone when judge returned: nothing kept it
    unreadable = project.checkpoints / "colours-v3.pt"
    unreadable.write_bytes(b"not a checkpoint")
    assert not gate.judge(unreadable).passed and released == [1]  # nothing was loaded: nothing to give back
    assert gate.judge(project.save("colours-v1.pt")).passed and released == [1]


class ListedOnSchedule(LocalFolder):
    """A folder listed when its poll is due, as a bucket is (nothing wakes its worker); a fetch can be held."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.due: float | None = None
        self.fetching, self.go = threading.Event(), threading.Event()

    def next_poll(self) -> float | None:
        return self.due

    def listing(self, now: float, signed: bool = False):
        self.due = None  # one scheduled listing
        return super().listing(now, signed)

    def fetch(self, candidate):
        self.fetching.set()
        assert self.go.wait(30)
        return super().fetch(candidate)


def test_a_pass_a_scheduled_listing_starts_shows_reloading_until_it_has_published(project: Project):
    """The status's `reloading` (and wait_idle) covered only passes an event started, so a bucket's swap
    read as idle while the status's file list still showed the version before it."""
    config = load_config(project.config)
    bus, registry = EventBus(), Registry()
    folder = ListedOnSchedule("colours", config.models["colours"].checkpoints, config.watch, bus)
    worker = ModelWorker("colours", config.models["colours"], folder, Shared(registry, bus))
    folder.go.set()
    worker.start()
    try:
        assert worker.wait_idle(30) and registry.get("colours") is None  # nothing in the folder yet
        good = project.save("colours-v1.pt")
        folder.go.clear()
        folder.due = 0.0  # the poll is due: no event, no rescan()
        worker.wake()
        assert folder.fetching.wait(30)
        assert worker.reloading and not worker.wait_idle(0)
        folder.go.set()
        assert worker.wait_idle(30)
        assert registry.get("colours").sha256 == sha256(good)
        assert [(f.path, f.status.value) for f in worker.found().files] == [(good, "live")]
        assert not worker.reloading
    finally:
        folder.go.set()
        worker.stop()


def test_a_worker_stopped_with_work_pending_is_idle_so_nothing_waits_on_it(project: Project):
    """A SIGHUP's reload waits for every worker to be idle: one whose model the config dropped mid-pass (its
    pass ended by the stop, threads.Stopping) used to hold that wait for its whole timeout, 300 s."""
    worker, _ = make_worker(project, EventBus())
    worker.rescan()  # work pending, and the thread not started to do it
    assert worker.reloading and not worker.wait_idle(0)
    worker.stop()
    assert worker.wait_idle(0) and not worker.reloading


def test_a_config_whose_new_model_cannot_start_still_stops_and_unloads_the_model_it_drops(
    project: Project, monkeypatch
):
    """The models a config drops are taken out before its new ones start: when a start failed, the dropped
    model's worker was left running, out of every list, and could swap its model back in."""
    from reloader.supervisor import Supervisor

    project.save("colours-v1.pt")
    registry = Registry()
    supervisor = Supervisor(load_config(project.config), Shared(registry, EventBus()))
    supervisor.start()
    try:
        assert supervisor.wait_idle(timeout=60) and registry.get("colours") is not None
        dropped = supervisor.worker("colours")
        assert dropped is not None
        project.write_config(
            colours_yaml()
            .replace("  colours:\n", "  renamed:\n")
            .replace("default_model: colours", "default_model: renamed")
        )

        def cannot_start(*args: object) -> None:
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(Supervisor, "_add", cannot_start)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            supervisor.reload()
        assert not dropped.is_alive() and registry.get("colours") is None and supervisor.workers() == []
    finally:
        supervisor.stop()


class TurnAtSwap(Registry):
    """Records, at each swap, whether a forward pass's turn is held: here nothing but the worker runs one."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[bool] = []

    def swap(self, live: LiveModel) -> LiveModel | None:
        self.held.append(FORWARD_LOCK.locked())
        return super().swap(live)


@pytest.mark.parametrize("last", ["warm-up", "evaluation", "fidelity"])
def test_a_swap_comes_in_the_turn_of_the_gates_last_pass_which_then_goes_back(
    project: Project, last: str, monkeypatch: pytest.MonkeyPatch
):
    """So the serving pass waiting for that turn runs on the new version (test_batching), not the one replaced."""
    if last == "evaluation":
        with_evaluation(project)
    if last == "fidelity":  # bf16 runs anywhere, slowly where the CPU has no bf16 of its own: fine for a tiny net
        monkeypatch.setattr(Hardware, "detect", staticmethod(lambda: BF16_ONLY))
        project.write_config(colours_yaml().replace("    preprocess:", "    precision: bf16\n    preprocess:"))
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    registry = TurnAtSwap()
    worker, _ = make_worker(project, bus, registry)
    project.save("colours-v1.pt")
    worker.start()
    try:
        wait_until(lambda: registry.get("colours") is not None, what="v1 to go live")
        project.save("colours-v2.pt", colour_state_dict(permute=(1, 0, 2)))  # answers wrong: rejected
        worker.rescan()
        wait_until(lambda: "rejected" in outcomes(events), what="v2's rejection")
        assert worker.wait_idle(30)
        assert not FORWARD_LOCK.locked()  # no swap followed the rejection: the turn went back all the same
        project.save("colours-v3.pt", colour_state_dict(scale=5.0))
        worker.rescan()
        wait_until(lambda: registry.get("colours").version == 3, what="v3 to go live")
        assert worker.wait_idle(30)
    finally:
        worker.stop()
    assert outcomes(events) == ["swapped", "rejected", "swapped"]
    assert registry.get("colours").report.precision == ("bf16" if last == "fidelity" else "fp32")
    assert registry.held == [True, True]
    assert not FORWARD_LOCK.locked()


def test_a_reload_leaves_no_openmp_team_behind_on_the_worker_thread(project: Project):
    """The gate's forward passes run on a thread that ends with its verdict, and so does the OpenMP team torch
    started for them: one left on the worker's thread would slow every serving pass (reloader/compute.py)."""
    # Warm-up images large enough for torch to stack them across the cores.
    project.write_config(colours_yaml().replace("{resize: 32, crop: 32}", "{resize: 256, crop: 224}"))
    others = threads_named("reload-colours")  # earlier tests' (their teams may still be ending)
    with torch_threads(2):
        worker, registry = make_worker(project, EventBus())
        project.save("colours-v1.pt")
        worker.start()
        try:
            wait_until(lambda: registry.get("colours") is not None, what="v1 to go live")
            assert worker.wait_idle(30)
            wait_until(lambda: len(threads_named("reload-colours") - others) == 1, what="the worker's thread, no team")
        finally:
            worker.stop()
