"""Serving while the gate compiles cold: `python -m bench.compiling` (about 5 minutes; run it alone).

One reloader serves resnet18 fp32 (batch 8) at c=16. After STEADY_S, its config turns on
`optimize: compile`: a new definition, so the gate judges the live file again and Inductor compiles it,
with a cache folder of its own (cold, as at a first start). The probe reads throughput, p99 and the
longest gap between two answers, steady and from the edit to the swap. Until 2026-12-02 the compile ran
under the forward lock and every model's serving stopped for it (compute.compile_forward).
Then a trainer drops the definition's next checkpoint, and the probe reads the same from the drop to its
swap: until 2026-12-03 a child built its package again (17 s alone), now the library kept from the first
runs its weights (libraries.py).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from . import servers, workload
from .client import LoadGenerator, LoadResult

STEADY_S, AFTER_S, DEADLINE_S = 10.0, 10.0, 900.0


def _live_started(base: str) -> float:
    with urllib.request.urlopen(f"{base}/models/{workload.MODEL}") as response:
        live = json.load(response).get("live") or {}
    return float((live.get("report") or {}).get("started_at", 0.0))


async def _live_after(base: str, since: float, deadline: float, what: str) -> float:
    """When a version judged after `since` went live (polled every 0.5 s)."""
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(None, _live_started, base) <= since:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not live within {DEADLINE_S} s")
        await asyncio.sleep(0.5)
    return time.time()


async def _serve_through_a_compile(
    server: servers.Server, config: Path, checkpoints: Path
) -> tuple[LoadResult, list[float]]:
    result = LoadResult(16, [(time.time(), math.inf)])
    stop = asyncio.Event()
    clients = LoadGenerator(f"{server.base}/predict", workload.jpeg_images(), 16)
    load = asyncio.create_task(clients.run_until(stop, result))
    await asyncio.sleep(STEADY_S)
    edited, deadline = time.time(), time.monotonic() + DEADLINE_S
    config.write_text(config.read_text().replace("optimize: none", "optimize: compile"))
    swapped = await _live_after(server.base, edited, deadline, "no compiled version")
    await asyncio.sleep(AFTER_S)
    dropped = time.time()
    staged = checkpoints.parent / "staged.pt"
    torch.save(workload.state_dict(1), staged)  # as a careful trainer does: whole, then renamed in
    staged.rename(checkpoints / f"{workload.MODEL}-v2.pt")
    later = await _live_after(server.base, dropped, deadline, "the next checkpoint")
    await asyncio.sleep(AFTER_S)
    stop.set()
    await load
    return result, [edited, swapped, dropped, later]


def _window(result: LoadResult, start: float, end: float) -> str:
    answered = [s for s in result.samples if s.status == 200 and start <= s.finished < end]
    ends = sorted(s.finished for s in answered)
    gap = max((b - a for a, b in zip([start, *ends], [*ends, end], strict=True)), default=end - start)
    p99 = statistics.quantiles([s.finished - s.started for s in answered], n=100)[98] * 1000 if len(answered) > 1 else 0
    return f"{len(answered) / (end - start):.1f} img/s, p99 {p99:.0f} ms, longest gap between answers {gap:.1f} s"


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-compiling-"))
    checkpoints = root / "checkpoints"
    checkpoints.mkdir()
    torch.save(workload.state_dict(0), checkpoints / f"{workload.MODEL}-v1.pt")
    config = workload.reloader_config(root, checkpoints, queue_size=64)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")  # the server's environment: a cold cache
    with servers.reloader(config, root) as server:
        result, (edited, swapped, dropped, later) = asyncio.run(_serve_through_a_compile(server, config, checkpoints))
    failed = sum(1 for s in result.samples if s.status != 200)
    print(f"load average at the end {os.getloadavg()}; failed requests {failed}")
    print(f"steady ({STEADY_S - 2:.0f} s before the edit): {_window(result, edited - STEADY_S + 2, edited)}")
    print(f"from the edit to the compiled version's swap ({swapped - edited:.1f} s):", _window(result, edited, swapped))
    print(f"from the next checkpoint's drop to its swap ({later - dropped:.1f} s):", _window(result, dropped, later))
    print(f"served by the compiled version ({AFTER_S - 2:.0f} s after):", _window(result, later + 2, later + AFTER_S))


if __name__ == "__main__":
    main()
