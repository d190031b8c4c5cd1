"""9. The shadow canary (issue 12): steady c=16 throughput and p99 while a canary shadows, against none.

One reloader, rounds alternating: c=16 with nothing in shadow, then a new candidate dropped, and once it
is the canary, c=16 again while it compares. The candidate is the live weights with the classifier bias
moved by 1e-6 (another sha256, the same answers), so it should be promoted. `requests` is set from the
first baseline's throughput so that, at `max_overhead` of the forward time, the canary needs about half
of a measured window: it must decide inside the run.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch

from . import workload
from .client import failed as failed_in
from .client import measure as load
from .servers import Server

SECTION = "## 10. The shadow canary (issue 12)"
CONCURRENCY = 16
MAX_OVERHEAD = 0.1
TARGET_THROUGHPUT = 0.88  # of the run without a canary, at least
TARGET_P99 = 1.25  # of the run without a canary, at most
DECISION_DEADLINE_S = 120.0


def _status(server: Server) -> dict[str, Any]:
    with urllib.request.urlopen(f"{server.base}/models/{workload.MODEL}", timeout=10) as response:
        return json.loads(response.read())


def _wait(server: Server, done: Any, what: str, deadline_s: float = DECISION_DEADLINE_S) -> dict[str, Any]:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        status = _status(server)
        if done(status):
            return status
        time.sleep(0.05)
    raise TimeoutError(f"{what} within {deadline_s:.0f} s")


def _config(root: Path, folder: Path, requests: int) -> Path:
    path = workload.reloader_config(root, folder, queue_size=64)
    path.write_text(
        path.read_text()
        + f"    canary: {{requests: {requests}, min_agreement: 0.97, max_wait_s: 600, max_overhead: {MAX_OVERHEAD}}}\n"
    )
    return path


def _nudged(base: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    out = dict(base)
    out["fc.bias"] = base["fc.bias"] + 1e-6 * step
    return out


def measure(tmp: Path, logs: Path, images: list[bytes], args: Any, make_server: Any) -> dict[str, Any]:
    base = workload.state_dict(seed=0)
    folder = tmp / "canary" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / f"{workload.MODEL}-v1.pt").write_bytes(workload.to_bytes(base))
    url_path = f"/models/{workload.MODEL}/predict"
    rounds: list[dict[str, Any]] = []
    requests = 0
    with make_server(_config(folder.parent, folder, 10**6), logs, "reloader canary") as server:
        for r in range(args.rounds):
            _wait(server, lambda s: s["live"] and s["canary"] is None, "no canary in shadow")
            plain = load(server.base + url_path, images, CONCURRENCY, args.duration, args.warmup)
            if r == 0:
                # About half a window's worth of comparisons at max_overhead of the forward time.
                requests = max(8, int(0.5 * MAX_OVERHEAD * plain.throughput * args.duration))
                _config(folder.parent, folder, requests)  # applies to the next canary (and a running one)
            version = r + 2
            data = workload.to_bytes(_nudged(base, version))
            workload.drop(folder, f"{workload.MODEL}-v{version}.pt", data)
            wanted = {"version": version, "requests": requests}
            shadowing = _wait(
                server,
                lambda s, w=wanted: {k: (s["canary"] or {}).get(k) for k in w} == w,
                f"version {version} to become the canary",
            )
            started = time.time()
            with_canary = load(server.base + url_path, images, CONCURRENCY, args.duration, args.warmup)
            window_end = with_canary.windows[-1][1] if with_canary.windows else time.time()
            decided = _wait(server, lambda s, v=version: s["canary"] is None, f"version {version}'s canary to decide")
            verdict = next(
                e for e in decided["events"] if e["time"] >= started and e["result"] in ("live", "rejected")
            )
            rounds.append(
                {
                    "plain": plain.summary(),
                    "canary": with_canary.summary(),
                    "decision": verdict["result"],
                    "reason": verdict["reason"],
                    "decided_in_window": verdict["time"] <= window_end,
                    "canary_started": shadowing["canary"]["started_at"],
                }
            )
    return {"requests": requests, "rounds": rounds}


def report_lines(d: dict[str, Any]) -> list[str]:
    if "error" in d:
        return [f"Not measured: {d['error']}."]
    lines = [
        f"One reloader (resnet18 fp32, batch 8), c={CONCURRENCY}, rounds alternating: no canary, then a new "
        f"candidate in shadow (`canary: {{requests: {d['requests']}, min_agreement: 0.97, max_overhead: "
        f"{MAX_OVERHEAD}}}`; requests set from the first round's throughput so the canary needs about half a "
        "window). The candidate is the live weights with the classifier bias moved by 1e-6: the same answers.",
        "",
        "| round | img/s, no canary | img/s, canary | ratio | p99 ms, no canary | p99 ms, canary | ratio | decision |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(d["rounds"], 1):
        a, b = r["plain"], r["canary"]
        inside = "inside the window" if r["decided_in_window"] else "after the window"
        lines.append(
            f"| {i} | {a['img_s']:.1f} | {b['img_s']:.1f} | {b['img_s'] / a['img_s']:.3f} | {a['p99_ms']:.0f} "
            f"| {b['p99_ms']:.0f} | {b['p99_ms'] / a['p99_ms']:.3f} | {r['decision']}, {inside}: {r['reason']} |"
        )
    return lines


def ratios(d: dict[str, Any]) -> tuple[float, float]:
    """Median throughput and p99 ratios (canary / no canary) over the rounds."""
    through = statistics.median(r["canary"]["img_s"] / r["plain"]["img_s"] for r in d["rounds"])
    p99 = statistics.median(r["canary"]["p99_ms"] / r["plain"]["p99_ms"] for r in d["rounds"])
    return through, p99


def targets(d: dict[str, Any]) -> list[str]:
    if "error" in d or not d["rounds"]:
        return [f"- canary: not measured ({d.get('error', 'no rounds')}): **FAIL**"]
    through, p99 = ratios(d)
    decided = all(r["decided_in_window"] for r in d["rounds"])
    # The candidate answers as the live version does: every round must promote it, and no request may fail.
    promoted = sum(r["decision"] == "live" for r in d["rounds"])
    failed = failed_in(*(r[k] for r in d["rounds"] for k in ("plain", "canary")))
    ok = through >= TARGET_THROUGHPUT and p99 <= TARGET_P99 and decided and promoted == len(d["rounds"]) and not failed
    return [
        f"- canary (median of {len(d['rounds'])} rounds): c={CONCURRENCY} throughput {through:.3f}x "
        f"(target >= {TARGET_THROUGHPUT}) and p99 {p99:.3f}x (target <= {TARGET_P99}) of the run without a "
        f"canary; every canary decided inside its window: {'yes' if decided else 'no'}; promoted in "
        f"{promoted} of {len(d['rounds'])} rounds; {failed} failed requests: **{'PASS' if ok else 'FAIL'}**"
    ]
