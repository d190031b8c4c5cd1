"""How serving and reloading share the CPU: one forward pass at a time, reload work at a lower priority.

torch already spreads one forward pass over every core; two passes at once only fight over them. So
serving batches and warm-up passes take turns under one lock, and a warm-up waits at most one batch.
The rest of a reload (reading, hashing, deserializing) runs on threads the kernel schedules after
the serving threads.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import torch

logger = logging.getLogger("reloader.compute")

FORWARD_LOCK = threading.Lock()
# torch.fx patches nn.Module.__call__ for every thread while it traces, so nothing may call a module
# meanwhile: tracing holds both locks, forwards hold FORWARD_LOCK, and building a model holds this one
# (a user's factory may run a module to size its layers).
TRACE_LOCK = threading.Lock()
RELOAD_NICENESS = 10


def lower_thread_priority(niceness: int = RELOAD_NICENESS) -> None:
    """Lower the calling thread's priority (Linux schedules threads one by one; elsewhere a no-op)."""
    try:
        current = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), max(current, niceness))
    except (AttributeError, OSError) as exc:  # no per-thread nice here, or not permitted
        logger.debug("cannot lower reload thread priority: %s", exc)


def run_forward(module: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """One forward pass, in turn with every other, in the layout serving uses (so compiled graphs match)."""
    with FORWARD_LOCK, torch.inference_mode():
        return module(batch.contiguous(memory_format=torch.channels_last))


def timed_forward(module: torch.nn.Module, batch: torch.Tensor) -> float:
    """Seconds one forward pass takes, timed once it holds the lock (not counting the wait for it)."""
    with FORWARD_LOCK, torch.inference_mode():
        started = time.perf_counter()
        module(batch.contiguous(memory_format=torch.channels_last))
        return time.perf_counter() - started
