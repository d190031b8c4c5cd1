"""The systemd unit, checked by systemd's own tools and run under its sandbox; the notify protocol end to end."""

from __future__ import annotations

import asyncio
import ctypes
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from conftest import DEADLINE, ROOT, Daemon, Project, colours_yaml, png_bytes, sha256, wait_until
from tinynet import colour_state_dict

from reloader.config import ServerConfig, load_config
from reloader.notify import Notifier
from reloader.server import Daemon as ReloaderDaemon

UNIT = ROOT / "systemd" / "reloader.service"
INSTALLED_BINARY = "/opt/reloader/.venv/bin/reloader"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed, so the unit file cannot be checked here"
)

Message = dict[str, str]


def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """Every `Key=value` of the unit, in order; keys that repeat (SystemCallFilter=) keep each value."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run([SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=DEADLINE)


# -- the unit file ---------------------------------------------------------------------------------


@needs_systemd_analyze
def test_the_unit_passes_systemd_analyze_verify_without_a_single_warning(tmp_path: Path):
    # verify fails on an ExecStart binary that does not exist, and /opt/reloader only exists once
    # installed: check a copy that runs this checkout's entry point instead, and nothing else changed.
    entry_point = Path(sys.executable).with_name("reloader")
    text = UNIT.read_text()
    assert INSTALLED_BINARY in text
    copy = tmp_path / "reloader.service"
    copy.write_text(text.replace(INSTALLED_BINARY, str(entry_point if entry_point.exists() else sys.executable)))

    result = analyze("verify", "--man=no", "--generators=no", str(copy))

    # verify exits 0 on unknown keys and on values it ignores (Type=notify-reload before systemd 253):
    # only empty output means systemd understood every line.
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


@needs_systemd_analyze
def test_the_unit_rates_an_exposure_of_2_or_less_in_systemd_analyze_security():
    result = analyze("security", "--offline=yes", str(UNIT))

    assert result.returncode == 0, result.stderr
    found = re.search(r"Overall exposure level for reloader\.service: (\d+\.\d+)", result.stdout)
    assert found, result.stdout
    assert float(found.group(1)) <= 2.0, result.stdout


def test_the_unit_is_type_notify_with_a_watchdog_and_a_stop_timeout_above_the_graceful_shutdown():
    settings = unit_settings()

    assert settings["Type"] == ["notify"]
    assert settings["NotifyAccess"] == ["main"]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert settings["Restart"] == ["on-failure"]
    assert _seconds(settings["WatchdogSec"][0]) > 0
    assert _seconds(settings["TimeoutStopSec"][0]) > ServerConfig().shutdown_timeout_s


def _seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|min)?", value).groups()  # type: ignore[union-attr]
    return float(number) * {"ms": 0.001, "s": 1.0, "min": 60.0, None: 1.0}[unit]


# -- the daemon inside the unit's sandbox ---------------------------------------------------------

# Refuse any new executable mapping, as MemoryDenyWriteExecute= does (prctl PR_SET_MDWE, Linux 6.3+),
# then become the daemon: the setting survives execve.
_MDWE_THEN_EXEC = (
    "import ctypes, os, sys\n"
    "if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0):\n"
    "    sys.exit(f'PR_SET_MDWE: errno {ctypes.get_errno()}')\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def _syscall_groups() -> dict[str, list[str]]:
    out = analyze("syscall-filter").stdout
    groups: dict[str, list[str]] = {}
    members: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("@"):
            members = groups.setdefault(line.strip(), [])
        elif line.startswith("    ") and members is not None and not line.strip().startswith("#"):
            members.append(line.strip())
        elif not line.strip():
            members = None
    return groups


def denied_syscalls(filters: list[str]) -> set[str]:
    """The system calls that the unit's SystemCallFilter= lines answer with an error."""
    groups = _syscall_groups()

    def expand(name: str) -> set[str]:
        return set().union(*(expand(n) for n in groups[name])) if name.startswith("@") else {name}

    # systemd starts from "nothing allowed" when the first line is an allow list, from "all" otherwise.
    allowed = expand("@known") if filters[0].startswith("~") else set()
    for line in filters:
        deny = line.startswith("~")
        names = set().union(*(expand(n) for n in line.lstrip("~").split()))
        allowed = allowed - names if deny else allowed | names
    return expand("@known") - allowed


def _sandbox_prefix(settings: dict[str, list[str]], trace: Path) -> list[str]:
    """A command prefix that reproduces what of the unit's sandbox a test can without systemd as PID 1."""
    if shutil.which("strace") is None or shutil.which("unshare") is None:
        pytest.skip("strace and unshare are needed to run the daemon under the unit's system call filter")
    if subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "true"], capture_output=True).returncode != 0:
        pytest.skip("strace cannot trace here (ptrace is not permitted), so the system call filter is unchecked")
    proc_options = []
    if settings.get("ProtectProc", ["default"])[-1] != "default":
        proc_options.append(f"hidepid={settings['ProtectProc'][-1]}")
    if settings.get("ProcSubset", ["all"])[-1] == "pid":
        proc_options.append("subset=pid")
    mount_proc = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c"]
    script = 'mount -t proc -o "$0" proc /proc && exec "$@"'
    probe = subprocess.run([*mount_proc, script, ",".join(proc_options) or "defaults", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private /proc here (root or user namespaces needed): {probe.stderr!r}")
    denied = ",".join(f"?{name}" for name in sorted(denied_syscalls(settings["SystemCallFilter"])))
    errno = settings.get("SystemCallErrorNumber", ["EPERM"])[-1]
    assert errno == "EPERM", "the emulation injects EPERM; a unit that kills on SIGSYS needs another check"
    prefix = [
        *mount_proc,
        script,
        ",".join(proc_options) or "defaults",
        # strace as a grandchild (-D) keeps the daemon's pid, so signals and exit codes are its own.
        *("strace", "-D", "-f", "-qq", "--seccomp-bpf", "-e", "signal=none", "-o", str(trace)),
        *("-e", f"trace={denied},socket", "-e", f"inject={denied}:error={errno}"),
    ]
    if settings.get("MemoryDenyWriteExecute", ["no"])[-1] == "yes":
        if ctypes.CDLL(None).prctl(66, 0, 0, 0, 0) < 0:  # PR_GET_MDWE fails where PR_SET_MDWE is unknown
            pytest.skip("this kernel has no PR_SET_MDWE to reproduce MemoryDenyWriteExecute=yes")
        prefix += [sys.executable, "-c", _MDWE_THEN_EXEC]
    return prefix


def convnet_yaml() -> str:
    # A torchvision convnet, because convolutions are where torch leans on the CPU (oneDNN's JIT,
    # cpuinfo's core probing); tinynet has none.
    return (
        "server:\n  host: 127.0.0.1\n  port: 0\n"
        "models:\n  squeeze:\n    arch: squeezenet1_1\n    num_classes: 3\n    labels: [red, green, blue]\n"
        "    checkpoints: checkpoints/squeeze\n    preprocess: {resize: 64, crop: 64}\n"
        "    warmup:\n      images: [golden/red.png, golden/green.png, golden/blue.png]\n"
    )


def test_the_daemon_serves_reloads_and_stops_inside_the_units_sandbox(project: Project, start_daemon, tmp_path: Path):
    """The unit's /proc options, system call filter (as EPERM, via strace) and W^X policy, applied for real."""
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze is not installed, so the unit's system call groups are unknown here")
    import torchvision

    settings = unit_settings()
    trace = tmp_path / "strace.txt"
    prefix = _sandbox_prefix(settings, trace)
    folder = project.root / "checkpoints" / "squeeze"
    folder.mkdir()
    torch.manual_seed(0)
    weights = torchvision.models.squeezenet1_1(num_classes=3).state_dict()
    first = project.save("squeeze-v1.pt", weights, folder=folder)
    project.write_config(convnet_yaml())

    daemon = start_daemon(project.config, options=["--log-format", "json"], prefix=prefix)

    assert daemon.predict("red", model="squeeze").json()["sha256"] == sha256(first)
    # oneDNN JIT-compiles kernels for batches of two or more only: make the batcher run some.
    wait_until(lambda: burst(daemon.url, "squeeze") and batches_above_one(daemon, "squeeze"), what="a batch of 2+")
    torch.manual_seed(1)
    second = project.save("squeeze-v2.pt", torchvision.models.squeezenet1_1(num_classes=3).state_dict(), folder)
    daemon.wait_live(second, model="squeeze")
    project.save("squeeze-v3.pt", colour_state_dict(), folder)  # tinynet weights: the wrong structure
    daemon.wait_file(folder / "squeeze-v3.pt", "rejected", model="squeeze")
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: "SIGHUP" in daemon.log(), what="the daemon to take SIGHUP")
    assert daemon.predict("blue", model="squeeze").status_code == 200
    assert daemon.stop() == 0

    # Anything torch or a library prints past the logger (cpuinfo errors, NNPACK warnings) would show
    # up here as a line that is not JSON.
    lines = daemon.log().splitlines()
    assert lines and all(line.startswith("{") for line in lines), "\n".join(lines)
    families = set(re.findall(r"socket\((AF_\w+)", trace.read_text()))
    assert families and families <= set(settings["RestrictAddressFamilies"][-1].split()), families


def burst(url: str, model: str, size: int = 8) -> bool:
    """Requests at once, each on its own connection, so that they queue behind each other's forward pass."""

    def post(colour: str) -> httpx.Response:
        return httpx.post(f"{url}/models/{model}/predict", content=png_bytes(colour), timeout=DEADLINE)

    with ThreadPoolExecutor(size) as pool:
        failed = [r for r in pool.map(post, ["red", "green", "blue"] * (size // 3 + 1)) if r.status_code != 200]
    assert not failed, f"{len(failed)} failed, the first: {failed[0].status_code} {failed[0].text}"
    return True


def batches_above_one(daemon: Daemon, model: str) -> float:
    text = daemon.get("/metrics").text
    count = re.search(rf'^reloader_batch_size_count{{model="{model}"}} (\S+)$', text, re.M)
    singles = re.search(rf'^reloader_batch_size_bucket{{le="1.0",model="{model}"}} (\S+)$', text, re.M)
    assert count and singles, f"no reloader_batch_size histogram for {model} in /metrics"
    return float(count.group(1)) - float(singles.group(1))


# -- the notify protocol ----------------------------------------------------------------------------


class NotifySocket:
    """The receiving end of $NOTIFY_SOCKET as systemd holds it: every datagram, parsed, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.received: list[tuple[float, Message]] = []
        self._queue: queue.Queue[tuple[float, Message]] = queue.Queue()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        self._thread = threading.Thread(target=self._read, name="notify-socket")
        self._thread.start()

    def env(self, watchdog_usec: int | None = None) -> dict[str, str]:
        env = {"NOTIFY_SOCKET": str(self.path)}
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def _read(self) -> None:
        # Drain at once: the kernel queues only net.unix.max_dgram_qlen datagrams (often 10), and a full
        # queue blocks the daemon's sendto, and with it the event loop.
        while data := self._socket.recv(4096):
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self._queue.put((time.monotonic(), fields))

    def expect(self, predicate: Callable[[Message], bool], what: str, timeout: float = DEADLINE) -> Message:
        """The next message that satisfies `predicate`; every message up to it lands in `received`."""
        return self.expect_timed(predicate, what, timeout)[1]

    def expect_timed(
        self, predicate: Callable[[Message], bool], what: str, timeout: float = DEADLINE
    ) -> tuple[float, Message]:
        """Like `expect`, with the monotonic time the message arrived."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                recent = [m for _, m in self.received[-8:]]
                pytest.fail(f"no {what} within {timeout} s; the last messages were {recent}")
            self.received.append(item)
            if predicate(item[1]):
                return item

    def expect_silence(self, key: str, period: float, timeout: float = DEADLINE) -> None:
        """Wait until a whole `period` passes without a `key` message, as systemd's watchdog does."""
        quiet_since = time.monotonic()
        deadline = quiet_since + timeout
        while time.monotonic() < deadline:
            try:
                item = self._queue.get(timeout=max(0.0, quiet_since + period - time.monotonic()))
            except queue.Empty:
                return
            self.received.append(item)
            if key in item[1]:
                quiet_since = item[0]
        pytest.fail(f"{key} messages kept coming for {timeout} s")

    def close(self) -> None:
        # An empty datagram ends the reader; the daemon never sends one.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as poke:
            poke.sendto(b"", str(self.path))
        self._thread.join()
        self._socket.close()


def has(key: str, value: str = "1") -> Callable[[Message], bool]:
    return lambda message: message.get(key) == value


def status_only(message: Message) -> bool:
    return set(message) == {"STATUS"}


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    # AF_UNIX paths are limited to 108 bytes, which pytest's tmp_path can exceed.
    folder = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp" if os.path.isdir("/tmp") else None))
    listener = NotifySocket(folder / "notify")
    yield listener
    listener.close()
    shutil.rmtree(folder)


def test_ready_comes_after_the_initial_load_and_names_the_loaded_version(project: Project, start_daemon, notify):
    project.save("colours-v1.pt")
    daemon = start_daemon(project.config, env=notify.env(watchdog_usec=1_000_000))

    ready = notify.expect(has("READY"), "READY=1")

    # Only progress lines (the initial swap's STATUS) precede READY=1: no ping, no RELOADING.
    before = [message for _, message in notify.received[:-1]]
    assert before == [{"STATUS": "colours: colours-v1.pt live; serving colours v1"}]
    assert ready["STATUS"] == "serving colours v1"
    assert daemon.get("/readyz").status_code == 200


def test_watchdog_pings_keep_coming_while_the_daemon_is_healthy_and_serves(project: Project, start_daemon, notify):
    """Their period (half of WATCHDOG_USEC) is the Notifier's, tested below; the 1 s deadline is systemd's
    to judge, and on two shared cores no test's to assert in wall-clock time."""
    project.save("colours-v1.pt")
    daemon = start_daemon(project.config, env=notify.env(watchdog_usec=1_000_000))
    notify.expect(has("READY"), "READY=1")

    for _ in range(2):
        notify.expect(has("WATCHDOG"), "WATCHDOG=1")
    assert daemon.predict("red").status_code == 200
    for _ in range(3):
        notify.expect(has("WATCHDOG"), "WATCHDOG=1")


def test_sighup_sends_reloading_then_ready_naming_what_the_reload_brought(project: Project, start_daemon, notify):
    project.save("colours-v1.pt")
    daemon = start_daemon(project.config, env=notify.env())
    notify.expect(has("READY"), "READY=1")
    second = project.root / "checkpoints" / "second"
    second.mkdir()
    project.save("second-v4.pt", folder=second)
    extra = (
        "  second:\n    arch: tinynet:colour_net\n    num_classes: 3\n    labels: [red, green, blue]\n"
        "    checkpoints: checkpoints/second\n"
    )
    project.write_config(colours_yaml(extra_model=extra))
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    daemon.signal(signal.SIGHUP)

    reloading = notify.expect(has("RELOADING"), "RELOADING=1")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    # systemd 253+ ties the READY=1 that follows to this reload by this timestamp.
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after
    ready = notify.expect(has("READY"), "READY=1 after the reload")
    assert ready["STATUS"] == "serving colours v1, second v4"


def test_a_swap_and_a_rejection_each_send_a_status_line(project: Project, start_daemon, notify):
    project.save("colours-v1.pt")
    start_daemon(project.config, env=notify.env())
    notify.expect(has("READY"), "READY=1")

    project.save("colours-v2.pt")
    swapped = notify.expect(status_only, "a STATUS line for the swap")
    project.save("colours-v3.pt", colour_state_dict(permute=(1, 0, 2)))
    rejected = notify.expect(status_only, "a STATUS line for the rejection")

    assert swapped["STATUS"] == "colours: colours-v2.pt live; serving colours v2"
    assert rejected["STATUS"].startswith("colours: colours-v3.pt rejected (warmup: ")
    assert "expected 'red', got 'green'" in rejected["STATUS"]
    assert rejected["STATUS"].endswith("; serving colours v2")


def test_sigterm_sends_stopping_and_the_daemon_exits_zero(project: Project, start_daemon, notify):
    project.save("colours-v1.pt")
    daemon = start_daemon(project.config, env=notify.env())
    notify.expect(has("READY"), "READY=1")

    daemon.signal(signal.SIGTERM)

    notify.expect(has("STOPPING"), "STOPPING=1")
    assert daemon.proc.wait(DEADLINE) == 0


def test_watchdog_pings_go_on_while_a_watched_folder_is_deleted_and_recreated(project: Project, start_daemon, notify):
    # The folder's watch ends with it; the watcher mends that by itself, so systemd has nothing to restart.
    project.save("colours-v1.pt")
    daemon = start_daemon(project.config, env=notify.env(watchdog_usec=1_000_000))
    notify.expect(has("READY"), "READY=1")

    shutil.rmtree(project.checkpoints)
    wait_until(lambda: "is gone; watching it again when it comes back" in daemon.log(), what="the watcher to notice")
    ping_after(notify, time.monotonic(), "a WATCHDOG=1 after the folder went")
    project.checkpoints.mkdir()
    project.save("colours-v2.pt", colour_state_dict(scale=6.0))

    daemon.wait_live(project.checkpoints / "colours-v2.pt")
    ping_after(notify, time.monotonic(), "a WATCHDOG=1 after it came back")
    assert daemon.get("/healthz").status_code == 200


def ping_after(notify: NotifySocket, mark: float, what: str) -> None:
    """Wait for a WATCHDOG=1 that arrived after `mark` (pings queued before it do not count)."""
    while notify.expect_timed(has("WATCHDOG"), what)[0] <= mark:
        pass


def test_watchdog_pings_stop_once_the_file_watcher_has_stopped(project: Project, notify):
    # In process, to stop the watcher from outside: what a crashed watchdog dispatch thread looks like.
    project.save("colours-v1.pt")
    daemon = ReloaderDaemon(load_config(project.config), port=0, notifier=Notifier(notify.env(watchdog_usec=2)))
    daemon.supervisor.start()
    try:
        assert daemon.supervisor.wait_idle(DEADLINE)
        daemon.watcher.start()
        asyncio.run(daemon.server.on_tick(1))
        notify.expect(has("WATCHDOG"), "WATCHDOG=1 while healthy")
        healthy = len(notify.received)

        daemon.watcher.stop()
        asyncio.run(daemon.server.on_tick(2))
        daemon.notifier.send("MARK=1")  # datagrams arrive in order: whatever the tick sent comes before this

        notify.expect(has("MARK"), "the mark")
        assert daemon.dead_parts() == ["file watcher"]
        after = [message for _, message in notify.received[healthy:]]
        assert after == [{"MARK": "1"}], f"the stopped watcher's tick still sent {after[:-1]}"
    finally:
        daemon.watcher.stop()
        daemon.supervisor.stop()
        daemon.batcher.close()
        daemon.notifier.close()


def test_watchdog_is_off_without_watchdog_usec_or_when_watchdog_pid_names_another_process():
    assert Notifier({"NOTIFY_SOCKET": "@x"}).watchdog_interval is None
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    own = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(own).watchdog_interval == 15.0
    assert Notifier({**own, "WATCHDOG_PID": str(os.getppid())}).watchdog_interval is None
