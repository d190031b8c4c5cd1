"""bench/RESULTS.md: the machine, the versions, the targets with PASS/FAIL, and every table behind them."""

from __future__ import annotations

import math
import os
import platform
import statistics
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from reloader.hardware import Hardware

from . import large, precision, uploads
from .client import failed as failed_in
from .inprocess import RELOADER_FORWARD
from .reloads import SwapRun, swap_timings

MB = 1024 * 1024


def _ram_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return float("nan")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _f(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _row(levels: list[dict[str, Any]], server: str, c: int) -> dict[str, Any] | None:
    return next((r for r in levels if r["server"] == server and r["c"] == c), None)


def _targets(d: dict[str, Any]) -> list[str]:
    levels = d["levels"]
    r16, l16, r1, r64 = (
        _row(levels, s, c) for s, c in (("reloader", 16), ("litserve", 16), ("reloader", 1), ("reloader", 64))
    )
    assert r16 and l16 and r1 and r64
    rows = ["| target | measured | ratio | result |", "|---|---|---|---|"]
    lost = {name: failed_in(r) for name, r in (("reloader", r16), ("LitServe", l16))}
    clean = not any(lost.values())
    failures = "" if clean else f"; failed requests at c=16: {lost}"

    vs_limit = r16["img_s"] / r16["limit_img_s"]
    rows.append(
        f"| reloader c=16 throughput >= 90% of the in-process limit | {r16['img_s']:.2f} img/s vs limit "
        f"{r16['limit_img_s']:.2f} img/s (better of serial {r16['limit_serial_img_s']:.2f} and pipelined "
        f"{r16['limit_pipelined_img_s']:.2f}, read next to the level){failures} | {vs_limit:.2f}x | "
        f"{_verdict(vs_limit >= 0.9 and clean)} |"
    )
    # Each server's rate over the in-process rate measured next to it cancels the machine's drift between runs.
    norm = vs_limit / (l16["img_s"] / l16["limit_img_s"])
    raw = r16["img_s"] / l16["img_s"]
    rows.append(
        f"| reloader c=16 throughput >= 1.25x LitServe (batching) c=16 | {r16['img_s']:.2f} vs "
        f"{l16['img_s']:.2f} img/s "
        f"(raw {raw:.2f}x){failures} | {norm:.2f}x drift-corrected | {_verdict(norm >= 1.25 and clean)} |"
    )
    p99_norm = (r16["p99_ms"] * r16["limit_img_s"]) / (l16["p99_ms"] * l16["limit_img_s"])
    rows.append(
        f"| reloader c=16 p99 <= LitServe c=16 p99 | {r16['p99_ms']:.0f} vs {l16['p99_ms']:.0f} ms "
        f"(raw {r16['p99_ms'] / l16['p99_ms']:.2f}x){failures} | {p99_norm:.2f}x drift-corrected | "
        f"{_verdict(p99_norm <= 1.0 and clean)} |"
    )
    c1 = r1["p50_ms"] / r1["limit_b1_ms"]
    rows.append(
        f"| reloader c=1 p50 within 10% of in-process decode+preprocess+forward at batch 1 | {r1['p50_ms']:.0f} ms vs "
        f"{r1['limit_b1_ms']:.0f} ms | {c1:.2f}x | {_verdict(c1 <= 1.10)} |"
    )
    run: SwapRun = d["swaps"]
    failed = failed_in(run.extra["all"].summary())
    rows.append(
        f"| 0 failed requests across swaps ({len(run.drops)} drops, {len(run.swapping.samples)} requests during swaps) "
        f"| {failed} failed (errors + 503s, whole run) | - | {_verdict(failed == 0)} |"
    )
    ok, outcome = run.outcome()
    rows.append(f"| swaps under load: valid drops go live, invalid ones never serve | {outcome} | - | {_verdict(ok)} |")
    p99_ratio = run.swapping.latency_ms(99) / run.steady.latency_ms(99)
    rows.append(
        f"| p99 during swaps <= 1.5x steady p99 (c=16) | {run.swapping.latency_ms(99):.0f} vs "
        f"{run.steady.latency_ms(99):.0f} ms | {p99_ratio:.2f}x | {_verdict(p99_ratio <= 1.5)} |"
    )
    mem = d["memory"]
    drift = (mem["rss_after_n_kib"] - mem["rss_start_kib"]) / mem["rss_start_kib"]
    rows.append(
        f"| RSS drift over {mem['swaps']} swaps <= 10% | {mem['rss_start_kib'] / 1024:.0f} -> "
        f"{mem['rss_after_n_kib'] / 1024:.0f} MiB | {drift * 100:+.1f}% | {_verdict(drift <= 0.10)} |"
    )
    peak = mem["peak_over_before_kib"]["max"] * 1024 / d["model_bytes"]
    rows.append(
        f"| peak RSS during a swap <= baseline + 2x model size ({d['model_bytes'] / MB:.1f} MiB) | "
        f"+{mem['peak_over_before_kib']['max'] / 1024:.0f} MiB (worst of {mem['swaps']}; {mem['peak_source']}) | "
        f"{peak:.2f}x model | "
        f"{_verdict(peak <= 2.0)} |"
    )
    quiet = all(_row(levels, "reloader", c)["n503"] == 0 for c in (1, 4, 16))
    ok64 = r64["errors"] == 0 and r64["n503"] == r64["n503_queue_full"] and quiet
    rows.append(
        f"| c=64: no errors, 503s only when the queue ({d['queue_size']}) is full | {r64['errors']} errors, "
        f"{r64['n503']} 503s of which {r64['n503_queue_full']} say the queue is full; c<=16: "
        f"{'no 503s' if quiet else 'had 503s'} | - | {_verdict(ok64)} |"
    )
    return rows + split_targets(d["split"])


def split_targets(split: dict[str, list[dict[str, float]]]) -> list[str]:
    """Issue 3's two rows, from the renames of the latency split."""
    renames = split["rename"]
    if not renames:
        return []
    live = [s["overhead_to_live_ms"] for s in renames]
    first = [s["overhead_to_first_response_ms"] for s in renames]
    return [
        f"| issue 3: rename, land -> live minus load+validation <= 100 ms (every drop) | median "
        f"{statistics.median(live):.0f} ms, max {max(live):.0f} ms | - | {_verdict(max(live) <= 100)} |",
        f"| issue 3: rename, land -> first response by the new version minus load+validation <= 100 ms | median "
        f"{statistics.median(first):.0f} ms, max {max(first):.0f} ms | - | {_verdict(max(first) <= 100)} |",
    ]


def _limit_tables(d: dict[str, Any]) -> list[str]:
    t = d["table"]
    out = [
        f"Decode+preprocess alone: {t['decode_ms']:.1f} ms per upload (median of {t['rounds']} rounds over 5 images).",
        "",
        "| batch | serial: decode+preprocess+forward per batch (ms) | serial img/s | pipelined img/s |",
        "|---|---|---|---|",
    ]
    for b in sorted(t["img_s"]):
        best = " (best)" if b == t["best_batch"] else ""
        out.append(f"| {b}{best} | {t['batch_ms'][b]:.0f} | {t['img_s'][b]:.2f} | {t['pipelined_img_s'][b]:.2f} |")
    out += ["", "Free speedups, forward only, batch 8:", "", "| forward | img/s | vs plain |", "|---|---|---|"]
    for name, s in d["speedups"].items():
        note = f" ({s['note']})" if s.get("note") else ""
        out.append(f"| {name}{note} | {_f(s['img_s'], 2)} | {_f(s['ratio'], 2)}x |")
    return out


def _level_table(levels: list[dict[str, Any]], forward_only: float) -> list[str]:
    out = [
        "| server | c | requests | img/s | in-process limit next to it | img/s / limit | p50 ms | p99 ms | errors | "
        "503 (queue full) | mean batch | forward busy | img/s inside forward |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in levels:
        extra = (
            f"{r['mean_batch']:.1f} | {r['forward_busy'] * 100:.0f}% | {r['forward_img_s']:.2f}"
            if "mean_batch" in r
            else "- | - | -"
        )
        out.append(
            f"| {r['server']} | {r['c']} | {r['n']} | {r['img_s']:.2f} | {r['limit_img_s']:.2f} | "
            f"{r['img_s'] / r['limit_img_s']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} | "
            f"{r['n503']} ({r['n503_queue_full']}) | {extra} |"
        )
    r16 = _row(levels, "reloader", 16)
    if r16 and "forward_img_s" in r16:
        out += [
            "",
            "Where reloader's time goes at c=16: the inference thread was in a forward "
            f"{r16['forward_busy'] * 100:.0f}% of the level's wall time, at {r16['forward_img_s']:.2f} img/s inside "
            f"those forwards with mean batch {r16['mean_batch']:.1f}; the same forward alone in process does "
            f"{forward_only:.2f} img/s at batch 8 (speedups table, reloader's row). Decoding "
            "and HTTP run on the other threads, on the same two cores.",
        ]
    kinds = {f"{r['server']} c={r['c']}": r["error_kinds"] for r in levels if r["error_kinds"]}
    if kinds:
        out += ["", f"Errors by kind: {kinds}"]
    return out


def _swap_tables(d: dict[str, Any]) -> list[str]:
    run: SwapRun = d["swaps"]
    out = [
        f"{run.extra['blocks']} steady and {run.extra['blocks']} swapping blocks of {run.extra['block_s']:.0f} s, "
        "alternating, one c=16 run; a request counts as 'during swaps' if it was sent inside a swapping block.",
        "",
        "| phase | requests | img/s | p50 ms | p99 ms | errors | 503 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, res in (("steady", run.steady), ("during swaps", run.swapping)):
        out.append(
            f"| {name} | {len(res.samples)} | {res.throughput:.2f} | {res.latency_ms(50):.0f} | "
            f"{res.latency_ms(99):.0f} | {res.errors} | {res.n503} |"
        )
    kinds: dict[str, int] = {}
    for _, s in run.drops:
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
    swapped = [e for e in run.events if e["event"] == "swapped" and "since_detected" in e.get("timings_ms", {})]
    rejected = [e for e in run.events if e["event"] == "rejected"]
    timings = swap_timings(run.events)
    served, allowed = run.served, run.allowed
    reasons = sorted({(e.get("reason") or "").split(":")[0] for e in rejected})
    skipped = len(run.drops) - len(swapped) - len(rejected)
    out += [
        "",
        f"Dropped: {kinds}. The gate examined {len(swapped) + len(rejected)}: {len(swapped)} went live, "
        f"{len(rejected)} were rejected (by {', '.join(reasons) or 'none'}); {skipped} were never examined, "
        "because a newer file landed while the gate was busy with an earlier one (the newest file wins).",
        "",
        "| detection -> live (ms) | min | p50 | max |",
        "|---|---|---|---|",
    ]
    for key, label in (("since_detected", "timings_ms.since_detected"), ("total", "timings_ms.total (the gate)")):
        s = timings[key]
        out.append(f"| {label} | {_f(s['min'], 0)} | {_f(s['p50'], 0)} | {_f(s['max'], 0)} |")
    out += [
        "",
        f"Versions that answered: {len(served)} distinct sha256; all validated (initial or a valid drop): "
        f"**{served <= allowed}**; any invalid file's sha256 among them: **{bool(served & run.invalid_shas)}**.",
        f"Peak RSS during the swap run over the c=16 steady RSS: {run.peak_over_steady_kib / 1024:.0f} MiB "
        f"({run.peak_over_steady_kib * 1024 / d['model_bytes']:.2f}x the model).",
    ]
    return out


def _memory_table(d: dict[str, Any]) -> list[str]:
    m = d["memory"]
    mb = d["model_bytes"]
    p, s = m["peak_over_before_kib"], m["sampled_peak_over_before_kib"]
    return [
        f"Model: {mb / MB:.1f} MiB of tensors (state_dict), {d['file_bytes'] / MB:.1f} MiB on disk.",
        "",
        "| reading | VmRSS MiB | vs start |",
        "|---|---|---|",
        f"| start (after a 2 s c=8 burst) | {m['rss_start_kib'] / 1024:.0f} | - |",
        f"| after 1 swap | {m['rss_after_1_kib'] / 1024:.0f} | "
        f"{(m['rss_after_1_kib'] / m['rss_start_kib'] - 1) * 100:+.1f}% |",
        f"| after {m['swaps']} swaps | {m['rss_after_n_kib'] / 1024:.0f} | "
        f"{(m['rss_after_n_kib'] / m['rss_start_kib'] - 1) * 100:+.1f}% |",
        "",
        f"Peak during one swap over the RSS just before it ({m['peak_source']}): min {p['min'] / 1024:.0f}, "
        f"p50 {p['p50'] / 1024:.0f}, max {p['max'] / 1024:.0f} MiB = {p['max'] * 1024 / mb:.2f}x the model "
        f"(VmRSS sampled every 5 ms: max {s['max'] / 1024:.0f} MiB).",
        *_absolute_peak(m),
    ]


def _absolute_peak(m: dict[str, Any]) -> list[str]:
    if "peak_kib" not in m:  # results written before the absolute peak was recorded
        return []
    b, a = m["before_kib"], m["peak_kib"]
    return [
        "",
        f"The RSS just before each swap: p50 {b['p50'] / 1024:.0f} MiB; the absolute peak during a swap: p50 "
        f"{a['p50'] / 1024:.0f}, max {a['max'] / 1024:.0f} MiB. The peak over the RSS before it grows when the "
        "previous swap gave more memory back to the OS, so the absolute peak is what compares across versions.",
    ]


def split_table(d: dict[str, Any]) -> list[str]:
    cols = (
        ("detection_ms", "detection"),
        ("settle_hash_ms", "settle + pre-hash"),
        ("load_ms", "load"),
        ("validation_ms", "validation"),
        ("swap_ms", "swap"),
        ("to_live_ms", "land -> live"),
        ("to_first_response_ms", "land -> first new response"),
        ("live_to_first_response_ms", "live -> first new response"),
        ("overhead_to_live_ms", "to live minus load+validation"),
        ("overhead_to_first_response_ms", "to first new response minus load+validation"),
    )
    out = [
        "Median (min-max) in ms over the drops; two pollers post continuously. 'land' is the os.replace for a rename "
        "and the close() for an in-place write. From 'live' to the first new response: the gate's last pass kept "
        "its turn at the forward lock for the swap, so the serving pass waiting for that turn runs on the new "
        "version (a pass already running when a gate ends in its fidelity check finishes on the old one).",
        "",
        "| how | n | " + " | ".join(label for _, label in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for kind, samples in d["split"].items():
        if not samples:
            continue
        cells = []
        for key, _ in cols:
            values = [s[key] for s in samples if not math.isnan(s[key])]
            cells.append(f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})" if values else "n/a")
        out.append(f"| {kind.replace('_', '-')} | {len(samples)} | " + " | ".join(cells) + " |")
    out += [
        "",
        f"For scale: sha256 of the {d['file_bytes'] / MB:.0f} MiB file in the bench process took {d['sha_ms']:.0f} ms.",
    ]
    return out


def write_split(path: Path, d: dict[str, Any]) -> None:
    """`--only split`: section 6 alone, with issue 3's rows, for an A/B of the reload path (one checkout each)."""
    hw = Hardware.detect()
    lines = [
        "# reloader benchmark: the reload latency split alone",
        "",
        f"- Date: {d['started']}; load average {d['load_start']} at the start.",
        f"- Machine: {os.cpu_count()} cores, {hw.cpu_model}; CPU flags: {' '.join(sorted(hw.cpu_flags))}",
        f"- Code: {d['code']}",
        "",
        *split_table(d),
        "",
        "| target | measured | ratio | result |",
        "|---|---|---|---|",
        *split_targets(d["split"]),
        "",
    ]
    path.write_text("\n".join(lines))


def write_results(path: Path, d: dict[str, Any]) -> None:
    versions = {name: _version(name) for name in ("torch", "torchvision", "uvicorn", "starlette", "litserve")}
    versions = {"python": platform.python_version(), **versions}
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}
    lines = [
        "# reloader benchmark results",
        "",
        f"- Date: {d['started']}; the whole run took {d['elapsed_s'] / 60:.1f} min.",
        f"- Machine: {os.cpu_count()} cores, {Hardware.detect().cpu_model}, {_ram_gib():.0f} GiB RAM; load average "
        f"{d['load_start']} at the start and {d['load_end']} at the end (this run's own processes included; other "
        "jobs share the machine); as each "
        "part began: " + "; ".join(f"{name.split('.')[0]}: {load}" for name, load in d["phase_load"]) + ".",
        f"- CPU flags: {' '.join(sorted(Hardware.detect().cpu_flags))}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        f"- Threads: {f'set for every process: {env}' if env else 'torch defaults in every process'} "
        f"(torch.get_num_threads() = {torch.get_num_threads()} here); no server ran during another.",
        f"- Command: `{d['command']}` (arguments: duration {d['args']['duration']} s per level, swaps for "
        f"{d['args']['swap_duration']} s every {d['args']['swap_every']} s, {d['args']['swaps']} memory swaps, "
        f"{d['args']['split']} drops per kind for the split).",
        "- Start-up to ready: " + ", ".join(f"{k} {v:.1f} s" for k, v in d["started_in"].items()) + ".",
        "",
        "Workload: torchvision resnet18 with random weights (num_classes=1000, labels imagenet), preprocess resize "
        "256 crop 224, the same five 640x480 JPEG uploads (quality 90) and the same aiohttp client for every server. "
        "Absolute numbers depend on what else the machine runs; compare ratios within this file only.",
        "",
        "## Targets",
        "",
        *_targets(d),
        "",
        "## 1. The limit, in process (no server)",
        "",
        *_limit_tables(d),
        "",
        "## 1b. Large uploads (issue 11)",
        "",
        *uploads.report_lines(d["uploads"]),
        "",
        *uploads.targets(d["uploads"]),
        "",
        "## 2-3. reloader and peers by concurrency",
        "",
        "'in-process limit next to it' is the mean of two short in-process readings (decode+preprocess+forward "
        "at the best batch size, the better of serial and pipelined) taken just before and just after the level, "
        "with the server's processes stopped (SIGSTOP); it tracks the machine's speed at that moment. "
        "503 (queue full) counts the 503s whose body says the bounded queue is full; the client honours "
        f"Retry-After. reloader's queue_size is {d['queue_size']} (see README). 'forward busy' and 'img/s inside "
        "forward' come from reloader's /metrics (forward time over the level's wall time; images per second of "
        "forward).",
        "",
        *_level_table(d["levels"], d["speedups"][RELOADER_FORWARD]["img_s"]),
        "",
        "## 4. Swaps under load (reloader, c=16)",
        "",
        *_swap_tables(d),
        "",
        "## 5. Memory over swaps (no load)",
        "",
        *_memory_table(d),
        "",
        "## 6. Reload latency split (issue 3)",
        "",
        *split_table(d),
        "",
        "## 7. Precision (issue 11)",
        "",
        *precision.report_lines(d["precision"], d["levels"]),
        "",
        "Targets of issue 11 (the AMX rows are judged only on a CPU with AMX-BF16):",
        "",
        *precision.targets(d["precision"], d["levels"]),
        "",
        "## 8. A large model (issue 11)",
        "",
        *large.report_lines(d["precision"]["large"]),
        "",
    ]
    path.write_text("\n".join(lines))
