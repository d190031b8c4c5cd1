"""Checkpoint formats read with bounded memory: a file's bytes are never held twice, nor inflated past it.

- `.pt` (torch.save's zip): before torch.load inflates anything, each member's declared size is
  weighed against the file's (zip_bounds). torch.save stores members uncompressed, so its members add
  up to less than the file; a 3 MB file holding one deflated 3 GB member is refused unread.
- `.safetensors`: the header is checked as the safetensors library checks it, then each tensor is read
  from the file straight into its own memory (read_safetensors): one copy of the weights, where
  `safetensors.torch.load(fh.read())` held the file's bytes and the tensors at once.

Why not memory-map the file, as `safetensors.safe_open` does: tensors backed by a mapping of a file that
others write to fault (SIGBUS, which ends the process) when the file is truncated, and `cp` over a
checkpoint truncates it first. Reading into the daemon's own memory costs the same one copy, and no
write to the folder can reach weights already read.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from typing import BinaryIO

import torch

from .errors import CheckpointRejected

# A member may be compressed (zip tools re-pack), but the whole may not inflate past this many times
# the file: real weights compress by a few percent, a bomb by a thousand times.
MAX_INFLATION = 2
# The safetensors library's own bound on its JSON header.
MAX_HEADER_BYTES = 100_000_000
_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def zip_bounds(fh: BinaryIO, size: int, max_bytes: int | None) -> None:
    """Refuse a torch.save zip whose members would inflate past MAX_INFLATION x the file (or the limit)."""
    fh.seek(0)
    if not zipfile.is_zipfile(fh):
        return  # torch's legacy format, or not a zip at all: torch.load says which
    fh.seek(0)
    try:
        with zipfile.ZipFile(fh) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise CheckpointRejected("load", f"not a readable torch.save file: {exc}") from exc
    inflated = sum(m.file_size for m in members)
    bound = min(MAX_INFLATION * size, max_bytes or MAX_INFLATION * size)
    if inflated > bound and members:
        big = max(members, key=lambda m: m.file_size)
        how = "stored" if big.compress_type == zipfile.ZIP_STORED else f"compressed {big.compress_size} bytes"
        raise CheckpointRejected(
            "load",
            f"members would inflate to {inflated} bytes from a file of {size} bytes (over {bound}); the largest, "
            f"{big.filename[:80]!r}, declares {big.file_size} bytes ({how}); torch.save does not compress",
        )
    fh.seek(0)


def _bad(why: str) -> CheckpointRejected:
    return CheckpointRejected("load", f"not a valid safetensors file: {why}")


def read_safetensors(fh: BinaryIO, size: int) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, each read into its own memory; the header is checked first."""
    fh.seek(0)
    head = fh.read(8)
    if len(head) < 8:
        raise _bad("shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", head)
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise _bad(f"header of {length} bytes does not fit in a file of {size} bytes")
    try:
        header = json.loads(fh.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise _bad("header is not a JSON object")
    header.pop("__metadata__", None)
    # By offsets alone: entries at one offset (empty tensors) are no error, and dtypes have no order.
    spans = sorted(((_entry(name, spec), name) for name, spec in header.items()), key=lambda e: e[0][:2])
    data_size, at = size - 8 - length, 0
    for (begin, end, _, _), name in spans:
        if begin != at:
            raise _bad(f"tensor {name[:80]!r} starts at {begin}, not at {at}: offsets overlap or leave gaps")
        at = end
    if at != data_size:
        raise _bad(f"tensors cover {at} bytes of the {data_size} after the header")
    tensors: dict[str, torch.Tensor] = {}
    for (begin, end, dtype, shape), name in spans:
        tensor = torch.empty(shape, dtype=dtype)
        if end > begin and fh.readinto(tensor.view(-1).view(torch.uint8).numpy()) != end - begin:  # type: ignore[attr-defined]
            raise _bad(f"file ended inside tensor {name[:80]!r}")
        tensors[name] = tensor
    return tensors


def _entry(name: str, spec: object) -> tuple[int, int, torch.dtype, list[int]]:
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise _bad(f"entry {name[:80]!r} is not {{dtype, shape, data_offsets}}")
    dtype = _DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
    if dtype is None:
        raise _bad(f"entry {name[:80]!r} has an unknown dtype {str(spec['dtype'])[:20]!r}")
    shape, offsets = spec["shape"], spec["data_offsets"]
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 1 << 62 for d in shape):
        raise _bad(f"entry {name[:80]!r} has a shape that is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise _bad(f"entry {name[:80]!r} has data_offsets that are not two positions")
    begin, end = offsets
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise _bad(f"entry {name[:80]!r} spans {end - begin} bytes, but {shape} of {spec['dtype']} is {nbytes}")
    return begin, end, dtype, shape
