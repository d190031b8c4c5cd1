"""Give freed model memory back after a swap, so RSS does not ratchet up with every reload, and a GPU's
memory goes back to whatever else runs on it (a trainer, say)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import cache

import torch


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
