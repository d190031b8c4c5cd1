"""How serving and reloading share the CPU: one forward pass at a time, everything else at a lower priority.

torch already spreads one forward pass over every core; two passes at once only fight over them. So
serving batches and warm-up passes take turns under one lock, and a warm-up waits at most one batch.
A reload's last forward pass keeps its turn until its swap (`hand_over`): the pass after it is the new
version's. The rest of a reload (reading, hashing, deserializing) and the decoding of uploads run on
threads the kernel schedules after serving's forward pass. A forward's threads wait for each other at
every layer, so a decode that takes one of them off its core stalls both: with decoding at the process's
priority, a bf16 forward fed by two decode threads lost 8-13 % of its images per second here
(bench/README.md).

One team. torch runs a forward pass on an OpenMP team: the thread that calls it and one more per core, which
meet at every layer. GNU OpenMP (torch's, on Linux) keeps a thread's team until that thread ends, and once
the teams' threads outnumber the cores, a thread waiting for the next layer spins 100 loops instead of
300,000 before it sleeps: every layer then wakes the team through the kernel. In process, resnet18 at batch 1
took 35 ms instead of 28 with a second team alive; served at c=1, the forward took 30.0 ms instead of 24.9.
So while serving, only the inference thread runs torch work that spreads over the cores: decoding normalises
in numpy (images.Preprocessor), a batch is stacked on the inference thread (batching.stacked_forward), and a
reload judges each file on a thread that ends with its verdict, team and all (threads.on_own_thread), and a
canary's passes run on the inference thread (batching.Batcher.on_inference_thread). cli.spin_briefly shortens
the spin itself for serving.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing.process
import os
import signal
import threading
import time
from collections.abc import Iterator

import torch

from .memory import libc

logger = logging.getLogger("reloader.compute")

FORWARD_LOCK = threading.Lock()
# torch.fx patches nn.Module.__call__ for every thread while it traces, so nothing may call a module
# meanwhile: tracing holds both locks, forwards hold FORWARD_LOCK, and building a model holds this one
# (a user's factory may run a module to size its layers).
TRACE_LOCK = threading.Lock()
# The lowest: decoding gets the cores whenever the forward waits, and a reload shares them with decoding
# (above it, a reload would starve the decoding that feeds serving). Both also run under SCHED_IDLE
# (lower_thread_priority), which nice 19 alone is not.
BACKGROUND_NICENESS = 19
PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15  # linux/prctl.h


def name_thread() -> None:
    """Give the calling OS thread its Python name (15 bytes at most), so `top -H`, `ps -L` and /proc tell
    serving's threads from the rest. Threads it starts, such as a forward's OpenMP team, inherit the name.
    Python names OS threads itself only from 3.14; before, through prctl(PR_SET_NAME). Linux only."""
    c = libc()
    if c is None or not hasattr(c, "prctl"):  # not Linux: the name is only for people
        logger.debug("cannot name the thread: no prctl here")
        return
    c.prctl(PR_SET_NAME, threading.current_thread().name.encode()[:15], 0, 0, 0)


def lower_thread_priority(niceness: int = BACKGROUND_NICENESS) -> None:
    """Name the calling thread (name_thread) and lower its priority (Linux schedules threads one by one;
    elsewhere a no-op): nice 19, and Linux's SCHED_IDLE, under which a thread runs only on a core no other
    thread wants and gives it up the moment one does. At nice 19 alone, a decode still took a forward's OpenMP
    thread off its core for a scheduler slice now and then, and the team waited for it at the next layer:
    served side by side on the AMX Xeon (6 rounds of 8 s), bf16 c=16 175 against 189 img/s and
    p99 125 against 112 ms; fp32 c=16 78 against 81 img/s; c=1 alike. The threads this one starts (a forward's
    OpenMP team, a build's child process) inherit both."""
    name_thread()
    me = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, me, max(os.getpriority(os.PRIO_PROCESS, me), niceness))
    except (AttributeError, OSError) as exc:  # no per-thread nice here, or not permitted
        logger.debug("cannot lower the thread's priority: %s", exc)
    try:
        os.sched_setscheduler(me, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError) as exc:  # not Linux, or refused (a seccomp profile, say): nice 19 stays
        logger.debug("cannot make the thread SCHED_IDLE: %s", exc)


def die_with_parent(parent: int) -> None:
    """In a child process (a build): killed with the process `parent`. Without this, a build whose server was
    killed went on compiling for the rest of its minute, beside the server started in its place, into a folder
    nothing would read. Linux only (elsewhere a no-op). The signal comes when the thread that started the
    child ends: the one that waits for it (packages.package)."""
    c = libc()
    if c is None or not hasattr(c, "prctl"):
        return
    c.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before that
        os._exit(1)


def as_build_child(parent: int) -> None:
    """First in a build's child process: in a process group of its own, with the compilers it starts, which
    kill_group ends at once; killed with its server; and no lock of its own that its kill would leave behind."""
    os.setpgid(0, 0)
    die_with_parent(parent)
    thread_lock_for_progress_bars()


def kill_group(child: multiprocessing.process.BaseProcess) -> None:
    """A build's `child` killed with the compilers it started (its process group: as_build_child), and waited
    for: a compiler left running would write into its build's folder as that folder is removed."""
    child.kill()
    try:
        os.killpg(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
    except ProcessLookupError:  # killed before it made its group: it started nothing
        pass
    child.join()


def thread_lock_for_progress_bars() -> None:
    """In a child process (a build): tqdm's lock is a thread lock. torch.fx's interpreter makes a (disabled)
    tqdm bar, and tqdm's first bar creates a multiprocessing lock, a named semaphore: a child killed (its
    server stopping, its timeout) never removed it, and multiprocessing's resource tracker did at the server's
    exit, with a warning of a leaked semaphore. The child's one process needs no more than a thread lock."""
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def run_forward(module: torch.nn.Module, batch: torch.Tensor, *, last: bool = False) -> torch.Tensor:
    """One forward pass, in turn with every other, on the batch as serving passes it (so compiled graphs match).
    `last`: a gate's last pass, after which it only decides; inside `hand_over`, it keeps its turn."""
    with turn(keep=last), torch.inference_mode():
        return module(as_served(batch))


@contextlib.contextmanager
def turn(*, keep: bool = False) -> Iterator[None]:
    """The calling thread's turn at FORWARD_LOCK. A block inside another takes nothing more (a serving pass
    looks up the live version once it has its turn, then runs it). A turn this thread kept is given back
    first, then taken again, as between any two of its passes. `keep`, inside `hand_over`: the turn is
    kept past the block, until `give_back`."""
    depth = getattr(_turns, "depth", 0)
    if not depth:
        give_back()
        FORWARD_LOCK.acquire()
    _turns.depth = depth + 1
    try:
        yield
    finally:
        _turns.depth = depth
        if not depth:
            _turns.kept = keep and getattr(_turns, "handing_over", False)
            if not _turns.kept:
                FORWARD_LOCK.release()


def give_back() -> None:
    """Release the turn this thread kept from its last pass (`turn(keep=True)`), if it kept one."""
    if getattr(_turns, "kept", False):
        _turns.kept = False
        FORWARD_LOCK.release()


@contextlib.contextmanager
def hand_over() -> Iterator[None]:
    """Around judging a file and acting on the verdict. The gate's last forward pass keeps its turn until the
    swap gives it back (or the block ends), so no serving pass starts between them. Without it, the pass
    waiting for the gate's turn ran on the version being replaced, a millisecond before the swap, and the
    first answer by the new version came two passes after the gate, not one (reloader.batching)."""
    _turns.handing_over = True
    try:
        yield
    finally:
        _turns.handing_over = False
        give_back()


def compile_forward(compiled: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The first call of a torch.compile'd module: it compiles (for seconds to minutes), then runs once.

    Serving goes on meanwhile. The lock is held only while torch.fx traces (`Tracer.trace`, as compiling
    does inside): that patches nn.Module for every thread, so nothing may call a module then. The one run
    after the compile overlaps serving at this thread's lower priority. Holding the lock throughout, as
    `run_forward` does, stopped every model's serving for the whole compile (64 s for resnet18, cold, here)."""
    _install_trace_turns()
    _turns.compiling = True
    try:
        with torch.inference_mode():
            return compiled(as_served(batch))
    finally:
        _turns.compiling = False


# Per thread: `compiling`, in compile_forward, outside the locks; `depth`, the `turn` blocks it is in; `kept`,
# it holds FORWARD_LOCK past its last pass; `handing_over`, in `hand_over`.
_turns = threading.local()


def _install_trace_turns() -> None:
    """Wrap torch.fx's Tracer.trace, once, so a trace run by a compile_forward takes the forward lock."""
    from torch.fx import _symbolic_trace

    trace = _symbolic_trace.Tracer.trace
    if getattr(trace, "_takes_turns", False):
        return

    def in_turn(self: object, *args: object, **kwargs: object) -> object:
        if not getattr(_turns, "compiling", False):
            return trace(self, *args, **kwargs)  # type: ignore[arg-type]
        _turns.compiling = False  # a trace nested in this one runs under the locks it already holds
        try:
            with turn(), TRACE_LOCK:
                return trace(self, *args, **kwargs)  # type: ignore[arg-type]
        finally:
            _turns.compiling = True

    in_turn._takes_turns = True  # type: ignore[attr-defined]
    _symbolic_trace.Tracer.trace = functools.wraps(trace)(in_turn)  # type: ignore[method-assign,assignment]


def timed_forward(module: torch.nn.Module, batch: torch.Tensor) -> float:
    """Seconds one forward pass takes, timed once it holds the lock (not counting the wait for it)."""
    with turn(), torch.inference_mode():
        batch = as_served(batch)
        started = time.perf_counter()
        module(batch)
        return time.perf_counter() - started


def as_served(batch: torch.Tensor) -> torch.Tensor:
    """In inference mode: the batch as serving passes it (images.stack_images), channels last and an inference
    tensor. A compiled graph guards on both: one compiled on another kind of batch compiled again at its first
    served batch, on the serving path (15.7 s for resnet18 here). A batch already so is passed as it is."""
    if batch.is_inference():
        return batch.contiguous(memory_format=torch.channels_last)
    return batch.clone(memory_format=torch.channels_last)  # made in inference mode: an inference tensor
