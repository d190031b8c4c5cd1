"""Give freed model memory back after a swap, so RSS does not ratchet up with every reload, and a GPU's
memory goes back to whatever else runs on it (a trainer, say)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from functools import cache

import torch

M_ARENA_MAX = -8  # glibc's malloc.h
SERVING_MALLOC_ARENAS = 1


@cache
def libc() -> ctypes.CDLL | None:
    """The C library, loaded once; None where there is none to load."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release() -> None:
    """Collect cycles, then ask glibc to return free heap pages (large tensors often land in the heap), and
    torch's CUDA allocator the blocks it caches: the old version's weights would otherwise stay reserved
    on the GPU, out of reach of other processes. A process that never used CUDA does not start it here."""
    gc.collect()
    trim()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def trim() -> None:
    """Ask glibc to return free heap pages to the OS: after a large image, glibc keeps its pixels' pages
    (16 decodes of 36 MP held 300 MB here until a trim gave back all but 20)."""
    c = libc()
    if c is not None and hasattr(c, "malloc_trim"):
        c.malloc_trim(0)


def one_arena() -> bool:
    """Have glibc serve every thread's allocations from one malloc arena, unless the environment chose how many
    (MALLOC_ARENA_MAX, or arena_max in GLIBC_TUNABLES). Called by `reloader serve` before its threads start.
    By default glibc gives threads arenas of their own, up to 8 per core, and each judgement runs on a new
    thread (threads.on_own_thread), so a swap's memory spread over arenas the next one might not reuse. Over 100
    swaps of resnet18 here, in 4 side-by-side runs, the RSS at a swap's peak was lower with one arena (median
    863-874 MiB against 894-933, worst 883-912 against 915-985), served img/s did not move beyond the noise,
    and the peak over the RSS just before a swap did not change clearly (worst 58-86 MiB against 72-87).
    True where it was set."""
    if "MALLOC_ARENA_MAX" in os.environ or "arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    c = libc()
    return c is not None and hasattr(c, "mallopt") and bool(c.mallopt(M_ARENA_MAX, SERVING_MALLOC_ARENAS))
