"""Shared fixtures: a tiny deterministic model, its config in tmp_path, and a real daemon on a real socket."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))

from tinynet import COLOURS, colour_state_dict  # noqa: E402

RGB = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}
# Deadlines are generous: CI shares two cores between the daemon, the test and torch's threads.
DEADLINE = 30.0
LISTENING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


def wait_until(predicate: Callable[[], Any], timeout: float = DEADLINE, interval: float = 0.02, what: str = "") -> Any:
    """Poll `predicate` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what or predicate} (last value: {last!r})")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def png_bytes(colour: str, size: int = 40) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (size, size), RGB[colour]).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Project:
    """A config folder with golden images, a checkpoints folder, and helpers to drop checkpoints."""

    root: Path
    config: Path
    checkpoints: Path
    golden: Path

    def save(self, name: str, state_dict: dict | None = None, folder: Path | None = None) -> Path:
        """torch.save a checkpoint atomically (temp file + rename), as a careful trainer does."""
        folder = folder or self.checkpoints
        target = folder / name
        tmp = folder.parent / f".{name}.staging"
        torch.save(colour_state_dict() if state_dict is None else state_dict, tmp)
        os.replace(tmp, target)
        return target

    def stage(self, name: str, state_dict: dict | None = None) -> Path:
        """Write a checkpoint outside the watched folder, for tools to move or copy in."""
        path = self.root / "staging" / name
        path.parent.mkdir(exist_ok=True)
        torch.save(colour_state_dict() if state_dict is None else state_dict, path)
        return path

    def write_config(self, text: str) -> None:
        tmp = self.config.with_name(".models.yaml.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config)


def colours_yaml(
    port: int = 0,
    *,
    extra_model: str = "",
    version: str = "latest",
    expect: bool = True,
    watch: str = "",
    server: str = "",
) -> str:
    expect_line = "      expect: [red, green, blue]\n" if expect else ""
    return (
        f"server:\n  host: 127.0.0.1\n  port: {port}\n  default_model: colours\n{server}"
        f"{watch}"
        "models:\n"
        "  colours:\n"
        "    arch: tinynet:colour_net\n"
        "    num_classes: 3\n"
        "    labels: [red, green, blue]\n"
        "    checkpoints: checkpoints/colours\n"
        f"    version: {version}\n"
        "    preprocess: {resize: 32, crop: 32}\n"
        "    warmup:\n"
        "      images: [golden/red.png, golden/green.png, golden/blue.png]\n"
        f"{expect_line}"
        f"{extra_model}"
    )


@pytest.fixture
def project(tmp_path: Path) -> Project:
    golden = tmp_path / "golden"
    golden.mkdir()
    for colour in COLOURS:
        (golden / f"{colour}.png").write_bytes(png_bytes(colour))
    checkpoints = tmp_path / "checkpoints" / "colours"
    checkpoints.mkdir(parents=True)
    config = tmp_path / "models.yaml"
    config.write_text(colours_yaml())
    return Project(tmp_path, config, checkpoints, golden)


def free_port() -> int:
    """A port free now, for a server that must know its port before it starts (nginx's upstreams, a moto
    restarted on the same endpoint). Another process can take it before that server binds it: a daemon the
    tests start binds port 0 instead, and its log says which port it got (`start_daemon`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    # Two cores: the daemon and the test's own torch must not each spin up a full thread pool.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def reloader_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "reloader.cli", *args]


@dataclass
class Daemon:
    """A `reloader serve` subprocess, on the port it bound when told port 0."""

    proc: subprocess.Popen[str]
    port: int
    log_path: Path
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.url, timeout=DEADLINE)

    def bound_port(self) -> int | None:
        """The port uvicorn's start-up line names (the daemon was told port 0), once it has bound one."""
        found = LISTENING.search(self.log())
        if found and not self.port:
            self.port = int(found[1])
            self.client.base_url = httpx.URL(self.url)
        return self.port or None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text()

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.get(path, **kw)

    def predict(self, colour: str = "red", model: str = "colours", **kw: Any) -> httpx.Response:
        return self.client.post(
            f"/models/{model}/predict", content=png_bytes(colour), headers={"content-type": "image/png"}, **kw
        )

    def status(self, model: str = "colours") -> dict[str, Any]:
        return self.client.get(f"/models/{model}").json()

    def live_sha(self, model: str = "colours") -> str | None:
        live = self.status(model).get("live")
        return live and live["sha256"]

    def wait_live(self, path_or_sha: Path | str, model: str = "colours") -> dict[str, Any]:
        sha = sha256(path_or_sha) if isinstance(path_or_sha, Path) else path_or_sha
        wait_until(lambda: self.live_sha(model) == sha, what=f"{model} to serve {str(path_or_sha)[-40:]}")
        if isinstance(path_or_sha, Path):
            # The swap happens mid-pass; the file list is published when the pass ends.
            self.wait_file(path_or_sha, "live", model)
        return self.status(model)

    def file_status(self, path: Path, model: str = "colours") -> dict[str, Any] | None:
        return next((f for f in self.status(model)["files"] if f["path"] == str(path)), None)

    def wait_file(self, path: Path, status: str, model: str = "colours") -> dict[str, Any]:
        return wait_until(
            lambda: (f := self.file_status(path, model)) is not None and f["status"] == status and f,
            what=f"{path.name} to be {status}",
        )

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.close()
        return self.proc.returncode


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(
        config: Path,
        *args: str,
        ready: bool = True,
        env: dict[str, str] | None = None,
        options: Sequence[str] = (),
        prefix: Sequence[str] = (),
        within: float = DEADLINE,
    ) -> Daemon:
        """`args` go after `serve`, `options` (--log-format) before it; `prefix` wraps the command (strace);
        `within`: how long it may take to answer (its initial load runs first)."""
        log_path = tmp_path / "logs" / f"daemon-{len(started)}.log"
        log_path.parent.mkdir(exist_ok=True)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [*prefix, *reloader_cmd(*options, "serve", "--config", str(config), "--port", "0", *args)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=subprocess_env(**(env or {})),
                text=True,
            )
        daemon = Daemon(proc, 0, log_path)
        started.append(daemon)

        def up() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"daemon exited with {proc.returncode}:\n{daemon.log()}")
            if daemon.bound_port() is None:
                return False
            try:
                response = daemon.get("/readyz" if ready else "/healthz")
            except httpx.TransportError:
                return False
            return response.status_code == 200

        wait_until(up, timeout=within, what="the daemon to answer")
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture(autouse=True)
def no_thread_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves threads of its own running (watchdog's `_no_thread_leaks`)."""
    before = set(threading.enumerate())
    yield
    # torch.compile starts inductor's unnamed compile pool on first use and keeps it for the process.
    library = ("ThreadPoolExecutor-",) if request.node.get_closest_marker("torch_compile") else ()
    leaked = wait_until_quiet(before, library)
    assert not leaked, f"threads leaked: {leaked}"


def threads_named(name: str) -> set[str]:
    """The ids of this process's OS threads named `name`: a thread, and the OpenMP team torch started for it
    (Linux names a thread after the one that starts it). Linux only, as serving's "one team" (compute.py) is."""
    named: set[str] = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            if (task / "comm").read_text().strip() == name:
                named.add(task.name)
        except OSError:  # it ended meanwhile
            pass
    return named


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Threads started meanwhile run torch on teams of `n` (the process's setting, which a new thread takes up)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def wait_until_quiet(before: set[threading.Thread], library: tuple[str, ...], timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        leaked = [
            t.name
            for t in threading.enumerate()
            # Process-wide pools that libraries start once and keep: not ours to stop.
            if t not in before
            and t.is_alive()
            and not t.name.startswith(("asyncio_", "AnyIO worker", "tqdm_monitor", *library))
        ]
        if not leaked or time.monotonic() > deadline:
            return leaked
        time.sleep(0.01)
