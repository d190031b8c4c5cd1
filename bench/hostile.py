"""`make hostile`: one daemon, and each hostile input of issue #13 thrown at it in turn.

For each case: the daemon's answer (an HTTP status, or a dropped file's status in `GET /models/<name>`,
or the exit code of `reloader validate` for a config), the wall time it took to answer or judge, the
daemon's peak RSS above what it held just before the case (VmRSS sampled every 10 ms, and VmHWM reset
before the case), and whether a normal predict still answers 200 from the same checkpoint afterwards.
The "before" column is what the issue measured on the old code; this script measures "after".

    python -m bench.hostile     # about 3 minutes; the results go to bench/HOSTILE.md and HOSTILE.json
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image

from reloader.config import ServerConfig
from reloader.files import shown
from reloader.hardware import Hardware

from .servers import Server, git_state, reset_peak, server_env, status_kib
from .servers import reloader as reloader_server

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from tests.tinynet import colour_state_dict  # noqa: E402

MODEL = "colours"
MIB = 1024
MAX_BODY = 4_000_000  # 16 solid 6000x6000 PNGs in base64 are about 2.6 MB
MAX_CKPT = 1_500_000_000  # above the 1 GB safetensors file, so that one is read; the "over" case is above this
QUEUE = 16  # batch.queue_size: the v2 case's 16 images fit; the second decode flood does not
READ_TIMEOUT_S = 5.0  # set where the config knows server.read_timeout_s
MAX_CONNECTIONS = 64  # set where the config knows server.max_connections
RSS_CAP_KIB = 8 << 20  # a daemon past 8 GiB is killed (and started again) so that the machine survives the case
CLI_RSS_CAP_KIB = 4 << 20
SLOW_CASE_S = 40.0
RED = (200, 30, 30)


# -- inputs --------------------------------------------------------------------------------------------


def png(size: tuple[int, int], colour: tuple[int, int, int] = RED, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int) -> bytes:
    """A complete greyscale PNG of side x side black pixels, built row by row (never whole in memory)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    compressor = zlib.compressobj(9)
    rows = (b"\0" + bytes(side)) * 500
    idat = b"".join(compressor.compress(rows) for _ in range(side // 500)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def torch_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    return buf.getvalue()


def zip_bomb(valid: bytes, member_bytes: int = 3 << 30) -> bytes:
    """A torch.save file whose first storage record is `member_bytes` of zeros, deflated (about 3 MB)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(valid)) as src, zipfile.ZipFile(out, "w") as dst:
        names = src.namelist()
        target = next(n for n in names if n.endswith("/data/0"))
        for name in names:
            if name != target:
                dst.writestr(src.getinfo(name), src.read(name))
                continue
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with dst.open(info, "w", force_zip64=True) as fh:
                zeros = bytes(1 << 20)
                for _ in range(member_bytes >> 20):
                    fh.write(zeros)
    return out.getvalue()


def write_big_safetensors(path: Path, state_dict: dict[str, torch.Tensor], extra_bytes: int) -> None:
    """A valid safetensors file: the model's tensors plus an 'extra' F32 tensor of `extra_bytes` zeros,
    written sparse (the zeros are a hole: the file reads as ~1 GB without taking the disk)."""
    header: dict[str, Any] = {}
    blobs, offset = [], 0
    for name, tensor in state_dict.items():
        data = tensor.contiguous().numpy().tobytes()
        dtype = {torch.float32: "F32", torch.int64: "I64"}[tensor.dtype]
        header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["extra"] = {"dtype": "F32", "shape": [extra_bytes // 4], "data_offsets": [offset, offset + extra_bytes]}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))
        fh.truncate(8 + len(head) + offset + extra_bytes)


# -- the daemon ----------------------------------------------------------------------------------------


def server_keys() -> dict[str, Any]:
    """What the config's server section sets; read_timeout_s only where this version knows it."""
    keys: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "default_model": MODEL,
        "access_log": False,
        "max_body_bytes": MAX_BODY,
    }
    if "read_timeout_s" in ServerConfig.model_fields:
        keys["read_timeout_s"] = READ_TIMEOUT_S
    if "max_connections" in ServerConfig.model_fields:
        keys["max_connections"] = MAX_CONNECTIONS
    return keys


def limits() -> dict[str, Any]:
    """The server limits in effect (ours, and this version's defaults for the rest)."""
    fields = ServerConfig.model_fields
    known = {k: fields[k].default for k in ("read_timeout_s", "max_connections", "request_timeout_s") if k in fields}
    return {**known, **server_keys(), "queue_size": QUEUE, "max_checkpoint_bytes": MAX_CKPT}


def model_yaml(folder: Path, golden: Path, *, labels: str = "[red, green, blue]", preprocess: str = "") -> str:
    images = ", ".join(str(golden / f"{c}.png") for c in ("red", "green", "blue"))
    return (
        "models:\n"
        f"  {MODEL}:\n"
        "    arch: tests.tinynet:colour_net\n"
        "    num_classes: 3\n"
        f"    labels: {labels}\n"
        f"    checkpoints: {folder}\n"
        f"{preprocess}"
        f"    max_checkpoint_bytes: {MAX_CKPT}\n"
        f"    batch: {{max_size: 8, queue_size: {QUEUE}}}\n"
        f"    warmup: {{images: [{images}], expect: [red, green, blue]}}\n"
    )


def daemon_yaml(folder: Path, golden: Path) -> str:
    server = ", ".join(f"{k}: {v}" for k, v in server_keys().items())
    return f"server: {{{server}}}\nwatch: {{settle_ms: 100}}\n" + model_yaml(folder, golden)


def metrics_counts(base: str) -> Counter[str]:
    """reloader_http_requests_total by status code, summed over models and routes."""
    counts: Counter[str] = Counter()
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("reloader_http_requests_total{") and 'code="' in line:
                code = line.split('code="', 1)[1].split('"', 1)[0]
                counts[code] += int(float(line.rsplit(" ", 1)[1]))
    return counts


class Daemon:
    """The one daemon under test, started again (on a new port) only if a case kills it."""

    def __init__(self, config: Path, log_dir: Path, red: bytes) -> None:
        self.config, self.log_dir, self.red = config, log_dir, red
        self.server: Server | None = None
        self.expected_sha = ""
        self.restarts = 0

    def start(self) -> None:
        self.server = reloader_server(self.config, self.log_dir, "reloader-hostile").__enter__()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    @property
    def base(self) -> str:
        assert self.server is not None
        return self.server.base

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    @property
    def pid(self) -> int:
        assert self.server is not None
        return self.server.pid

    def alive(self) -> bool:
        return self.server is not None and self.server.proc is not None and self.server.proc.poll() is None

    def ensure_alive(self) -> str | None:
        """None if it is running; else how it ended, after starting it again."""
        if self.alive():
            return None
        assert self.server is not None and self.server.proc is not None
        code = self.server.proc.returncode
        self.restarts += 1
        self.start()
        return f"daemon exited ({code}); restarted"

    def log_size(self) -> int:
        assert self.server is not None
        return self.server.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        assert self.server is not None
        with open(self.server.log_path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", "replace")

    def predict(self, data: bytes | None = None, timeout: float = 30.0) -> httpx.Response:
        return httpx.post(
            f"{self.base}/models/{MODEL}/predict",
            content=self.red if data is None else data,
            headers={"content-type": "image/png"},
            timeout=timeout,
        )

    def model(self) -> dict[str, Any]:
        return httpx.get(f"{self.base}/models/{MODEL}", timeout=10).json()

    def serving(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            r = self.predict()
        except httpx.HTTPError as exc:
            return {"ok": False, "detail": f"{type(exc).__name__}: {exc}"}
        sha = r.headers.get("x-model-sha256", "")
        ok = r.status_code == 200 and sha == self.expected_sha
        detail = f"{r.status_code}, {'same' if sha == self.expected_sha else 'OTHER'} sha256"
        return {"ok": ok, "detail": detail, "status": r.status_code, "sha256": sha, "s": time.perf_counter() - t0}


class Sampler:
    """The daemon's RSS every 10 ms (and its VmHWM, reset at the start) during one case."""

    def __init__(self, pid: int, cap_kib: int = RSS_CAP_KIB) -> None:
        self.pid, self.cap_kib = pid, cap_kib
        self.baseline = status_kib(pid, "VmRSS")
        self.hwm_reset = reset_peak(pid)
        self.peak = self.baseline
        self.killed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = status_kib(self.pid, "VmRSS")
            except (OSError, KeyError):
                return
            self.peak = max(self.peak, rss)
            if rss > self.cap_kib and not self.killed:
                self.killed = True
                os.killpg(self.pid, signal.SIGKILL)
            time.sleep(0.01)

    def stop(self) -> int:
        """Peak RSS above the baseline, in KiB."""
        self._stop.set()
        self._thread.join(5)
        if self.hwm_reset:
            try:
                self.peak = max(self.peak, status_kib(self.pid, "VmHWM"))
            except (OSError, KeyError):
                pass
        return self.peak - self.baseline


# -- cases ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    klass: str
    name: str
    before: str
    run: Callable[[], dict[str, Any]]
    timeout_s: float = 60.0
    on_daemon: bool = True  # False: a `reloader validate` run, not a request to the daemon


@dataclass
class Inputs:
    wide: bytes
    tall: bytes
    bomb: bytes
    big: bytes  # 6000x6000, allowed
    valid: bytes  # colours-v1.pt
    newer: bytes  # valid, other weights: the paused writer's
    zip_bomb: bytes


def timed_post(url: str, data: bytes, headers: dict[str, str], timeout: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        r = httpx.post(url, content=data, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        return {"status": 0, "error": f"{type(exc).__name__}", "s": time.perf_counter() - t0}
    out: dict[str, Any] = {"status": r.status_code, "s": time.perf_counter() - t0}
    if r.status_code != 200:
        out["body"] = r.text[:300]
    if "retry-after" in r.headers:
        out["retry_after"] = r.headers["retry-after"]
    return out


def concurrently(calls: list[Callable[[], dict[str, Any]]], timeout: float) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = [{"status": 0, "error": "no answer"} for _ in calls]

    def one(i: int) -> None:
        results[i] = calls[i]()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return results


def statuses(results: list[dict[str, Any]]) -> str:
    counts = Counter(str(r["status"]) for r in results)
    return ", ".join(f"{n}x {code}" for code, n in sorted(counts.items()))


def answer(result: dict[str, Any]) -> str:
    text = str(result["status"]) if result["status"] else result.get("error", "no answer")
    if result.get("body"):
        try:
            text += f" ({json.loads(result['body'])['error'][:140]})"
        except (ValueError, KeyError, TypeError):
            text += f" ({result['body'][:140]!r})"
    return text


def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> dict[str, Any]:
    """Send bytes on a socket; read until the server closes or `timeout` passes."""
    t0 = time.perf_counter()
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        try:
            while chunk := sock.recv(65536):
                received += chunk
            closed = True
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            closed = False
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/") else 0
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    try:
        json.loads(body)
        is_json = True
    except ValueError:
        is_json = False
    return {
        "status": status,
        "content_type": headers.get("content-type", ""),
        "body": body[:200].decode("latin-1"),
        "json": is_json,
        "closed_by_server": closed,
        "s": time.perf_counter() - t0,
    }


def request_cases(d: Daemon, x: Inputs) -> list[Case]:
    predict_url = lambda: f"{d.base}/models/{MODEL}/predict"  # noqa: E731 - the port changes on a restart
    infer_url = lambda: f"{d.base}/v2/models/{MODEL}/infer"  # noqa: E731
    png_headers = {"content-type": "image/png"}

    def one(data: bytes) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            r = timed_post(predict_url(), data, png_headers, 60)
            return {"outcome": answer(r), "time_s": r["s"], **r}

        return run

    def four_wide() -> dict[str, Any]:
        results = concurrently([lambda: timed_post(predict_url(), x.wide, png_headers, 60)] * 4, 60)
        return {"outcome": statuses(results), "time_s": max(r.get("s", 0) for r in results), "results": results}

    def v2_many() -> dict[str, Any]:
        encoded = base64.b64encode(x.big).decode()
        doc = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [16], "data": [encoded] * 16}]}
        body = json.dumps(doc).encode()
        r = timed_post(infer_url(), body, {"content-type": "application/json"}, 90)
        return {"outcome": answer(r), "time_s": r["s"], "body_bytes": len(body), **r}

    def flood(n: int) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            normal: dict[str, Any] = {}

            def later() -> dict[str, Any]:
                time.sleep(0.3)  # once the flood is in
                normal.update(timed_post(predict_url(), d.red, png_headers, 60))
                return normal

            calls = [lambda: timed_post(predict_url(), x.big, png_headers, 60)] * n + [later]
            results = concurrently(calls, 90)[:n]
            retry = sum(1 for r in results if r["status"] == 503 and "retry_after" in r)
            times = sorted(r.get("s", 0.0) for r in results)
            return {
                "outcome": f"flood: {statuses(results)} ({retry} with Retry-After); "
                f"normal request: {normal.get('status', 'no answer')} in {normal.get('s', 0):.2f} s",
                "time_s": normal.get("s"),
                "flood_s": {"min": times[0], "max": times[-1]},
                "normal": normal,
                "results": results,
            }

        return run

    def slow_clients() -> dict[str, Any]:
        dribblers, idlers = 40, 10
        head = b"POST /models/colours/predict HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 4000
        t0 = time.monotonic()
        socks: list[socket.socket] = []
        opened: list[float] = []
        refused = 0
        for _ in range(dribblers + idlers):
            try:
                s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
            except OSError:
                refused += 1
                continue
            s.setblocking(False)
            socks.append(s)
            opened.append(time.monotonic())
        closed_at: dict[int, float] = {}
        answers: Counter[str] = Counter()
        normal: dict[str, Any] = {}
        normal_thread = threading.Thread(
            target=lambda: normal.update(timed_post(predict_url(), d.red, png_headers, 30)), daemon=True
        )
        sent, next_byte = 0, time.monotonic()
        limit = READ_TIMEOUT_S + 10 if "read_timeout_s" in server_keys() else SLOW_CASE_S
        while time.monotonic() - t0 < min(limit, SLOW_CASE_S) and len(closed_at) < len(socks):
            if not normal_thread.is_alive() and not normal and time.monotonic() - t0 > 1.0:
                normal_thread.start()
            if time.monotonic() >= next_byte:
                for i, s in enumerate(socks[:dribblers]):
                    if i not in closed_at and sent < len(head):
                        try:
                            s.send(head[sent : sent + 1])
                        except OSError:
                            closed_at[i] = time.monotonic()
                sent += 1
                next_byte += 0.5
            live = [s for i, s in enumerate(socks) if i not in closed_at]
            readable, _, _ = select.select(live, [], [], 0.05)
            for s in readable:
                i = socks.index(s)
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if data.startswith(b"HTTP/"):
                    answers[data.split(b" ", 2)[1].decode()] += 1
                if not data:
                    closed_at[i] = time.monotonic()
        end = time.monotonic()
        if normal_thread.ident is None:
            normal_thread.start()
        normal_thread.join(30)
        for s in socks:
            s.close()
        open_s = [closed_at.get(i, end) - opened[i] for i in range(len(socks))]
        closed_dribblers = sum(1 for i in closed_at if i < dribblers)
        closed_idle = sum(1 for i in closed_at if i >= dribblers)
        outcome = (
            f"closed by server: {closed_dribblers}/{dribblers} dribbling, {closed_idle}/{idlers} idle "
            f"(open at most {max(open_s):.1f} s; case ran {end - t0:.0f} s)"
            + (f"; answers sent: {dict(answers)}" if answers else "")
            + (f"; {refused} refused at connect" if refused else "")
            + f"; normal request: {normal.get('status', 'no answer')} in {normal.get('s', 0):.2f} s"
        )
        return {
            "outcome": outcome,
            "time_s": normal.get("s"),
            "closed_dribblers": closed_dribblers,
            "closed_idle": closed_idle,
            "max_open_s": max(open_s),
            "answers": dict(answers),
            "normal": normal,
        }

    def connection_cap() -> dict[str, Any]:
        """More silent connections than max_connections; then when does a normal request get in again?"""
        cap = server_keys().get("max_connections")
        n = (cap or MAX_CONNECTIONS) + 6
        t0 = time.monotonic()
        socks = []
        for _ in range(n):
            try:
                socks.append(socket.create_connection(("127.0.0.1", d.port), timeout=5))
            except OSError:
                pass
        time.sleep(0.5)
        answers: Counter[str] = Counter()
        for s in socks:
            s.setblocking(False)
            try:
                data = s.recv(65536)
                answers[data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "closed"] += 1
            except BlockingIOError:
                answers["open"] += 1
            except OSError:
                answers["reset"] += 1
        first = timed_post(predict_url(), d.red, png_headers, 10)
        back: float | None = None
        while time.monotonic() - t0 < 25:
            r = timed_post(predict_url(), d.red, png_headers, 10)
            if r["status"] == 200:
                back = time.monotonic() - t0
                break
            time.sleep(0.25)
        for s in socks:
            s.close()
        outcome = f"{len(socks)} connected; after 0.5 s: {dict(answers)}; normal request at once: {answer(first)}; " + (
            f"a normal request answered 200 again {back:.1f} s after the flood" if back else "no 200 within 25 s"
        )
        return {"outcome": outcome, "time_s": back, "answers": dict(answers), "first": first}

    def over_limit() -> dict[str, Any]:
        size = 16_000_000
        request = urllib.request.Request(predict_url(), data=b"\0" * size, headers=png_headers)
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                outcome = f"{response.status} (expected 413)"
        except urllib.error.HTTPError as exc:
            body = exc.read()[:200].decode("utf-8", "replace")
            outcome = f"urllib read the {exc.code}: {body}"
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            outcome = f"no answer read: {type(reason).__name__}: {reason}"
        return {"outcome": outcome, "time_s": time.perf_counter() - t0, "body_bytes": size}

    def hang_up() -> dict[str, Any]:
        before = metrics_counts(d.base)
        offset = d.log_size()
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
            head = f"POST /models/{MODEL}/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            sock.sendall(f"{head}Content-Length: 1000000\r\n\r\n".encode() + b"\x89PNG" + bytes(500_000 - 4))
        counted, after = 0.0, before
        while time.perf_counter() - t0 < 10:
            after = metrics_counts(d.base)
            if any(after[c] != before[c] for c in after if c != "200"):  # 200s: the scrapes themselves
                counted = time.perf_counter() - t0
                break
            time.sleep(0.05)
        delta = {code: after[code] - before[code] for code in after if after[code] != before[code]}
        delta.pop("200", None)  # the /metrics scrapes themselves
        log = d.log_since(offset)
        tracebacks = log.count("Traceback") + log.count("unhandled error")
        outcome = f"metrics: {delta or 'nothing counted'}; tracebacks in the log: {tracebacks}"
        return {"outcome": outcome, "time_s": counted or None, "metrics_delta": delta, "tracebacks": tracebacks}

    def header_length() -> dict[str, Any]:
        headers = {"content-type": "application/json", "Inference-Header-Content-Length": "9" * 5000}
        r = timed_post(infer_url(), b'{"inputs": []}', headers, 30)
        return {"outcome": answer(r), "time_s": r["s"], **r}

    def raw(data: bytes) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            r = raw_exchange(d.port, data)
            what = "JSON" if r["json"] else f"not JSON ({r['content_type'] or 'no content-type'}: {r['body'][:60]!r})"
            closed = "closed" if r["closed_by_server"] else "left open"
            return {"outcome": f"{r['status'] or 'no status'}, body {what}, connection {closed}", "time_s": r["s"], **r}

        return run

    return [
        Case("1 extreme shape", f"PNG 100000x1 ({len(x.wide)} B)", "~2 GB, 8 s", one(x.wide)),
        Case("1 extreme shape", f"PNG 1x1000000 ({len(x.tall)} B)", "needs ~15 GB", one(x.tall)),
        Case("1 extreme shape", "4x PNG 100000x1 at once", "5 GB", four_wide),
        Case("2 pixel limit", f"PNG declaring 20000x20000 ({len(x.bomb) // 1000} KB)", "n/a", one(x.bomb)),
        Case("3 v2 many images", "reference: one 6000x6000 PNG to /predict", "-", one(x.big)),
        Case("3 v2 many images", "v2 infer, 16x 6000x6000 PNG (576 MP in all)", "not measured", v2_many, 120),
        Case("4 decode flood", "8 concurrent 6000x6000 + 1 normal", "not measured", flood(8), 120),
        Case("4 decode flood", f"24 concurrent 6000x6000 (queue_size {QUEUE}) + 1 normal", "not measured", flood(24)),
        Case("5 slow clients", "40 dribbling 1 B/0.5 s + 10 silent; 1 normal", "not measured", slow_clients, 75),
        Case(
            "5 slow clients",
            f"{MAX_CONNECTIONS + 6} silent connections (max_connections {MAX_CONNECTIONS} where known)",
            "not measured",
            connection_cap,
            60,
        ),
        Case("6 body over limit", f"urllib POST 16 MB, max_body_bytes {MAX_BODY}", "connection reset", over_limit),
        Case("7 client hang-up", "Content-Length 1 MB, 500 KB sent, closed", "unhandled error, counted 500", hang_up),
        Case("8 v2 header length", "Inference-Header-Content-Length of 5000 digits", "500", header_length),
        Case(
            "9 malformed HTTP",
            "GET / with Content-Length: abc",
            "plain text",
            raw(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"),
        ),
        Case("9 malformed HTTP", "\\x00garbage request line", "plain text", raw(b"\x00garbage\r\n\r\n")),
    ]


def file_cases(d: Daemon, x: Inputs, folder: Path) -> list[Case]:
    def judged(
        path: Path | bytes, create: Callable[[], object], timeout: float = 60.0
    ) -> tuple[dict[str, Any] | None, float | None, list[str]]:
        """create() the file, then poll the listing until it has a verdict: (its entry, or the event naming
        it where the listing does not, or None; seconds from its arrival; the statuses seen on the way)."""
        name = shown(os.fsdecode(path))
        passes = d.model()["passes"]
        create()
        t0 = time.perf_counter()
        seen: list[str] = []
        entry = None
        while time.perf_counter() - t0 < timeout:
            model = d.model()
            entry = next((f for f in model["files"] if f["path"] == name), None)
            if entry is not None:
                if entry["status"] not in seen:
                    seen.append(entry["status"])
                if entry["status"] in ("rejected", "live"):
                    return entry, time.perf_counter() - t0, seen
            elif model["passes"] > passes and not model["reloading"] and time.perf_counter() - t0 > 2.0:
                event = next((e for e in model["events"] if e.get("file") == name), None)
                return event, time.perf_counter() - t0, seen
            time.sleep(0.02)
        return entry, None, seen

    def remove(path: Path | bytes) -> None:
        with_passes = d.model()["passes"]
        os.unlink(path)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 10:  # the listing settles before the next case
            model = d.model()
            if model["passes"] > with_passes and not model["reloading"]:
                return
            time.sleep(0.05)

    def verdict(entry: dict[str, Any] | None, seen: list[str]) -> str:
        if entry is None:
            return "not listed, no event (ignored)"
        status = entry.get("status") or entry.get("result")
        reason = (entry.get("reason") or "")[:160]
        path = entry.get("path") or entry.get("file")
        via = f" (seen: {' -> '.join(seen)})" if len(seen) > 1 else ""
        return f"{status}{': ' + reason if reason else ''}{via} [listed as {path!r}]"

    def drop(name: str | bytes, data: bytes) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            path = os.path.join(os.fsencode(folder), os.fsencode(name))
            staging = os.path.join(os.fsencode(folder.parent), b".staging")
            with open(staging, "wb") as fh:
                fh.write(data)
            entry, seconds, seen = judged(path, lambda: os.replace(staging, path))
            out = {"outcome": verdict(entry, seen), "time_s": seconds, "entry": entry}
            models = httpx.get(f"{d.base}/models", timeout=10)
            out["get_models"] = models.status_code
            if models.status_code != 200:
                out["outcome"] += f"; GET /models {models.status_code}"
            remove(path)
            return out

        return run

    def symlink() -> dict[str, Any]:
        path = folder / "colours-v2.pt"
        entry, seconds, seen = judged(path, lambda: path.symlink_to("/dev/zero"), timeout=15)
        model = d.model()
        out = {"outcome": verdict(entry, seen), "time_s": seconds, "entry": entry}
        out["outcome"] += f"; worker reloading afterwards: {model['reloading']}"
        remove(path)
        return out

    def zip_bomb_case() -> dict[str, Any]:
        return drop("colours-v3.pt", x.zip_bomb)()

    def safetensors() -> dict[str, Any]:
        path = folder / "colours-v4.safetensors"
        staging = folder.parent / ".colours-v4.safetensors"
        write_big_safetensors(staging, colour_state_dict(), 1 << 30)
        entry, seconds, seen = judged(path, lambda: os.replace(staging, path))
        out = {"outcome": verdict(entry, seen), "time_s": seconds, "entry": entry, "bytes": path.stat().st_size}
        remove(path)
        return out

    def newline() -> dict[str, Any]:
        offset = d.log_size()
        out = drop("colours-v6\nINFO forged line.pt", b"not a checkpoint")()
        forged = [line for line in d.log_since(offset).splitlines() if line.startswith("INFO forged")]
        out["outcome"] += f"; forged log lines: {len(forged)}"
        out["forged"] = forged
        return out

    def over_max() -> dict[str, Any]:
        path = folder / "colours-v7.pt"
        staging = folder.parent / ".colours-v7.pt"
        with open(staging, "wb") as fh:
            fh.write(x.valid)
            fh.truncate(MAX_CKPT + 100_000_000)  # sparse: the size is what counts
        entry, seconds, seen = judged(path, lambda: os.replace(staging, path))
        out = {"outcome": verdict(entry, seen), "time_s": seconds, "entry": entry}
        remove(path)
        return out

    def paused_writer() -> dict[str, Any]:
        path = folder / "colours-v8.pt"
        seen_while_paused: list[str] = []
        name = shown(path)
        with open(path, "wb") as fh:
            fh.write(x.newer[: len(x.newer) // 2])
            fh.flush()
            pause_end = time.perf_counter() + 3.5
            while time.perf_counter() < pause_end:
                entry = next((f for f in d.model()["files"] if f["path"] == name), None)
                if entry is not None and entry["status"] not in seen_while_paused:
                    seen_while_paused.append(entry["status"])
                time.sleep(0.05)
            fh.write(x.newer[len(x.newer) // 2 :])
        entry, seconds, seen = judged(path, lambda: None)  # timed from the close
        if entry is not None and entry.get("status") == "live":
            d.expected_sha = hashlib.sha256(x.newer).hexdigest()  # a good file that went live: the new answer
        paused = " -> ".join(seen_while_paused) or "not listed"
        outcome = f"while paused: {paused}; after close: {verdict(entry, seen)}"
        return {"outcome": outcome, "time_s": seconds, "entry": entry, "while_paused": seen_while_paused}

    return [
        Case("10 files", "symlink colours-v2.pt -> /dev/zero", "reload thread hung at 100% CPU for good", symlink),
        Case(
            "10 files",
            f"zip bomb .pt: {len(x.zip_bomb) / 1e6:.1f} MB, one 3 GiB deflated member",
            "peak 4 GB before rejection",
            zip_bomb_case,
            90,
        ),
        Case(
            "10 files",
            "1 GiB .safetensors (valid; an extra 1 GiB tensor, sparse file)",
            "read whole into memory: a 2 GB file cost 4 GB",
            safetensors,
            90,
        ),
        Case("10 files", "name not UTF-8 (colours-v5\\xff.pt)", "500", drop(b"colours-v5\xff.pt", b"not a checkpoint")),
        Case("10 files", "name with a newline", "forged log line", newline),
        Case("10 files", f"file over max_checkpoint_bytes ({MAX_CKPT}; sparse)", "not measured", over_max),
        Case(
            "10 files",
            "writer pauses 3.5 s mid-write, file open (valid weights)",
            "half-written file validated and rejected",
            paused_writer,
        ),
    ]


def _python_pid(pid: int, wrapped: bool) -> int | None:
    """The validating Python process: `pid` itself, or the child of /usr/bin/time."""
    if not wrapped:
        return pid
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def run_cli(config: Path, checkpoint: Path, timeout: float = 60.0) -> dict[str, Any]:
    """`reloader validate` on one config: exit code, seconds, its own peak RSS, and its first line of output.

    The peak is /usr/bin/time's (its child's ru_maxrss): this process's own wait4 would report at least the
    RSS of this process, which the child had when forked. Without /usr/bin/time, VmHWM sampled every 10 ms."""
    argv = [sys.executable, "-m", "reloader.cli", "validate", "--config", str(config), str(checkpoint)]
    wrapped = Path("/usr/bin/time").exists()
    with tempfile.TemporaryFile() as out, tempfile.NamedTemporaryFile("r") as timed:
        if wrapped:
            argv = ["/usr/bin/time", "-f", "%M", "-o", timed.name, *argv]
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=server_env(), cwd=ROOT, start_new_session=True
        )
        killed, hwm = "", 0
        while proc.poll() is None:
            child = _python_pid(proc.pid, wrapped)
            try:
                if child is not None:
                    hwm = max(hwm, status_kib(child, "VmHWM"))
                    if status_kib(child, "VmRSS") > CLI_RSS_CAP_KIB:
                        killed = f"killed over {CLI_RSS_CAP_KIB >> 20} GiB"
            except (OSError, KeyError):
                pass
            if time.perf_counter() - t0 > timeout:
                killed = f"killed after {timeout:.0f} s"
            if killed:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.01)
        seconds = time.perf_counter() - t0
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
        reported = [line for line in timed.read().splitlines() if line.strip().isdigit()]
    peak = int(reported[-1]) if reported else hwm
    lines = [line for line in text.splitlines() if line.strip()]
    first = next((line for line in lines if "error" in line.lower()), lines[0] if lines else "")
    return {
        "exit": proc.returncode,
        "killed": killed,
        "s": seconds,
        "maxrss_kib": peak,
        "peak_from": "/usr/bin/time" if reported else "VmHWM sampled",
        "first_line": first[:300],
        "first_line_chars": len(first),
        "output_bytes": len(text),
    }


def config_cases(tmp: Path, golden: Path, checkpoint: Path) -> tuple[list[Case], dict[str, Any]]:
    folder = tmp / "cli-checkpoints"
    folder.mkdir()
    server = "server: {host: 127.0.0.1, port: 0, default_model: colours}\n"
    good = server + model_yaml(folder, golden)
    laughs = ["lol0: &lol0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    laughs += [f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * 10)}]" for i in range(1, 10)]
    variants = {
        "billion laughs: labels are 10^9 leaves through 90 aliases": "\n".join(laughs)
        + "\n"
        + server
        + model_yaml(folder, golden, labels="*lol9"),
        "labels: /dev/zero": server + model_yaml(folder, golden, labels="/dev/zero"),
        "preprocess.resize: 100000": server
        + model_yaml(folder, golden, preprocess="    preprocess: {resize: 100000, crop: 224}\n"),
        "watch.config_debounce_ms: 1000000000": server
        + "watch: {config_debounce_ms: 1000000000}\n"
        + good[len(server) :],
        "models: {}": server + "models: {}\n",
        "duplicate key (port twice)": server.replace("port: 0", "port: 0, port: 1") + model_yaml(folder, golden),
    }
    before = {
        "billion laughs: labels are 10^9 leaves through 90 aliases": "11.6 GB and a 2 GB log line",
        "labels: /dev/zero": "reads forever",
        "preprocess.resize: 100000": "OOM",
        "watch.config_debounce_ms: 1000000000": "silently accepted",
        "models: {}": "silently accepted",
        "duplicate key (port twice)": "silently accepted",
    }
    (tmp / "cli-good.yaml").write_text(good)
    baseline = run_cli(tmp / "cli-good.yaml", checkpoint)

    def case(text: str) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            path = tmp / f"cli-{hashlib.sha256(text.encode()).hexdigest()[:8]}.yaml"
            path.write_text(text)
            r = run_cli(path, checkpoint)
            outcome = f"exit {r['exit']}" + (f" ({r['killed']})" if r["killed"] else "") + f": {r['first_line'][:200]}"
            if r["first_line_chars"] > 200:
                outcome += f"... ({r['first_line_chars']} chars)"
            return {"outcome": outcome, "time_s": r["s"], "rss_kib": r["maxrss_kib"] - baseline["maxrss_kib"], **r}

        return run

    cases = [Case("11 config", name, before[name], case(text), 90, on_daemon=False) for name, text in variants.items()]
    return cases, baseline


def run_case(d: Daemon, case: Case) -> dict[str, Any]:
    print(f"[hostile] {case.klass}: {case.name}", file=sys.stderr, flush=True)
    row: dict[str, Any] = {"class": case.klass, "case": case.name, "before": case.before}
    sampler = Sampler(d.pid) if case.on_daemon else None
    before_codes = metrics_counts(d.base) if case.on_daemon else Counter()
    offset = d.log_size() if case.on_daemon else 0
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result.update(case.run())
        except Exception as exc:  # noqa: BLE001 - recorded as the case's outcome
            result.update({"outcome": f"bench error: {type(exc).__name__}: {exc}", "time_s": None})

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(case.timeout_s)
    if thread.is_alive():
        result = {"outcome": f"HANG: no outcome within {case.timeout_s:.0f} s", "time_s": None}
    row.update(result)
    if sampler is not None:
        row["rss_kib"] = sampler.stop()
        row["baseline_rss_kib"] = sampler.baseline
        if sampler.killed:
            row["outcome"] += f"; daemon KILLED by the bench past {RSS_CAP_KIB >> 20} GiB RSS"
    if case.on_daemon:
        died = d.ensure_alive()
        if died:
            row["outcome"] += f"; {died}"
            row["serving"] = {"ok": False, "detail": died}
        else:
            row["serving"] = d.serving()
            log = d.log_since(offset)
            row["tracebacks"] = log.count("Traceback") + log.count("unhandled error")
            if row["tracebacks"]:
                row["log"] = log[-4000:]
            after = metrics_counts(d.base)
            row["5xx"] = {
                c: after[c] - before_codes[c] for c in after if c.startswith("5") and after[c] > before_codes[c]
            }
    print(f"[hostile]   -> {row['outcome'][:200]}", file=sys.stderr, flush=True)
    return row


# -- the run and the report ----------------------------------------------------------------------------


def hostile(out: Path) -> dict[str, Any]:
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_start = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="reloader-hostile-"))
    golden = tmp / "golden"
    golden.mkdir()
    for colour, rgb in {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}.items():
        (golden / f"{colour}.png").write_bytes(png((40, 40), rgb))
    folder = tmp / "checkpoints"
    folder.mkdir()
    valid = torch_bytes(colour_state_dict())
    print("[hostile] building the inputs (the zip bomb takes ~10 s)", file=sys.stderr, flush=True)
    x = Inputs(
        wide=png((100_000, 1), mode="L"),
        tall=png((1, 1_000_000), mode="L"),
        bomb=png_bomb(20_000),
        big=png((6000, 6000)),
        valid=valid,
        newer=torch_bytes(colour_state_dict(scale=5.0)),
        zip_bomb=zip_bomb(valid),
    )
    (folder / "colours-v1.pt").write_bytes(valid)
    (tmp / "good.pt").write_bytes(valid)
    config = tmp / "models.yaml"
    config.write_text(daemon_yaml(folder, golden))
    d = Daemon(config, tmp, png((40, 40), (230, 20, 20)))
    d.expected_sha = hashlib.sha256(valid).hexdigest()
    rows: list[dict[str, Any]] = []
    d.start()
    try:
        for _ in range(5):
            d.predict()  # warm: the first requests grow the pools to their working size
        idle_rss = status_kib(d.pid, "VmRSS")
        for case in [*request_cases(d, x), *file_cases(d, x, folder)]:
            rows.append(run_case(d, case))
        cli_cases, cli_baseline = config_cases(tmp, golden, tmp / "good.pt")
        for case in cli_cases:
            rows.append(run_case(d, case))
        end_rss = status_kib(d.pid, "VmRSS")
    finally:
        d.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "started": started,
        "load_start": load_start,
        "load_end": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "cpu": Hardware.detect().cpu_model,
        "flags": " ".join(sorted(Hardware.detect().cpu_flags)),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "git": git_state(),
        "limits": limits(),
        "duration_s": time.monotonic() - t_start,
        "daemon_idle_rss_kib": idle_rss,
        "daemon_end_rss_kib": end_rss,
        "daemon_restarts": d.restarts,
        "cli_baseline": cli_baseline,
        "rows": rows,
    }
    _report(result, out)
    return result


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", "\\n")


def _report(r: dict[str, Any], out: Path) -> None:
    lim = r["limits"]
    lines = [
        "# Hostile inputs (`make hostile`, issue #13)",
        "",
        f"- Date: {r['started']}; {r['duration_s']:.0f} s in all; load average {r['load_start']} at the start, "
        f"{r['load_end']} at the end.",
        f"- Machine: {r['cores']} cores, {r['cpu']}; torch {r['torch']}; code at {r['git']}.",
        f"- CPU flags: {r['flags']}",
        "- One daemon (arch tests.tinynet:colour_net, preprocess resize 256 / crop 224); limits: "
        + ", ".join(f"{k} {v}" for k, v in lim.items() if k not in ("host", "port", "default_model", "access_log"))
        + ".",
        f"- Daemon RSS: {r['daemon_idle_rss_kib'] / MIB:.0f} MiB warm before the first case, "
        f"{r['daemon_end_rss_kib'] / MIB:.0f} MiB after the last; restarts: {r['daemon_restarts']}.",
        "- Time: for requests, until the answer; for files, from the file's arrival until its status shows in "
        "`GET /models/colours` (watch.settle_ms is 100); for configs, the whole `reloader validate` run.",
        "- Peak RSS: the daemon's (VmRSS every 10 ms, and VmHWM reset before the case) above its RSS just "
        "before the case. For configs: `reloader validate`'s own peak (/usr/bin/time's max RSS) above that of a run "
        f"on a good config ({r['cli_baseline']['maxrss_kib'] / MIB:.0f} MiB, {r['cli_baseline']['s']:.1f} s, "
        f"exit {r['cli_baseline']['exit']}).",
        "- Model still serving: after the case, POST /predict answers 200 from the expected checkpoint "
        "(X-Model-Sha256); after the paused writer, that is the writer's file, which went live.",
        "",
        "| class | case | before (from the issue) | after: status/outcome | after: time | "
        "after: peak RSS above baseline | model still serving | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        t = row.get("time_s")
        seconds = "-" if t is None else f"{t:.2f} s"
        rss = row.get("rss_kib")
        peak = "-" if rss is None else f"{rss / MIB:+.0f} MiB"
        if "maxrss_kib" in row:
            peak += f" (own peak {row['maxrss_kib'] / MIB:.0f} MiB)"
        serving = row.get("serving")
        alive = "n/a (CLI)" if serving is None else ("yes" if serving["ok"] else f"**NO**: {serving['detail']}")
        notes = []
        if row.get("5xx"):
            notes.append(f"5xx counted: {row['5xx']}")
        if row.get("tracebacks"):
            notes.append(f"{row['tracebacks']} traceback(s) in the log")
        cells = [row["class"], row["case"], row["before"], row["outcome"], seconds, peak, alive, "; ".join(notes)]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines.append("")
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(r, indent=2, default=str))


def main() -> int:
    result = hostile(HERE / "HOSTILE.md")
    print((HERE / "HOSTILE.md").read_text())
    bad = [row for row in result["rows"] if row.get("serving") is not None and not row["serving"]["ok"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
