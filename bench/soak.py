"""`make soak`: one daemon under steady c=8 load for SOAK_S seconds (default 1800) while its files churn.

Every 2.5 s (720 steps in 30 min, about 540 of them checkpoints landing) something lands in the
checkpoints folder: a valid checkpoint, or one of each bad kind the hostile-input issue names
(truncated, garbage, NaN weights, wrong shapes, wrong answers, a pickle that would run code, a symlink
to /dev/zero, a name that is not UTF-8, a name with a newline, a file over max_checkpoint_bytes, a
writer that pauses mid-file); now and then the live file is deleted, the config is edited (well, then
badly, then well again), or a storm of SIGHUPs arrives. The daemon's answers carry X-Model-Sha256:
none may come from a bad file. RSS, threads and open files are read from /proc a tenth of the way in
(the baseline) and after the churn stops.

    SOAK_S=300 python -m bench.soak     # a shorter run; the results go to bench/SOAK.md
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import torch

from reloader.hardware import Hardware

from .servers import reloader as reloader_server
from .servers import status_kib

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
CONCURRENCY = 8
EVERY_S = 2.5  # 720 steps in 30 minutes: about 540 checkpoints land (good and bad), the rest are other churn
SETTLE_S = 20.0
MAX_BYTES = 200_000_000
BAD_KINDS = (
    "truncated",
    "garbage",
    "nan",
    "wrong_shapes",
    "wrong_answers",
    "code_pickle",
    "symlink_dev_zero",
    "non_utf8_name",
    "newline_name",
    "over_max_bytes",
    "paused_writer",
)


class _Evil:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, ("touch /tmp/reloader-soak-pwned",))


def _trained() -> dict[str, torch.Tensor]:
    found = sorted((ROOT / "checkpoints" / "shapes").glob("shapes-epoch*.pt"))
    if not found:
        raise SystemExit("no demo checkpoint: run `make run` once, or `python -m examples.shapes.train --epochs 1`")
    return torch.load(found[-1], map_location="cpu", weights_only=True)


def _bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _valid(base: dict[str, torch.Tensor], i: int) -> bytes:
    out = dict(base)
    out["fc.bias"] = base["fc.bias"] + 1e-4 * i  # another sha256, the same answers
    return _bytes(out)


def _bad(kind: str, base: dict[str, torch.Tensor]) -> bytes:
    good = _bytes(base)
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "garbage":
        return os.urandom(4096)
    if kind == "nan":
        out = dict(base)
        out["layer1.0.conv1.weight"] = torch.full_like(base["layer1.0.conv1.weight"], float("nan"))
        return _bytes(out)
    if kind == "wrong_shapes":
        out = dict(base)
        out["fc.weight"] = torch.zeros(7, 512)
        return _bytes(out)
    if kind == "wrong_answers":
        out = dict(base)
        out["fc.weight"], out["fc.bias"] = base["fc.weight"].flip(0), base["fc.bias"].flip(0)
        return _bytes(out)
    if kind == "code_pickle":
        return pickle.dumps({"state_dict": _Evil()})
    if kind == "over_max_bytes":
        return _bytes({"state_dict": base, "padding": torch.zeros(MAX_BYTES // 4 + 1)})
    return good


class _Load:
    """c=8 clients posting the golden images; every answer's status and X-Model-Sha256 is kept."""

    def __init__(self, base: str, images: list[bytes]) -> None:
        self.base, self.images = base, images
        self.stop = threading.Event()
        self.answers: Counter[tuple[int, str]] = Counter()
        self.errors: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CONCURRENCY)]

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.base, timeout=60) as client:
            n = i
            while not self.stop.is_set():
                n += 1
                try:
                    r = client.post("/predict", content=self.images[n % len(self.images)])
                    key = (r.status_code, r.headers.get("x-model-sha256", ""))
                except httpx.HTTPError as exc:
                    key = (0, type(exc).__name__)
                with self._lock:
                    self.answers[key] += 1

    def __enter__(self) -> _Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def _proc(pid: int) -> dict[str, float]:
    threads = int(next(line.split()[1] for line in open(f"/proc/{pid}/status") if line.startswith("Threads:")))
    return {"rss_kib": status_kib(pid, "VmRSS"), "threads": threads, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def _config(root: Path, folder: Path, wait_ms: int, broken: bool = False) -> str:
    golden = ROOT / "config" / "golden" / "shapes"
    images = ", ".join(str(golden / f"{n}.png") for n in ("circle", "square", "triangle", "star"))
    text = (
        "server: {host: 127.0.0.1, port: 0, default_model: shapes, access_log: false, request_timeout_s: 60}\n"
        "watch: {settle_ms: 300}\n"
        "models:\n  shapes:\n    arch: resnet18\n    num_classes: 4\n    labels: [circle, square, triangle, star]\n"
        f"    checkpoints: {folder}\n    preprocess: {{resize: 72, crop: 64}}\n"
        f"    max_checkpoint_bytes: {MAX_BYTES}\n"
        f"    batch: {{max_size: 8, max_wait_ms: {wait_ms}, queue_size: 64}}\n"
        f"    warmup:\n      images: [{images}]\n"
        "      expect: [circle, square, triangle, star]\n"
    )
    return text.replace("num_classes: 4", "num_classes: -4") if broken else text


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def soak(duration_s: float, out: Path) -> dict[str, Any]:
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_start = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    base = _trained()
    tmp = Path(tempfile.mkdtemp(prefix="reloader-soak-"))
    folder = tmp / "checkpoints"
    folder.mkdir()
    (folder / "shapes-v1.pt").write_bytes(_valid(base, 1))
    config = tmp / "models.yaml"
    _write(config, _config(tmp, folder, 2))
    images = [(ROOT / "config" / "golden" / "shapes" / f"{n}.png").read_bytes() for n in ("circle", "star")]
    bad_shas: set[str] = set()
    counts: Counter[str] = Counter()

    with reloader_server(config, tmp, "reloader soak") as server, _Load(server.base, images) as load:
        pid = server.pid
        # The baseline is taken once the churn has run a while (a tenth of the run, 30 s at least): the first
        # swaps grow the allocator's pools and oneDNN's primitive cache to their working size.
        before: dict[str, float] = {}
        rss_samples: list[int] = []
        version, t0, step = 1, time.monotonic(), 0
        end, baseline_at = t0 + duration_s, t0 + max(30.0, duration_s * 0.1)
        while time.monotonic() < end:
            if not before and time.monotonic() >= baseline_at:
                before = _proc(pid)
            step += 1
            tick = time.monotonic()
            if step % 25 == 0:
                _write(config, _config(tmp, folder, 3 if step % 50 else 2))
                counts["config edit (good)"] += 1
            elif step % 25 == 5:
                _write(config, _config(tmp, folder, 2, broken=True))
                counts["config edit (bad)"] += 1
            elif step % 25 == 6:
                _write(config, _config(tmp, folder, 2))
                counts["config edit (good)"] += 1
            elif step % 20 == 10:
                for _ in range(20):
                    os.kill(pid, signal.SIGHUP)
                counts["SIGHUP storm (20)"] += 1
            elif step % 15 == 7:
                live = max(folder.glob("shapes-v*.pt"), key=lambda p: int(p.stem.split("v")[-1]), default=None)
                if live is not None and len(list(folder.glob("shapes-v*.pt"))) > 1:
                    live.unlink()
                    counts["live file deleted"] += 1
            elif step % 3 == 0:
                kind = BAD_KINDS[(step // 3) % len(BAD_KINDS)]
                version += 1
                name = f"shapes-v{version}.pt"
                data = _bad(kind, base)
                # The name kinds and the paused writer carry valid weights: they may go live, under a name
                # that must be shown escaped; only the content kinds must never answer.
                if kind == "symlink_dev_zero":
                    (folder / name).symlink_to("/dev/zero")
                elif kind == "non_utf8_name":
                    (folder / os.fsdecode(b"shapes-\xff-v%d.pt" % version)).write_bytes(data)
                elif kind == "newline_name":
                    (folder / f"shapes-\nforged-v{version}.pt").write_bytes(data)
                elif kind == "paused_writer":
                    # Still open while paused: never judged before its close (its content is valid).
                    with open(folder / name, "wb") as fh:
                        fh.write(data[: len(data) // 2])
                        fh.flush()
                        time.sleep(1.0)
                        fh.write(data[len(data) // 2 :])
                else:
                    tmp_file = folder / f".{name}.tmp"
                    tmp_file.write_bytes(data)
                    os.replace(tmp_file, folder / name)
                    bad_shas.add(hashlib.sha256(data).hexdigest())
                counts[f"bad: {kind}"] += 1
            else:
                version += 1
                data = _valid(base, version)
                tmp_file = folder / f".shapes-v{version}.pt.tmp"
                tmp_file.write_bytes(data)
                os.replace(tmp_file, folder / f"shapes-v{version}.pt")
                counts["valid swap"] += 1
            # Keep the folder small: the oldest files go (as a retention job would).
            files = sorted(folder.glob("shapes-v*.pt"), key=os.path.getmtime)
            for old in files[:-20]:
                old.unlink(missing_ok=True)
            rss_samples.append(status_kib(pid, "VmRSS"))
            time.sleep(max(0.0, EVERY_S - (time.monotonic() - tick)))
        load.stop.set()
        time.sleep(SETTLE_S)  # let the last swap finish and idle threads wind down
        after = _proc(pid)
        with urllib.request.urlopen(f"{server.base}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        swaps = sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("reloader_swaps_total"))
    answers = dict(load.answers)
    failed = sum(n for (code, _), n in answers.items() if code != 200)
    from_bad = sum(n for (code, sha), n in answers.items() if code == 200 and sha in bad_shas)
    result = {
        "started": started,
        "duration_s": duration_s,
        "load_start": load_start,
        "load_end": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "cpu": Hardware.detect().cpu_model,
        "flags": " ".join(sorted(Hardware.detect().cpu_flags)),
        "counts": dict(counts),
        "requests": sum(answers.values()),
        "failed": failed,
        "failures": {f"{code} {sha}": n for (code, sha), n in answers.items() if code != 200},
        "from_bad": from_bad,
        "swaps_metric": swaps,
        "before": before,
        "after": after,
        "rss_drift": after["rss_kib"] / before["rss_kib"] - 1.0,
        "rss_median_kib": statistics.median(rss_samples),
        "pwned": Path("/tmp/reloader-soak-pwned").exists(),
    }
    _report(result, out)
    return result


def _report(r: dict[str, Any], out: Path) -> None:
    b, a = r["before"], r["after"]
    ok = {
        # Without these, a soak where nothing was served or swapped would pass the rest.
        "requests answered, and swaps made": r["requests"] > 0 and r["swaps_metric"] >= 1,
        "0 failed requests": r["failed"] == 0,
        "no answer from a checkpoint that failed its checks": r["from_bad"] == 0,
        "RSS drift at most 5 %": r["rss_drift"] <= 0.05,
        "threads back to the baseline": a["threads"] <= b["threads"],
        "open files back to the baseline": a["fds"] <= b["fds"],
        "no pickle ran code": not r["pwned"],
    }
    lines = [
        "# Soak results (`make soak`)",
        "",
        f"- Date: {r['started']}; {r['duration_s'] / 60:.1f} min under c={CONCURRENCY}; load average "
        f"{r['load_start']} at the start, {r['load_end']} at the end.",
        f"- Machine: {os.cpu_count()} cores, {r['cpu']}.",
        f"- CPU flags: {r['flags']}",
        "",
        "| what happened | times |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in sorted(r["counts"].items())),
        f"| swaps the daemon made (reloader_swaps_total) | {r['swaps_metric']:.0f} |",
        f"| requests answered | {r['requests']} |",
        "",
        "| | start (after warm-up) | end (after the churn, settled) |",
        "|---|---|---|",
        f"| RSS | {b['rss_kib'] / 1024:.0f} MiB | {a['rss_kib'] / 1024:.0f} MiB ({r['rss_drift']:+.1%}) |",
        f"| threads | {b['threads']:.0f} | {a['threads']:.0f} |",
        f"| open files | {b['fds']:.0f} | {a['fds']:.0f} |",
        "",
        "## Targets",
        "",
        *(f"- {name}: **{'PASS' if passed else 'FAIL'}**" for name, passed in ok.items()),
        "",
        f"Failed requests: {r['failures'] or 'none'}. Answers from bad files: {r['from_bad']}.",
        "",
    ]
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(r, indent=2))


def main() -> int:
    duration = float(os.environ.get("SOAK_S", "1800"))
    result = soak(duration, HERE / "SOAK.md")
    print((HERE / "SOAK.md").read_text())
    return 0 if result["failed"] == 0 and result["from_bad"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
