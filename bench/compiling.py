"""Serving while the gate compiles cold: `python -m bench.compiling` (about 4 minutes; run it alone).

One reloader serves resnet18 fp32 (batch 8) at c=16. After STEADY_S, its config turns on
`optimize: compile`: a new definition, so the gate judges the live file again and Inductor compiles it,
with a cache folder of its own (cold, as at a first start). The probe reads throughput, p99 and the
longest gap between two answers, steady and from the edit to the swap. Until 2026-12-02 the compile ran
under the forward lock and every model's serving stopped for it (compute.compile_forward).
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

STEADY_S, AFTER_S, DEADLINE_S = 10.0, 3.0, 900.0


def _live_started(base: str) -> float:
    with urllib.request.urlopen(f"{base}/models/{workload.MODEL}") as response:
        live = json.load(response).get("live") or {}
    return float((live.get("report") or {}).get("started_at", 0.0))


async def _serve_through_a_compile(server: servers.Server, config: Path) -> tuple[LoadResult, float, float]:
    result = LoadResult(16, [(time.time(), math.inf)])
    stop = asyncio.Event()
    clients = LoadGenerator(f"{server.base}/predict", workload.jpeg_images(), 16)
    load = asyncio.create_task(clients.run_until(stop, result))
    await asyncio.sleep(STEADY_S)
    edited = time.time()
    config.write_text(config.read_text().replace("optimize: none", "optimize: compile"))
    loop, deadline = asyncio.get_running_loop(), time.monotonic() + DEADLINE_S
    while await loop.run_in_executor(None, _live_started, server.base) <= edited:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no compiled version live within {DEADLINE_S} s")
        await asyncio.sleep(0.5)
    swapped = time.time()
    await asyncio.sleep(AFTER_S)
    stop.set()
    await load
    return result, edited, swapped


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
        result, edited, swapped = asyncio.run(_serve_through_a_compile(server, config))
    failed = sum(1 for s in result.samples if s.status != 200)
    print(f"load average at the end {os.getloadavg()}; failed requests {failed}")
    print(f"steady ({STEADY_S - 2:.0f} s before the edit): {_window(result, edited - STEADY_S + 2, edited)}")
    print(f"from the edit to the compiled version's swap ({swapped - edited:.1f} s):", _window(result, edited, swapped))


if __name__ == "__main__":
    main()
