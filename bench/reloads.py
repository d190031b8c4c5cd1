"""Reloads under measurement: swaps under load, memory over many swaps, and where reload latency goes."""

from __future__ import annotations

import asyncio
import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import torch

from . import workload
from .client import LoadGenerator, LoadResult, measure
from .servers import Server, reset_peak, status_kib

MODEL = workload.MODEL
LIVE_DEADLINE_S = 60.0
# The swap run alternates steady and swapping blocks of this length, so both see the same machine.
BLOCK_S = 15.0


async def _status(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with session.get(f"{base}/models/{MODEL}") as response:
        return await response.json()


async def _wait(session: aiohttp.ClientSession, base: str, done: Any, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + LIVE_DEADLINE_S
    while time.monotonic() < deadline:
        status = await _status(session, base)
        if done(status):
            return status
        await asyncio.sleep(0.01)
    raise TimeoutError(f"timed out after {LIVE_DEADLINE_S} s waiting for {what}")


def _settled(path: Path) -> Any:
    """The worker's pass over `path` is finished (its file list, set at the end of a pass, names it)."""

    def done(status: dict[str, Any]) -> bool:
        entry = next((f for f in status["files"] if f["path"] == str(path)), None)
        return entry is not None and entry["status"] in ("live", "rejected", "standby")

    return done


def _spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "min": float("nan"), "p50": float("nan"), "max": float("nan")}
    return {"n": len(values), "min": min(values), "p50": statistics.median(values), "max": max(values)}


# -- 4. swaps under load --------------------------------------------------------------------------------


@dataclass
class SwapRun:
    steady: LoadResult
    swapping: LoadResult
    drops: list[tuple[float, workload.Staged]]
    events: list[dict[str, Any]]
    valid_shas: set[str]
    invalid_shas: set[str]
    initial_sha: str  # live when the run began
    peak_over_steady_kib: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def served(self) -> set[str]:
        """The versions that answered, by sha256."""
        return set(self.extra["all"].shas)

    @property
    def allowed(self) -> set[str]:
        """The versions that passed the gate: the initial one and the valid drops."""
        return self.valid_shas | {self.initial_sha}

    def outcome(self) -> tuple[bool, str]:
        """Whether the gate did what the drops asked: valid drops went live (at least one; a valid drop skipped
        because a newer one landed first is fine, a rejected one is not), no invalid drop went live, and every
        answer came from the initial version or a valid drop. With the row's text."""
        files = {kind: {e.get("file") for e in self.events if e["event"] == kind} for kind in ("swapped", "rejected")}
        valid = [str(s.final) for _, s in self.drops if s.kind == "valid"]
        invalid = [str(s.final) for _, s in self.drops if s.kind != "valid"]
        went_live = sum(f in files["swapped"] for f in valid)
        refused = sum(f in files["rejected"] for f in valid)
        bad_live = sum(f in files["swapped"] for f in invalid)
        served = self.served
        stray = served - self.allowed
        ok = went_live >= 1 and not refused and not bad_live and not stray
        text = (
            f"{went_live} of {len(valid)} valid drops went live, {refused} rejected; {bad_live} of {len(invalid)} "
            f"invalid drops went live; {len(stray)} of {len(served)} versions that answered not validated"
        )
        return ok, text


KINDS = ("valid", "truncated", "valid", "nan", "valid", "wrong_classes")


def stage_swaps(folder: Path, first_version: int, count: int, seed: int) -> list[workload.Staged]:
    """Valid resnet18s from different seeds and the three kinds of bad file, written before the clock starts."""
    staged = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        version = first_version + i
        if kind == "valid":
            data = workload.to_bytes(workload.state_dict(seed + i))
        elif kind == "truncated":
            full = workload.to_bytes(workload.state_dict(seed + i))
            data = full[: len(full) // 2]
        elif kind == "nan":
            data = workload.to_bytes(workload.with_nan(workload.state_dict(seed + i)))
        else:
            data = workload.to_bytes(workload.state_dict(seed + i, num_classes=10))
        staged.append(workload.stage(folder, f"{MODEL}-v{version}.pt", data, kind))
    return staged


def swap_plan(duration_s: float, every_s: float) -> tuple[int, float, int]:
    """Blocks, block length and drops per block. The last drop of a block leaves `every_s` before its end,
    so that validation stays inside the block."""
    blocks = max(1, round(duration_s / BLOCK_S))
    block_s = duration_s / blocks
    return blocks, block_s, max(1, math.ceil((block_s - every_s) / every_s))


def swaps_under_load(
    server: Server, folder: Path, images: list[bytes], staged: list[workload.Staged], duration_s: float, every_s: float
) -> SwapRun:
    """c=16 for 2 x duration, alternating steady blocks and blocks with a drop every `every_s`."""
    blocks, block_s, per_block = swap_plan(duration_s, every_s)
    url = f"{server.base}/models/{MODEL}/predict"
    drops: list[tuple[float, workload.Staged]] = []
    windows: list[tuple[float, float]] = []

    async def dropper(t0: float) -> None:
        queue = list(staged)
        for b in range(blocks):
            start = t0 + (2 * b + 1) * block_s
            windows.append((start, start + block_s))
            k = 0
            while queue and k < per_block:
                await asyncio.sleep(max(0.0, start + k * every_s - time.time()))
                item = queue.pop(0)
                drops.append((time.time(), item))
                item.land()
                k += 1

    async def main() -> tuple[LoadResult, dict[str, Any], str]:
        async with aiohttp.ClientSession() as session:
            initial = (await _status(session, server.base))["live"]["sha256"]
        load = LoadGenerator(url, images, 16)
        warmup = 1.0
        t0 = time.time() + warmup
        reset_peak(server.pid)
        result, _ = await asyncio.gather(load.run(2 * duration_s, warmup), dropper(t0))
        async with aiohttp.ClientSession() as session:
            last = drops[-1][1].final if drops else None
            status = await _wait(session, server.base, _settled(last) if last else (lambda s: True), "the last drop")
        return result, status, initial

    measure(url, images, 16, 3.0)  # the baseline RSS is that of a daemon already serving c=16
    steady_rss = status_kib(server.pid, "VmRSS")
    result, status, initial = asyncio.run(main())
    peak = status_kib(server.pid, "VmHWM")
    t0 = windows[0][0] - block_s
    steady_windows = [(t0 + 2 * b * block_s, t0 + (2 * b + 1) * block_s) for b in range(blocks)]
    steady, swapping = result.within(steady_windows), result.within(windows)
    return SwapRun(
        steady=steady,
        swapping=swapping,
        drops=drops,
        events=status["events"],
        valid_shas={s.sha256 for _, s in drops if s.kind == "valid"},
        invalid_shas={s.sha256 for _, s in drops if s.kind != "valid"},
        initial_sha=initial,
        peak_over_steady_kib=peak - steady_rss,
        extra={"blocks": blocks, "block_s": block_s, "all": result},
    )


def swap_timings(events: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Detection-to-live and gate totals of every swap the daemon recorded (the initial load has no detection)."""
    swapped = [e for e in events if e["event"] == "swapped" and "since_detected" in e.get("timings_ms", {})]
    return {
        "since_detected": _spread([e["timings_ms"]["since_detected"] for e in swapped]),
        "total": _spread([e["timings_ms"]["total"] for e in swapped]),
    }


# -- 5. memory over many swaps ---------------------------------------------------------------------------


class _RssSampler:
    """Samples VmRSS every few ms, for where VmHWM cannot be reset."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, status_kib(self.pid, "VmRSS"))
            self._stop.wait(0.005)


def memory(
    server: Server, folder: Path, images: list[bytes], base: dict[str, torch.Tensor], swaps: int
) -> dict[str, Any]:
    """RSS at start, after 1 and after `swaps` valid swaps (no load), and each swap's peak over its own start."""
    url = f"{server.base}/models/{MODEL}/predict"

    def rss_after_traffic() -> int:
        # The same short burst before every reading, so inference buffers are in the same state each time.
        measure(url, images, 8, 2.0)
        return status_kib(server.pid, "VmRSS")

    start = rss_after_traffic()
    after_1 = 0
    peaks: list[int] = []
    befores: list[int] = []
    sampled: list[int] = []
    hwm_reset = True
    previous: list[Path] = []

    async def one(i: int) -> None:
        nonlocal hwm_reset
        data = workload.to_bytes(workload.variant(base, seed=10_000 + i))
        sha = workload.sha256(data)
        path = folder / f"{MODEL}-v{1000 + i}.pt"
        before = status_kib(server.pid, "VmRSS")
        hwm_reset = reset_peak(server.pid) and hwm_reset
        async with aiohttp.ClientSession() as session:
            with _RssSampler(server.pid) as sampler:
                workload.drop(folder, path.name, data)
                status = await _wait(session, server.base, _settled(path), f"{path.name} to go live")
            live = status["live"]
            if live is None or live["sha256"] != sha:
                raise RuntimeError(f"{path.name} did not go live: {status['files'][:3]}")
        peaks.append(status_kib(server.pid, "VmHWM") - before)
        befores.append(before)
        sampled.append(sampler.peak - before)
        previous.append(path)
        while len(previous) > 2:  # keep the folder small, as a trainer's retention would
            previous.pop(0).unlink()

    for i in range(1, swaps + 1):
        asyncio.run(one(i))
        if i == 1:
            after_1 = rss_after_traffic()
    end = rss_after_traffic()
    return {
        "swaps": swaps,
        "rss_start_kib": start,
        "rss_after_1_kib": after_1,
        "rss_after_n_kib": end,
        "peak_over_before_kib": _spread([float(p) for p in (peaks if hwm_reset else sampled)]),
        # The RSS just before each swap moves too (how much of the previous swap was returned to the OS),
        # so the absolute peak is what compares across versions of reloader.
        "peak_kib": _spread([float(b + p) for b, p in zip(befores, peaks if hwm_reset else sampled, strict=True)]),
        "before_kib": _spread([float(b) for b in befores]),
        "peak_source": "VmHWM reset before each swap" if hwm_reset else "VmRSS sampled every 5 ms",
        "sampled_peak_over_before_kib": _spread([float(p) for p in sampled]),
    }


# -- 6. reload latency split -----------------------------------------------------------------------------


def latency_split(
    server: Server, folder: Path, images: list[bytes], base: dict[str, torch.Tensor], per_kind: int
) -> dict[str, list[dict[str, float]]]:
    """From a file landing to the first response served by it, for renames and for slow in-place writes."""
    url = f"{server.base}/models/{MODEL}/predict"
    payloads = {
        kind: [workload.to_bytes(workload.variant(base, seed=20_000 + 100 * k + i)) for i in range(per_kind)]
        for k, kind in enumerate(("rename", "in_place"))
    }
    out: dict[str, list[dict[str, float]]] = {"rename": [], "in_place": []}

    async def main() -> None:
        # Two pollers post continuously; the first 200 carrying the new sha256 marks "served by the new version".
        served = LoadResult(2, [(time.time(), math.inf)])
        stop = asyncio.Event()
        polling = asyncio.create_task(LoadGenerator(url, images, 2).run_until(stop, served))
        loop = asyncio.get_running_loop()
        version = 2000
        try:
            async with aiohttp.ClientSession() as session:
                for kind in ("rename", "in_place"):
                    for data in payloads[kind]:
                        version += 1
                        path = folder / f"{MODEL}-v{version}.pt"
                        sha = workload.sha256(data)
                        if kind == "rename":
                            landed = await loop.run_in_executor(None, workload.drop, folder, path.name, data)
                        else:
                            landed = await loop.run_in_executor(None, workload.write_in_place, path, data)
                        status = await _wait(session, server.base, _settled(path), f"{path.name} to go live")
                        first = await _first_served(served, sha)
                        out[kind].append(_split(status, sha, landed, first, renamed=kind == "rename"))
        finally:
            stop.set()
            await polling

    asyncio.run(main())
    return out


async def _first_served(results: LoadResult, sha: str) -> float:
    deadline = time.monotonic() + LIVE_DEADLINE_S
    while time.monotonic() < deadline:
        served = [s.finished for s in results.samples if s.status == 200 and s.sha256 == sha]
        if served:
            return min(served)
        await asyncio.sleep(0.01)
    raise TimeoutError(f"no response from {sha[:12]} within {LIVE_DEADLINE_S} s")


def _split(status: dict[str, Any], sha: str, landed: float, first: float, *, renamed: bool) -> dict[str, float]:
    """Wall-clock phases; the daemon's clock is this machine's, so its timestamps line up with ours.

    The daemon's "seen" is its first event for the path: the rename itself, but for an in-place write the
    open, before the write even started; there detection and settling are one span, from the close.
    """
    live = status["live"]
    if live is None or live["sha256"] != sha:
        raise RuntimeError(f"expected {sha[:12]} live, got {live and live['sha256'][:12]}")
    report = live["report"]
    event = next(e for e in status["events"] if e["event"] == "swapped" and e.get("file") == live["path"])
    timings = event["timings_ms"]
    checks = {c["name"]: c["ms"] for c in report["checks"]}
    live_at = event["time"]
    seen = live_at - timings["since_detected"] / 1000.0
    gate_start = report["started_at"]
    gate_end = gate_start + report["total_ms"] / 1000.0
    load_ms = checks["load"]
    validation_ms = checks["structure"] + checks["finite"] + checks["warmup"]
    return {
        "detection_ms": (seen - landed) * 1000.0 if renamed else float("nan"),
        "settle_hash_ms": (gate_start - (seen if renamed else landed)) * 1000.0,
        "load_ms": load_ms,
        "validation_ms": validation_ms,
        "swap_ms": (live_at - gate_end) * 1000.0,
        "to_live_ms": (live_at - landed) * 1000.0,
        "to_first_response_ms": (first - landed) * 1000.0,
        "live_to_first_response_ms": (first - live_at) * 1000.0,
        "overhead_to_live_ms": (live_at - landed) * 1000.0 - load_ms - validation_ms,
        "overhead_to_first_response_ms": (first - landed) * 1000.0 - load_ms - validation_ms,
    }


GATE_DEADLINE_S = 600.0


def during_one_gate(server: Server, images: list[bytes], staged: workload.Staged, steady_s: float) -> dict[str, Any]:
    """c=16 throughout: `steady_s` with nothing to reload, then one valid checkpoint lands and the load runs
    on until it is live. For a gate that takes a minute (optimize: compile compiles every form), blocks of
    a few seconds would each fall inside the same compile: this compares the whole gate with steady."""
    url = f"{server.base}/models/{MODEL}/predict"

    async def main() -> tuple[LoadResult, float, float, dict[str, Any]]:
        result = LoadResult(16)
        stop = asyncio.Event()
        load = asyncio.create_task(LoadGenerator(url, images, 16).run_until(stop, result))
        await asyncio.sleep(1.0 + steady_s)  # a second of warm-up, then the steady window
        landed = time.time()
        staged.land()
        deadline = time.monotonic() + GATE_DEADLINE_S
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                status = await _status(session, server.base)
                if _settled(staged.final)(status):
                    break
                await asyncio.sleep(0.05)
            else:
                raise TimeoutError(f"{staged.final.name} not settled within {GATE_DEADLINE_S} s")
        live_at = time.time()
        stop.set()
        await load
        return result, landed, live_at, status

    result, landed, live_at, status = asyncio.run(main())
    steady = result.within([(landed - steady_s, landed)])
    gate = result.within([(landed, live_at)])
    swapped = any(e["event"] == "swapped" and e.get("file") == str(staged.final) for e in status["events"])
    return {
        "gate_s": live_at - landed,
        "swapped": swapped,
        "steady": steady.summary(),
        "during": gate.summary(),
        "steady_p99_ms": steady.latency_ms(99),
        "during_p99_ms": gate.latency_ms(99),
        "failed": sum(1 for s in result.samples if s.status != 200),
        "requests": len(result.samples),
    }
