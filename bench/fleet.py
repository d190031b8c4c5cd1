"""9. A fleet: 3 replicas of the demo model behind nginx, checkpoints from moto's S3 server (examples/fleet.py).

python -m bench.fleet                        # this section alone -> bench/out/fleet.md (~4 min on 2 cores)
python -m bench.fleet --uploads 4            # shorter: the first 4 uploads of the 10
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import torch
import yaml

from examples.fleet import BUCKET, FAIL_TIMEOUT_S, MAX_FAILS, Fleet, FleetSpec, free_port, nginx_binary

from .client import LoadGenerator, LoadResult, Sample
from .workload import sha256

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config/models.yaml"
MODEL = "shapes"
CONCURRENCY = 16
REPLICAS = 3
# Four of the ten are invalid, one of each kind; no replica may ever serve them.
KINDS = ("valid", "wrong_shape", "valid", "garbage", "valid", "nan", "valid", "truncated", "valid", "valid")
POLL_EVERY_S = 0.02  # each replica's GET /models/shapes, while an upload converges
SETTLE_DEADLINE_S = 180.0
BEFORE_S = 2.0  # load on the settled fleet before the first upload and after the last
AFTER_S = 1.5  # load after every replica has settled an upload, before the next one
ACCESS = re.compile(r'" (\d{3}) upstream=(.*?) upstream_status=(.*?) version=(\S*) sha256=(\S*) ')


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] fleet: {message}", file=sys.stderr, flush=True)


# -- what is uploaded ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    index: int
    kind: str
    path: Path
    sha: str

    @property
    def uri(self) -> str:
        return f"s3://{BUCKET}/{MODEL}/{self.path.name}"


def demo_checkpoint(tmp: Path) -> tuple[Path, str]:
    """The demo's newest checkpoint: section 7's (tmp/demo), else checkpoints/shapes/, else one epoch trained now."""
    for folder, where in ((tmp / "demo", "trained by section 7"), (ROOT / "checkpoints" / MODEL, "checkpoints/shapes")):
        found = sorted(folder.glob("shapes-epoch*.pt"))
        if found:
            return found[-1], f"{found[-1].name}, {where}"
    from examples.shapes import train

    os.environ["TQDM_DISABLE"] = "1"
    t0 = time.perf_counter()
    train.main(["--epochs", "1", "--out", str(tmp / "demo"), "--golden", str(tmp / "demo-golden")])
    path = sorted((tmp / "demo").glob("shapes-epoch*.pt"))[-1]
    return path, f"{path.name}, trained for this run ({time.perf_counter() - t0:.0f} s)"


def _to_bytes(sd: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def stage_uploads(base_path: Path, folder: Path, count: int) -> list[Upload]:
    """Version 2, 3 ... of the model, written before the clock starts. Valid ones are the demo with its
    classifier bias moved by a seeded 1e-4 (distinct bytes, same answers); the invalid ones fail the gate's
    structure (wrong shape), load (garbage bytes, a truncated file) or finite (every float NaN) check."""
    base = torch.load(base_path, map_location="cpu", weights_only=True)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        gen = torch.Generator().manual_seed(1000 + i)
        valid = {**base, "fc.bias": base["fc.bias"] + 1e-4 * torch.randn(base["fc.bias"].shape, generator=gen)}
        if kind == "valid":
            data = _to_bytes(valid)
        elif kind == "wrong_shape":
            data = _to_bytes({**valid, "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)})
        elif kind == "garbage":
            data = random.Random(i).randbytes(1 << 20)
        elif kind == "nan":
            nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in valid.items()}
            data = _to_bytes(nan)
        else:  # truncated: the first half of a valid file
            full = _to_bytes(valid)
            data = full[: len(full) // 2]
        path = folder / f"{MODEL}-v{i + 2}.pt"
        path.write_bytes(data)
        out.append(Upload(i + 1, kind, path, sha256(data)))
    return out


# -- the load, through nginx -----------------------------------------------------------------------------


class HeaderLoad(LoadGenerator):
    """bench/client.py's closed-loop workers, reading the version from the X-Model-Sha256 header. Every
    answer but a 200 is a failure here (a 503 is what nginx should have retried on another replica)."""

    async def _one(self, session: aiohttp.ClientSession, body: bytes) -> tuple[Sample, float]:
        started = time.time()
        try:
            async with session.post(self.url, data=body, headers={"content-type": "image/png"}) as response:
                raw = await response.read()
                status = response.status
                sha = response.headers.get("x-model-sha256")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return Sample(started, time.time(), 0, None, f"{type(exc).__name__}: {exc}"), 0.0
        finished = time.time()
        detail = None if status == 200 else raw[:200].decode(errors="replace")
        return Sample(started, finished, status, sha, detail), 0.0


def _images() -> list[bytes]:
    warmup = yaml.safe_load(CONFIG.read_text())["models"][MODEL]["warmup"]["images"]
    return [(CONFIG.parent / p).read_bytes() for p in warmup]


def _failed(result: LoadResult) -> list[Sample]:
    return [s for s in result.samples if s.status != 200]


def _phase_summary(result: LoadResult, access: list[tuple[str, ...]]) -> dict[str, Any]:
    t0 = min(s.started for s in result.samples)
    t1 = max(s.finished for s in result.samples)
    ok = [s for s in result.samples if s.status == 200]
    lat = sorted((s.finished - s.started) * 1000.0 for s in ok)
    failed = _failed(result)
    kinds: dict[str, int] = {}
    for s in failed:
        key = f"{s.status} {(s.detail or '')[:60]}"
        kinds[key] = kinds.get(key, 0) + 1
    return {
        "requests": len(result.samples),
        "seconds": t1 - t0,
        "img_s": len(ok) / (t1 - t0),
        "p50_ms": lat[len(lat) // 2] if lat else float("nan"),
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan"),
        "failed": len(failed),
        "failed_kinds": kinds,
        "nginx_lines": len(access),
        "nginx_retried": sum(1 for line in access if "," in line[1]),
        "nginx_non200": sum(1 for line in access if line[0] != "200"),
    }


def _access_lines(path: Path, offset: int) -> tuple[list[tuple[str, ...]], int]:
    data = path.read_bytes()
    lines = [m.groups() for line in data[offset:].decode(errors="replace").splitlines() if (m := ACCESS.search(line))]
    return lines, len(data)


async def _status(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(f"{url}/models/{MODEL}") as response:
        return await response.json()


async def _converge(fleet: Fleet, session: aiohttp.ClientSession, item: Upload, invalid: set[str]) -> dict[str, Any]:
    """Upload, then poll every replica until it serves the upload (valid) or lists it rejected (invalid)."""
    loop = asyncio.get_running_loop()
    t_start = time.time()
    await loop.run_in_executor(None, fleet.upload, item.path, MODEL)
    done = time.time()  # upload_file has returned: the object is complete and listed
    per: dict[int, dict[str, Any]] = {}
    served_invalid: list[str] = []
    while len(per) < len(fleet.replicas):
        if time.time() - done > SETTLE_DEADLINE_S:
            raise TimeoutError(f"upload {item.index} ({item.kind}) unsettled on a replica after {SETTLE_DEADLINE_S} s")
        pending = [i for i in range(len(fleet.replicas)) if i not in per]
        statuses = await asyncio.gather(*(_status(session, fleet.replicas[i].url) for i in pending))
        now = time.time()
        for i, status in zip(pending, statuses, strict=True):
            live = status.get("live") or {}
            if live.get("sha256") in invalid:
                served_invalid.append(f"replica {i}: {live.get('path')}")
            if item.kind == "valid":
                if live.get("sha256") == item.sha:
                    per[i] = {"s": now - done, "gate_ms": live["report"]["total_ms"]}
            else:
                entry = next((f for f in status["files"] if f["path"] == item.uri), None)
                if entry is not None and entry["status"] == "rejected":
                    per[i] = {"s": now - done, "reason": (entry["reason"] or "").split(":")[0]}
        await asyncio.sleep(POLL_EVERY_S)
    return {
        "index": item.index,
        "kind": item.kind,
        "name": item.path.name,
        "sha": item.sha,
        "bytes": item.path.stat().st_size,
        "upload_s": done - t_start,
        "done_at": done,
        "replicas": [per[i] for i in range(len(fleet.replicas))],
        "served_invalid": served_invalid,
    }


async def _uploads_under_load(fleet: Fleet, uploads: list[Upload], images: list[bytes]) -> tuple[LoadResult, list]:
    url = f"{fleet.url}/models/{MODEL}/predict"
    result = LoadResult(CONCURRENCY)
    stop = asyncio.Event()
    load = asyncio.create_task(HeaderLoad(url, images, CONCURRENCY).run_until(stop, result))
    invalid = {u.sha for u in uploads if u.kind != "valid"}
    records = []
    try:
        await asyncio.sleep(BEFORE_S)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            for item in uploads:
                records.append(await _converge(fleet, session, item, invalid))
                r = records[-1]
                what = (
                    "served by every replica after " if item.kind == "valid" else "rejected by every replica after "
                ) + ", ".join(f"{p['s']:.2f}" for p in r["replicas"])
                _log(f"upload {item.index}/{len(uploads)} ({item.kind}, {r['upload_s']:.1f} s to upload): {what} s")
                await asyncio.sleep(AFTER_S)
    finally:
        stop.set()
        await load
    return result, records


async def _rolling_restart(fleet: Fleet, images: list[bytes]) -> tuple[LoadResult, list[dict[str, float]]]:
    url = f"{fleet.url}/models/{MODEL}/predict"
    result = LoadResult(CONCURRENCY)
    stop = asyncio.Event()
    load = asyncio.create_task(HeaderLoad(url, images, CONCURRENCY).run_until(stop, result))
    loop = asyncio.get_running_loop()
    steps = []
    try:
        await asyncio.sleep(BEFORE_S)
        for replica in fleet.replicas:
            t0 = time.monotonic()
            code = await loop.run_in_executor(None, replica.stop)
            drained = time.monotonic() - t0
            replica.start()
            ready = await loop.run_in_executor(None, replica.wait_ready)
            steps.append({"drain_s": drained, "exit": code, "ready_s": ready})
            _log(f"{replica.name}: SIGTERM -> exit {code} in {drained:.1f} s, started again, ready in {ready:.1f} s")
            # nginx's passive check keeps a replica it saw refuse out of rotation for fail_timeout: wait that
            # long, so the replica is back in rotation before the next one goes.
            await asyncio.sleep(FAIL_TIMEOUT_S + 0.5)
        await asyncio.sleep(BEFORE_S)
    finally:
        stop.set()
        await load
    return result, steps


def _windows(records: list[dict[str, Any]], result: LoadResult, initial_sha: str) -> None:
    """For each valid upload: from the first answer by it to the last answer by the version it replaced."""
    previous = initial_sha
    for r in records:
        if r["kind"] != "valid":
            r["previous"] = previous
            continue
        new = [s.finished for s in result.samples if s.status == 200 and s.sha256 == r["sha"]]
        old = [s.finished for s in result.samples if s.status == 200 and s.sha256 == previous]
        r["first_new_at"] = min(new) if new else float("nan")
        r["last_old_at"] = max(old) if old else float("nan")
        r["window_s"] = max(0.0, r["last_old_at"] - r["first_new_at"]) if new and old else float("nan")
        r["previous"] = previous
        previous = r["sha"]


def measure(tmp: Path, *, uploads: int = len(KINDS), restart: bool = True) -> dict[str, Any]:
    nginx_binary()  # a clear error, before anything starts, where nginx is missing
    checkpoint, origin = demo_checkpoint(tmp)
    staged = stage_uploads(checkpoint, tmp / "fleet-uploads", uploads)
    config = yaml.safe_load(CONFIG.read_text())
    poll_interval = float((config.get("watch") or {}).get("poll_interval", 1.0))
    initial = _initial(checkpoint, tmp)
    spec = FleetSpec(
        config=CONFIG,
        scratch=tmp / "fleet",
        port=free_port(),
        replica_ports=[free_port() for _ in range(REPLICAS)],
        s3_port=free_port(),
        uploads={MODEL: [initial]},
        # auto would time fp32 against the bf16 forms at each replica's first file: three replicas doing
        # that at once on two cores costs start-up minutes and says nothing about the fleet.
        models={MODEL: {"precision": "fp32"}},
        replica_args=["--no-access-log"],
    )
    images = _images()
    initial_sha = sha256(initial.read_bytes())
    out: dict[str, Any] = {
        "checkpoint": origin,
        "poll_interval": poll_interval,
        "replicas": REPLICAS,
        "concurrency": CONCURRENCY,
        "threads": os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // REPLICAS)),
        "versions": _versions(),
    }
    with Fleet(spec) as fleet:
        out["started_in_s"] = fleet.started_in_s
        _log(f"up in {fleet.started_in_s:.1f} s; {len(staged)} uploads under c={CONCURRENCY} through nginx")
        offset = 0
        result, records = asyncio.run(_uploads_under_load(fleet, staged, images))
        access, offset = _access_lines(fleet.nginx.access_log, offset)  # type: ignore[union-attr]
        _windows(records, result, initial_sha)
        invalid = {u.sha for u in staged if u.kind != "valid"}
        out["uploads"] = records
        out["upload_phase"] = _phase_summary(result, access)
        out["served_invalid"] = sorted(
            {s.sha256 for s in result.samples if s.sha256 in invalid}
            | {line[4] for line in access if line[4] in invalid}
        ) + [x for r in records for x in r["served_invalid"]]
        out["gate_limit_s"] = {
            r["index"]: poll_interval + max(p["gate_ms"] for p in r["replicas"]) / 1000.0 + 1.0
            for r in records
            if r["kind"] == "valid"
        }
        if restart:
            _log(f"rolling restart under c={CONCURRENCY} through nginx")
            result, steps = asyncio.run(_rolling_restart(fleet, images))
            access, offset = _access_lines(fleet.nginx.access_log, offset)  # type: ignore[union-attr]
            out["restart_phase"] = _phase_summary(result, access)
            out["restart_steps"] = steps
            out["served_invalid"] += sorted({s.sha256 for s in result.samples if s.sha256 in invalid})
    return out


def _initial(checkpoint: Path, tmp: Path) -> Path:
    """The demo's checkpoint as version 1 in the bucket."""
    path = tmp / "fleet-initial" / f"{MODEL}-v1.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(checkpoint, path)
    return path


def _versions() -> dict[str, str]:
    nginx = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1]
    out = {"nginx": nginx}
    for dist in ("moto", "boto3"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


# -- RESULTS.md ------------------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "**FAIL**"


def targets(d: dict[str, Any]) -> list[str]:
    rows = ["| target | measured | result |", "|---|---|---|"]
    valid = [r for r in d["uploads"] if r["kind"] == "valid"]
    over = [r for r in valid if not r["window_s"] <= d["gate_limit_s"][r["index"]]]  # nan fails too
    windows = [r["window_s"] for r in valid]
    limits = [d["gate_limit_s"][r["index"]] for r in valid]
    measured = (
        f"windows {min(windows):.2f}-{max(windows):.2f} s against limits {min(limits):.2f}-{max(limits):.2f} s; "
        f"{len(valid) - len(over)} of {len(valid)} within" + (f" (over: {[r['index'] for r in over]})" if over else "")
        if valid
        else "no valid upload"
    )
    rows.append(
        f"| mixed-version window at nginx <= poll_interval ({d['poll_interval']:g} s) + the gate's time + 1 s, "
        f"every valid upload | {measured} | {_verdict(bool(valid) and not over)} |"
    )
    up = d["upload_phase"]
    rows.append(
        f"| 0 failed requests through nginx during the {len(d['uploads'])} uploads (c={d['concurrency']}) | "
        f"{up['failed']} of {up['requests']} | {_verdict(up['failed'] == 0)} |"
    )
    if "restart_phase" in d:
        rs = d["restart_phase"]
        rows.append(
            f"| 0 failed requests through nginx during a rolling restart of the {d['replicas']} replicas "
            f"(c={d['concurrency']}) | {rs['failed']} of {rs['requests']} | {_verdict(rs['failed'] == 0)} |"
        )
    invalid = [r for r in d["uploads"] if r["kind"] != "valid"]
    rejected_everywhere = sum(1 for r in invalid if all("reason" in p for p in r["replicas"]))
    clean = not d["served_invalid"]
    rows.append(
        f"| no replica ever serves an invalid upload, and each replica rejects each | "
        f"{len(d['served_invalid'])} answers or live versions with an invalid sha256; {rejected_everywhere} of "
        f"{len(invalid)} invalid uploads rejected by all {d['replicas']} replicas | "
        f"{_verdict(clean and rejected_everywhere == len(invalid))} |"
    )
    return rows


def report_lines(d: dict[str, Any]) -> list[str]:
    """Section 9 of RESULTS.md."""
    if "error" in d:
        return [
            f"The fleet section failed: `{d['error']}`.",
            "",
            "| target | measured | result |",
            "|---|---|---|",
            "| the fleet's targets: mixed-version windows, 0 failed requests during uploads and the rolling restart, "
            "no invalid upload served and each rejected by every replica | the section failed | **FAIL** |",
        ]
    v = d["versions"]
    lines = [
        f"examples/fleet.py's fleet (what `make fleet` starts): moto {v['moto']}'s S3 server on loopback, "
        f"{d['replicas']} replicas of `reloader serve` (each with its own cache dir and OMP_NUM_THREADS="
        f"{d['threads']}), nginx {v['nginx']} in front (upstream with max_fails={MAX_FAILS} "
        f"fail_timeout={FAIL_TIMEOUT_S}s, "
        "keepalive; `proxy_next_upstream error timeout http_502 http_503 non_idempotent`, tries = replicas). "
        f"Model: config/models.yaml's shapes (resnet18, 4 classes, 64 px) with precision forced to fp32 (auto "
        f"would time bf16 forms in each replica at start), poll_interval {d['poll_interval']:g} s; initial "
        f"checkpoint {d['checkpoint']}. Load: c={d['concurrency']} closed-loop through nginx, the 4 golden PNGs; "
        f"the version of each answer read from X-Model-Sha256. The fleet was ready in {d['started_in_s']:.1f} s.",
        "",
        *targets(d),
        "",
        "Each upload (boto3 upload_file to moto; the next one once every replica has settled it and "
        f"{AFTER_S:g} s more of load have passed). Per replica: seconds from upload_file's return until its "
        "GET /models/shapes showed the upload live (valid) or rejected (invalid), polled every "
        f"{POLL_EVERY_S * 1000:.0f} ms. Mixed-version window: from the first answer through nginx carrying the new "
        "sha256 to the last carrying the replaced one (client clocks, answer arrival); the limit is "
        "poll_interval + the slowest replica's gate (its report's total_ms) + 1 s.",
        "",
        "| # | kind | MiB | upload s | " + " | ".join(f"replica {i}" for i in range(d["replicas"]))
        + " | gate ms (max) | window s | limit s |",
        "|---|---|---|---|" + "---|" * d["replicas"] + "---|---|---|",
    ]
    for r in d["uploads"]:
        if r["kind"] == "valid":
            cells = [f"{p['s']:.2f}" for p in r["replicas"]]
            gate = f"{max(p['gate_ms'] for p in r['replicas']):.0f}"
            window = f"{r['window_s']:.2f}"
            limit = f"{d['gate_limit_s'][r['index']]:.2f}"
        else:
            cells = [f"rejected {p['s']:.2f} ({p['reason']})" for p in r["replicas"]]
            gate, window, limit = "-", "-", "-"
        lines.append(
            f"| {r['index']} | {r['kind']} | {r['bytes'] / 2**20:.1f} | {r['upload_s']:.2f} | "
            + " | ".join(cells)
            + f" | {gate} | {window} | {limit} |"
        )
    lines += [
        "",
        "| phase (c=16 through nginx) | requests | img/s | p50 ms | p99 ms | failed (non-200 or transport error) | "
        "passed by nginx to another replica |",
        "|---|---|---|---|---|---|---|",
    ]
    phases = [("during the uploads", d["upload_phase"])]
    if "restart_phase" in d:
        phases.append(("during the rolling restart", d["restart_phase"]))
    for name, p in phases:
        lines.append(
            f"| {name} | {p['requests']} | {p['img_s']:.1f} | {p['p50_ms']:.0f} | {p['p99_ms']:.0f} | "
            f"{p['failed']} | {p['nginx_retried']} |"
        )
    kinds = {name: p["failed_kinds"] for name, p in phases if p["failed_kinds"]}
    if kinds:
        lines += ["", f"Failed requests by kind: {kinds}"]
    if "restart_steps" in d:
        steps = "; ".join(
            f"replica {i}: exit {s['exit']} {s['drain_s']:.1f} s after SIGTERM, ready {s['ready_s']:.1f} s after start"
            for i, s in enumerate(d["restart_steps"])
        )
        lines += [
            "",
            f"Rolling restart, one replica at a time (then {FAIL_TIMEOUT_S + 0.5:g} s, nginx's fail_timeout, "
            f"before the next): {steps}.",
        ]
    return lines


SECTION = "## 9. A fleet: 3 replicas behind nginx, checkpoints from S3 (moto)"


def append_results(path: Path, d: dict[str, Any]) -> None:
    """run.py: the section after the others in RESULTS.md."""
    with open(path, "a") as fh:
        fh.write("\n".join(["", SECTION, "", *report_lines(d), ""]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=len(KINDS), help="uploads (default 10, 4 of them invalid)")
    parser.add_argument("--no-restart", action="store_true", help="skip the rolling restart")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/fleet.md")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (fleet config, logs)")
    args = parser.parse_args(argv)
    from reloader.hardware import Hardware

    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S %Z"), time.monotonic()
    load_start = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    tmp = Path(tempfile.mkdtemp(prefix="reloader-bench-fleet-"))
    _log(f"working in {tmp}")
    try:
        d = measure(tmp, uploads=args.uploads, restart=not args.no_restart)
        hw = Hardware.detect()
        header = [
            "# reloader benchmark: the fleet section alone",
            "",
            f"- Date: {started}; took {(time.monotonic() - t0) / 60:.1f} min. Command: `python -m bench.fleet "
            + " ".join(argv if argv is not None else sys.argv[1:])
            + "`. The figures of record come from a full `make bench` run (bench/RESULTS.md, section 9).",
            f"- Machine: {os.cpu_count()} cores, {hw.cpu_model}; load average {load_start} at the start and "
            f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])} at the end.",
            f"- CPU flags: {' '.join(sorted(hw.cpu_flags))}",
            f"- Versions: python {sys.version.split()[0]}, torch {torch.__version__}, "
            + ", ".join(f"{k} {v}" for k, v in d["versions"].items())
            + ".",
            "",
            SECTION,
            "",
        ]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join([*header, *report_lines(d), ""]))
        _log(f"wrote {args.out}")
    finally:
        if args.keep:
            _log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
