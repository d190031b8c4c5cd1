"""`make bench`: every measurement side by side in one run, written to bench/RESULTS.md.

python -m bench.run            # the full run (~15 min on 2 cores)
python -m bench.run --quick    # a smoke run of every part (~4 min)
python -m bench.fleet          # section 9 (the fleet) alone, into bench/out/fleet.md
python -m bench.run --only canary   # section 10 (the shadow canary) alone, into bench/out/canary.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch

from . import canary, fleet, inprocess, large, precision, reloads, servers, uploads, workload
from .client import measure
from .report import write_results, write_split

HERE = Path(__file__).resolve().parent
# Naive at c=64 is not cheap: every request waits for all the others, one forward at a time (minutes of drain).
LEVELS = {
    "reloader": (1, 4, 16, 64),
    "litserve": (1, 4, 16, 64),
    "naive": (1, 4, 16),
    "reloader auto": (1, 16),
    "reloader auto+compile": (1, 16),
    "litserve bf16": (1, 16),
}
# c=64 stays under the queue bound only if queue_size >= 64; 32 makes it overflow, so the 503 path is exercised.
QUEUE_SIZE = 32


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorten everything: a smoke run")
    parser.add_argument("--duration", type=float, help="seconds measured per concurrency level (default 15)")
    parser.add_argument("--swap-duration", type=float, help="seconds of swapping under load (default 60)")
    parser.add_argument("--swap-every", type=float, default=2.0, help="seconds between dropped checkpoints")
    parser.add_argument("--swaps", type=int, help="valid swaps for the memory measurement (default 100)")
    parser.add_argument("--split", type=int, help="drops per kind for the reload latency split (default 10)")
    parser.add_argument("--out", type=Path, help="default bench/RESULTS.md (bench/out/<section>.md with --only)")
    parser.add_argument("--only", choices=["canary", "split"], help="run one section alone")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (checkpoints, configs, logs)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads for every process (default: torch's)")
    args = parser.parse_args(argv)
    args.out = args.out or (HERE / "out" / f"{args.only}.md" if args.only else HERE / "RESULTS.md")
    quick = args.quick
    args.duration = args.duration or (3.0 if quick else 15.0)
    args.swap_duration = args.swap_duration or (8.0 if quick else 60.0)
    args.swaps = args.swaps or (3 if quick else 100)
    args.split = args.split or (1 if quick else 10)
    args.rounds = 1 if quick else 3
    args.probes = 1 if quick else 3
    args.warmup = 1.0 if quick else 2.0
    return args


PHASE_LOAD: list[tuple[str, str]] = []


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _phase(name: str) -> None:
    """Log the phase and the machine's load average as it starts (other jobs share the machine)."""
    PHASE_LOAD.append((name, _loadavg()))
    _log(name)


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _scrape(base: str) -> dict[str, float]:
    """reloader's batch-size and forward-time histograms, summed (to compute per-level deltas)."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for name in ("reloader_batch_size_sum", "reloader_batch_size_count", "reloader_forward_duration_seconds_sum"):
        found = re.findall(rf"^{name}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.M)
        out[name] = sum(float(v) for v in found)
    return out


def _chosen(server: servers.Server) -> dict[str, Any]:
    """What the live version's gate chose: its form, how it says so, the fidelity check's detail, its time."""
    with urllib.request.urlopen(f"{server.base}/models/{workload.MODEL}", timeout=10) as response:
        report = json.loads(response.read())["live"]["report"]
    form = (report["precision"], report["form"])
    return {
        "form": form,
        "chosen": "fp32" if form == ("fp32", "eager") else f"{form[0]} ({form[1]})",
        # precision: fp32 runs no fidelity check: there is nothing to compare
        "fidelity": next((c["detail"] for c in report["checks"] if c["name"] == "fidelity"), "fp32 asked for"),
        "gate_s": report["total_ms"] / 1000,
        "started_in_s": server.started_in_s,
    }


def _levels(server: servers.Server, path: str, images: list[bytes], limit: inprocess.Limit, batch: int, args) -> list:
    """Each level bracketed by in-process probes taken with the server frozen; a level's limit is their mean."""
    rows = []
    with server.paused():
        before = limit.probe(batch, args.probes)
    for c in LEVELS[server.name]:
        scraped = _scrape(server.base) if server.name.startswith("reloader") else None
        t0 = time.monotonic()
        result = measure(server.base + path, images, c, args.duration, args.warmup)
        elapsed = time.monotonic() - t0
        row: dict[str, Any] = {"server": server.name, **result.summary(), "error_kinds": dict(result.error_kinds)}
        if scraped is not None:
            after = _scrape(server.base)
            batches = after["reloader_batch_size_count"] - scraped["reloader_batch_size_count"]
            imgs = after["reloader_batch_size_sum"] - scraped["reloader_batch_size_sum"]
            fwd = after["reloader_forward_duration_seconds_sum"] - scraped["reloader_forward_duration_seconds_sum"]
            row.update(
                mean_batch=imgs / max(batches, 1), forward_busy=fwd / elapsed, forward_img_s=imgs / max(fwd, 1e-9)
            )
        with server.paused():
            after_probe = limit.probe(batch, args.probes)
        row["limit_img_s"] = (before["img_s"] + after_probe["img_s"]) / 2
        row["limit_serial_img_s"] = (before["serial_img_s"] + after_probe["serial_img_s"]) / 2
        row["limit_pipelined_img_s"] = (before["pipelined_img_s"] + after_probe["pipelined_img_s"]) / 2
        row["limit_b1_ms"] = (before["latency_b1_ms"] + after_probe["latency_b1_ms"]) / 2
        before = after_probe
        rows.append(row)
        _log(
            f"{server.name} c={c}: {row['img_s']:.2f} img/s (limit {row['limit_img_s']:.2f}), "
            f"p99 {row['p99_ms']:.0f} ms, errors {row['errors']}, 503s {row['n503']}"
        )
    return rows


def _canary_section(tmp: Path, logs: Path, images: list[bytes], args: argparse.Namespace, out: Path) -> None:
    _phase("10. the shadow canary: c=16 with and without a candidate in shadow")
    try:
        run = canary.measure(tmp, logs, images, args, servers.reloader)
    except Exception as exc:  # a failed phase keeps the rest of the run
        run = {"error": f"{type(exc).__name__}: {exc}"}
    with open(out, "a") as fh:
        fh.write("\n".join(["", canary.SECTION, "", *canary.report_lines(run), "", *canary.targets(run), ""]))


def _initial() -> tuple[dict[str, torch.Tensor], bytes, float]:
    """The first checkpoint every server starts from: its state_dict, its bytes, and the ms sha256 of them
    takes in this process (section 6 gives it for scale)."""
    base = workload.state_dict(seed=0)
    initial = workload.to_bytes(base)
    t0 = time.perf_counter()
    workload.sha256(initial)
    return base, initial, (time.perf_counter() - t0) * 1000.0


def _split_alone(args: argparse.Namespace) -> None:
    """Section 6 on a reloader of its own, run from this checkout's code (so two checkouts give an A/B)."""
    tmp = Path(tempfile.mkdtemp(prefix="reloader-bench-split-"))
    started, load = time.strftime("%Y-%m-%d %H:%M:%S %Z"), _loadavg()
    base, initial, sha_ms = _initial()
    folder = workload.checkpoints_folder(tmp, "split", initial)
    config = workload.reloader_config(folder.parent, folder, queue_size=QUEUE_SIZE)
    (tmp / "logs").mkdir()
    with servers.reloader(config, tmp / "logs") as server:
        split = reloads.latency_split(server, folder, workload.jpeg_images(), base, args.split)
    code = f"{servers.ROOT} at {servers.git_state()}"
    d = {"split": split, "file_bytes": len(initial), "sha_ms": sha_ms, "started": started, "load_start": load}
    write_split(args.out, {**d, "code": code})
    shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.only == "split":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        _split_alone(args)
        print(args.out.read_text())
        return 0
    if args.only == "canary":
        tmp = Path(tempfile.mkdtemp(prefix="reloader-bench-canary-"))
        (tmp / "logs").mkdir()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# reloader benchmark: the canary section alone\n\n- Load average {_loadavg()}.\n")
        _canary_section(tmp, tmp / "logs", workload.jpeg_images(), args, args.out)
        print(args.out.read_text())
        shutil.rmtree(tmp, ignore_errors=True)
        return 0
    if args.threads:
        # Servers inherit the environment; this process sets its own pool.
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    started, t_start = time.strftime("%Y-%m-%d %H:%M:%S %Z"), time.monotonic()
    load_start = _loadavg()
    tmp = Path(tempfile.mkdtemp(prefix="reloader-bench-"))
    logs = tmp / "logs"
    logs.mkdir()
    _log(f"working in {tmp}")
    try:
        images = workload.jpeg_images()
        base, initial, sha_ms = _initial()
        init_path = tmp / "resnet18-init.pt"
        init_path.write_bytes(initial)

        def fresh_folder(name: str) -> Path:
            return workload.checkpoints_folder(tmp, name, initial)

        _phase("1. the in-process limit and the free speedups")
        limit = inprocess.Limit(images, base)
        table = limit.table(args.rounds)
        speedups = inprocess.speedups(base, args.rounds)
        batch = table["best_batch"]
        _phase("1b. large uploads: JPEGs decoded at reduced size against at full size")
        uploads_run: dict[str, Any] = {"decode": uploads.decode_table(args.rounds)}

        _phase("2-3. reloader and its peers at each concurrency, one server at a time")
        levels: list[dict[str, Any]] = []
        folder = fresh_folder("serve")
        config = workload.reloader_config(folder.parent, folder, queue_size=QUEUE_SIZE)
        started_in = {}
        for name, make, path in (
            ("reloader", lambda: servers.reloader(config, logs), f"/models/{workload.MODEL}/predict"),
            ("litserve", lambda: servers.litserve(init_path, logs), "/predict"),
            ("naive", lambda: servers.naive(init_path, logs), "/predict"),
        ):
            with make() as server:
                started_in[name] = server.started_in_s
                levels += _levels(server, path, images, limit, batch, args)

        _phase("4. swaps under load")
        folder = fresh_folder("swaps")
        blocks, _, per_block = reloads.swap_plan(args.swap_duration, args.swap_every)
        staged = reloads.stage_swaps(folder, 2, blocks * per_block, seed=100)
        config = workload.reloader_config(folder.parent, folder, queue_size=QUEUE_SIZE)
        with servers.reloader(config, logs) as server:
            swap_run = reloads.swaps_under_load(server, folder, images, staged, args.swap_duration, args.swap_every)

        _phase("5-6. memory over many swaps, then the reload latency split")
        folder = fresh_folder("memory")
        config = workload.reloader_config(folder.parent, folder, queue_size=QUEUE_SIZE)
        with servers.reloader(config, logs) as server:
            memory = reloads.memory(server, folder, images, base, args.swaps)
            split = reloads.latency_split(server, folder, images, base, args.split)

        _phase("7. precision: bf16 forms in process, their agreement, and auto served next to LitServe bf16")
        prec: dict[str, Any] = {"forward": precision.forward_table(base, args.rounds)}
        prec["agreement"] = precision.demo_agreement(tmp, epochs=1 if args.quick else 2)
        folder = fresh_folder("auto")
        config = workload.reloader_config(folder.parent, folder, queue_size=QUEUE_SIZE, precision="auto")
        with servers.reloader(config, logs, "reloader auto") as server:
            chosen = _chosen(server)
            form, prec["chosen"], prec["fidelity"] = chosen["form"], chosen["chosen"], chosen["fidelity"]
            auto_limit = inprocess.Limit(images, base, form)
            auto_batch = batch  # fp32's best batch; the limit of another precision is read at that one's best
            if form != ("fp32", "eager"):
                with server.paused():
                    auto_batch = auto_limit.table(args.rounds)["best_batch"]
            prec["auto_batch"] = auto_batch
            levels += _levels(server, f"/models/{workload.MODEL}/predict", images, auto_limit, auto_batch, args)
            folder = fresh_folder("fp32-beside-auto")
            config = workload.reloader_config(folder.parent, folder, queue_size=QUEUE_SIZE)
            with servers.reloader(config, logs, "reloader fp32 beside auto") as fp32_server:
                prec["side_by_side"] = precision.side_by_side(
                    fp32_server, server, images, args.rounds, args.duration, args.warmup
                )
            _log(f"side by side: auto / fp32 {prec['side_by_side']['ratio']:.2f}x, {prec['side_by_side']['img_s']}")
        # The same with optimize: compile (Inductor, freezing): every form is compiled before it is proven and timed.
        folder = fresh_folder("auto-compile")
        config = workload.reloader_config(
            folder.parent, folder, queue_size=QUEUE_SIZE, precision="auto", optimize="compile"
        )
        with servers.reloader(config, logs, "reloader auto+compile") as server:
            prec["compiled"] = _chosen(server)
            form = prec["compiled"]["form"]
            limit = inprocess.Limit(images, base, form, optimize="compile")
            levels += _levels(server, f"/models/{workload.MODEL}/predict", images, limit, batch, args)
            # One swap under c=16 load while its gate compiles each form.
            staged = reloads.stage_swaps(folder, 2, 1, seed=300)[0]
            prec["compiled_swap"] = reloads.during_one_gate(server, images, staged, steady_s=args.duration)
        if prec["forward"]["why_not_bf16"] is None:
            with servers.litserve(init_path, logs, bf16=True) as server:
                bf16_limit = inprocess.Limit(images, base, ("bf16", "autocast"))
                levels += _levels(server, "/predict", images, bf16_limit, batch, args)
        folder = fresh_folder("auto-swaps")
        staged = reloads.stage_swaps(folder, 2, blocks * per_block, seed=200)
        config = workload.reloader_config(folder.parent, folder, queue_size=QUEUE_SIZE, precision="auto")
        with servers.reloader(config, logs, "reloader auto") as server:
            prec["swaps"] = reloads.swaps_under_load(
                server, folder, images, staged, args.swap_duration, args.swap_every
            )

        _phase("8. a large model: resnet101's gate and swap")
        try:
            prec["large"] = large.measure(tmp, logs, servers.reloader)
        except (TimeoutError, RuntimeError, OSError) as exc:  # a failed phase keeps the rest of the run
            prec["large"] = {"error": f"{type(exc).__name__}: {exc}"}

        # Section 1b's served half and the demo's answers: after the sections above, so that its two servers
        # decoding 12 MP photos do not run just before them.
        _phase("1b-served. large uploads: 12 MP photos at c=16, drafted and at full size; the demo's answers")
        uploads_run["served"] = uploads.served(fresh_folder, logs, args.rounds, args.duration, args.warmup)
        _log(f"12 MP photos served, draft_gap 2 / full size: {uploads_run['served']['ratio']:.2f}x")
        uploads_run["demo"] = uploads.demo_answers(Path(prec["agreement"]["checkpoint"]))

        _phase("9. a fleet: 3 replicas behind nginx, checkpoints from S3 (moto); uploads and a rolling restart")
        try:
            fleet_run = fleet.measure(tmp, uploads=4 if args.quick else len(fleet.KINDS))
        except Exception as exc:  # a failed phase keeps the rest of the run
            fleet_run = {"error": f"{type(exc).__name__}: {exc}"}

        write_results(
            args.out,
            {
                "started": started,
                "elapsed_s": time.monotonic() - t_start,
                "load_start": load_start,
                "load_end": _loadavg(),
                "phase_load": PHASE_LOAD,
                "command": "make bench"
                if os.environ.get("MAKELEVEL")
                else "python -m bench.run " + " ".join(argv or sys.argv[1:]),
                "args": vars(args),
                "queue_size": QUEUE_SIZE,
                "model_bytes": workload.state_dict_bytes(base),
                "file_bytes": len(initial),
                "sha_ms": sha_ms,
                "table": table,
                "uploads": uploads_run,
                "speedups": speedups,
                "levels": levels,
                "started_in": started_in,
                "swaps": swap_run,
                "memory": memory,
                "split": split,
                "precision": prec,
            },
        )
        fleet.append_results(args.out, fleet_run)
        _canary_section(tmp, logs, images, args, args.out)
        _log(f"wrote {args.out} in {time.monotonic() - t_start:.0f} s")
    finally:
        if args.keep:
            _log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
