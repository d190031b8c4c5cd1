"""Servers under test: each a subprocess on 127.0.0.1 and a free port, one at a time, stopped with SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent
START_DEADLINE_S = 180.0
STOP_DEADLINE_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env() -> dict[str, str]:
    """The bench's own environment for every server (thread settings included), plus the repo on the path."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def git_state() -> str:
    """The commit the servers run, and whether reloader/ differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        dirty = subprocess.run(["git", "status", "--porcelain", "reloader"], capture_output=True, text=True, cwd=ROOT)
    except OSError:
        return "unknown"
    return head.stdout.strip() + (" with uncommitted changes under reloader/" if dirty.stdout.strip() else "")


def status_kib(pid: int, field: str) -> int:
    """VmRSS or VmHWM of a process, in KiB, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); False where not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


class _KilledAtStart(RuntimeError):
    pass


class Server:
    """`with Server(name, argv) as s:` starts it, waits until `ready_path` answers 200, and stops it after."""

    def __init__(self, name: str, argv: list[str], port: int, log_dir: Path, ready_path: str) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.ready_path = ready_path
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_in_s = 0.0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> Server:
        try:
            return self._start()
        except _KilledAtStart as exc:
            # Not an exit of its own: something else on this shared machine signalled it. Once more.
            print(f"[bench] {exc}; starting it again", file=sys.stderr, flush=True)
            return self._start()

    def _start(self) -> Server:
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            # A session of its own, so SIGTERM reaches LitServe's worker processes too.
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=server_env(), cwd=ROOT, start_new_session=True
            )
        deadline = t0 + START_DEADLINE_S
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                error = _KilledAtStart if code < 0 else RuntimeError
                raise error(f"{self.name} exited with {code} before it was ready; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.base + self.ready_path, timeout=2) as response:
                    if response.status == 200:
                        self.started_in_s = time.monotonic() - t0
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer {self.ready_path} in {START_DEADLINE_S} s; see {self.log_path}")

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Freeze the server's processes (SIGSTOP) so an in-process reading sees none of their idle work:
        LitServe's idle worker loop alone takes a fifth of a core."""
        os.killpg(self.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.killpg(self.pid, signal.SIGCONT)

    def stop(self) -> int | None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return proc.returncode


def reloader(config: Path, log_dir: Path, name: str = "reloader") -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "reloader.cli", "serve", "--config", str(config), "--port", str(port)]
    return Server(name, argv, port, log_dir, "/readyz")


def naive(checkpoint: Path, log_dir: Path) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "bench.peers.naive", "--checkpoint", str(checkpoint), "--port", str(port)]
    return Server("naive", argv, port, log_dir, "/health")


def litserve(checkpoint: Path, log_dir: Path, *, bf16: bool = False) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "bench.peers.litserve_server", "--checkpoint", str(checkpoint), "--port", str(port)]
    return Server(
        "litserve bf16" if bf16 else "litserve", [*argv, *(["--bf16"] if bf16 else [])], port, log_dir, "/health"
    )
