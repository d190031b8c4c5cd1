"""The server's folders in TMPDIR outlive no server: a killed one's are removed by the next to start, a live
one's are left alone, and a build's child process dies with the server that started it, or ends as soon as
its server is asked to stop."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import Project, colours_yaml, subprocess_env, wait_until

from reloader import scratch
from reloader.compute import kill_group

HOLDER = """
import sys
from reloader.scratch import Scratch
held = Scratch("compile")
(held.path / "blob").write_bytes(bytes(4096))
print(held.path, flush=True)
sys.stdin.read()  # holds it until the test closes stdin (or kills it)
"""

# A real build of a small net in a child process (packages.compiled), in a process the test kills.
BUILDER = """
import torch
from reloader import packages
from tinynet import ColourNet
module = ColourNet().eval().requires_grad_(False)
packages.compiled(module, torch.rand(4, 3, 16, 16), 4)
"""

# torch.fx's interpreter, as a build's export runs it, counting the multiprocessing locks it makes.
INTERPRETER = """
import sys
import multiprocessing.synchronize as synchronize
made = []
init = synchronize.SemLock.__init__
def counted(self, *args, **kwargs):
    made.append(args)
    init(self, *args, **kwargs)
synchronize.SemLock.__init__ = counted
import torch
from reloader.compute import thread_lock_for_progress_bars
if sys.argv[1] == "child":
    thread_lock_for_progress_bars()
torch.fx.Interpreter(torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU()))).run(torch.ones(1))
print(len(made))
"""


@pytest.fixture
def tmpdir_env(tmp_path: Path) -> Path:
    root = tmp_path / "tmp"
    root.mkdir()
    return root


def hold(root: Path) -> tuple[subprocess.Popen[str], Path]:
    """A process of its own holding a scratch folder in `root`, and that folder."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(TMPDIR=str(root)),
    )
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def killed(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()


def test_a_killed_process_s_folder_is_swept_and_a_live_one_s_and_foreign_ones_are_kept(tmpdir_env: Path):
    dead_proc, dead = hold(tmpdir_env)
    live_proc, live = hold(tmpdir_env)
    killed(dead_proc)
    unlocked = tmpdir_env / "reloader-made-by-hand"  # no lock: not this module's, whatever its name
    unlocked.mkdir()
    elsewhere = tmpdir_env.parent / "elsewhere"  # a link to a folder with a free lock is not followed
    elsewhere.mkdir()
    (elsewhere / scratch.LOCK).touch()
    (tmpdir_env / "reloader-link").symlink_to(elsewhere)

    removed = scratch.sweep(tmpdir_env)

    assert [path for path, _ in removed] == [dead]
    assert removed[0][1] >= 4096
    assert not dead.exists()
    assert live.is_dir() and (live / "blob").is_file()
    assert unlocked.is_dir() and (elsewhere / scratch.LOCK).exists()
    assert scratch.sweep(tmpdir_env) == []

    assert live_proc.stdin is not None
    live_proc.stdin.close()  # its owner ends normally: it removes its own folder at exit
    assert live_proc.wait(timeout=30) == 0
    assert not live.exists()


def test_a_folder_removed_in_process_lets_go_of_its_lock_only_once_gone(tmpdir_env: Path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmpdir_env))
    with scratch.Scratch("package") as folder:
        assert folder.parent == tmpdir_env and folder.name.startswith("reloader-package-")
        assert sorted(p.name for p in folder.iterdir()) == [scratch.LOCK]
        assert scratch.sweep(tmpdir_env) == []  # held by this process
    assert not folder.exists()


def _children(parent: int) -> list[int]:
    """`parent`'s build children (multiprocessing's spawned processes, not its resource tracker)."""
    found = []
    for task in Path(f"/proc/{parent}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
            except OSError:  # it ended meanwhile
                continue
    return found


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"  # a zombie has ended; its reaper may not have waited yet


def _build_started(root: Path, parent: int) -> tuple[Path, int]:
    """The folder of the build that has begun in `root` (its child has opened its log), and its child."""
    log = wait_until(lambda: next(root.glob("reloader-compile-*/build.log"), None), timeout=120, what="a build")
    children = _children(parent)
    assert len(children) == 1, children
    return log.parent, children[0]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc (Linux)")
def test_a_build_s_child_dies_with_the_server_and_the_next_server_sweeps_its_folder(
    tmpdir_env: Path, project: Project, start_daemon
):
    """A server killed mid-build (SIGKILL) left its build child compiling for the rest of its minute, into a
    folder nothing read, and left that folder in TMPDIR (72 MB for resnet18's int8 form here; 45 MB with the
    child killed too)."""
    env = subprocess_env(TMPDIR=str(tmpdir_env))
    server = subprocess.Popen([sys.executable, "-c", textwrap.dedent(BUILDER)], env=env)
    try:
        # The child opens its log once it has set itself to die with its parent, then imports and compiles.
        folder, child = _build_started(tmpdir_env, server.pid)
    finally:
        killed(server)
    wait_until(lambda: not _running(child), what="the build's child to die with its server")
    assert not (folder / "compiled.pt2").exists()  # it did not build on: the build it was killed in wrote nothing
    assert (folder / scratch.LOCK).exists()

    project.save("colours-v1.pt")
    daemon = start_daemon(project.config, env={"TMPDIR": str(tmpdir_env)})
    assert not folder.exists()
    assert f"removed {folder} (" in daemon.log() and "left by a reloader process that died" in daemon.log()
    assert daemon.predict("red").json()["predictions"][0]["label"] == "red"


# Another model on the same checkpoints, to be taken out of the config mid-build.
SECOND = """  second:
    arch: tinynet:colour_net
    num_classes: 3
    labels: [red, green, blue]
    checkpoints: checkpoints/colours
    preprocess: {resize: 32, crop: 32}
    warmup:
      images: [golden/red.png]
"""
COMPILED = "    optimize: compile\n"


def _ended(model: str, folder: Path, child: int, log: str) -> None:
    """The build for `model` ended at once, its child and folder with it, and judged nothing."""
    assert f"reload-{model} stops: the ahead-of-time compile was ended unfinished, its child process killed" in log
    assert "did not stop within" not in log  # the stop used to wait 5 s for the build, then leave it running
    # A stop is no verdict: not a rejection, not a failed pass, nor a reason to compile in the server's process.
    assert "rejected" not in log and "reload pass failed" not in log and "so this process compiles" not in log
    wait_until(lambda: not _running(child), what="the build's child to end")
    assert not folder.exists()


@pytest.mark.torch_compile
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc (Linux)")
def test_a_build_ends_at_once_when_its_model_leaves_the_config_or_the_server_stops(
    tmpdir_env: Path, project: Project, start_daemon
):
    live = project.save("colours-v1.pt")
    project.write_config(colours_yaml(extra_model=SECOND))
    daemon = start_daemon(project.config, env={"TMPDIR": str(tmpdir_env)})
    pid = daemon.proc.pid

    # Edited in while serving, a definition this process has not compiled is built by a child.
    project.write_config(colours_yaml(extra_model=SECOND + COMPILED))
    folder, child = _build_started(tmpdir_env, pid)
    project.write_config(colours_yaml())  # `second` goes mid-build
    wait_until(lambda: "model second: removed from the config" in daemon.log(), what="second's removal")
    _ended("second", folder, child, daemon.log())
    assert daemon.predict("blue").json()["predictions"][0]["label"] == "blue"

    project.write_config(colours_yaml().replace("    version: latest\n", "    version: latest\n" + COMPILED))
    folder, child = _build_started(tmpdir_env, pid)
    assert daemon.stop() == 0
    _ended("colours", folder, child, daemon.log())
    assert list(tmpdir_env.glob("reloader-*")) == [] and live.exists()


@pytest.mark.parametrize("process", ["server", "child"])
def test_a_build_s_child_makes_no_named_semaphore_that_its_kill_would_leave_behind(process: str):
    """torch.fx's interpreter makes a disabled tqdm bar, and tqdm's first makes a multiprocessing lock: a named
    semaphore that a child killed mid-build left to the resource tracker, which warned of a leak at exit. The
    server's own process (no call) shows that the count sees it."""
    out = subprocess.run(
        [sys.executable, "-c", INTERPRETER, process], capture_output=True, text=True, env=subprocess_env(), check=True
    )
    made = int(out.stdout.split()[-1])
    assert made == 0 if process == "child" else made >= 1


def _starts_a_compiler(pids) -> None:  # a build's child (spawned: a module-level function) and a long "compile"
    from reloader.compute import as_build_child

    as_build_child(os.getppid())
    pids.put(subprocess.Popen(["sleep", "600"]).pid)
    time.sleep(600)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc (Linux)")
def test_a_build_s_child_is_killed_with_the_compilers_it_started():
    """A compiler the child started (Inductor runs g++) went on after the child was killed, writing into the
    build's folder as the server removed it."""
    context = multiprocessing.get_context("spawn")
    pids = context.Queue()
    child = context.Process(target=_starts_a_compiler, args=(pids,), daemon=True)
    child.start()
    compiler = pids.get(timeout=60)
    assert _running(compiler)

    kill_group(child)

    assert child.exitcode == -signal.SIGKILL
    wait_until(lambda: not _running(compiler), what="the child's compiler to end with it")
