"""Checkpoint files: which names count, their version numbers, their identity, and safe loading."""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .errors import CheckpointIncomplete, CheckpointRejected, UnsafeEnvironment
from .files import open_for_writing, open_regular
from .formats import read_safetensors, zip_bounds
from .signing import SIG_SUFFIX, sig_identity

SUFFIXES = (".pt", ".pth", ".safetensors")
IGNORED_SUFFIXES = (".tmp", ".part", "~")
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# DataParallel and torch.compile prefix every key with these.
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
_NUMBER = re.compile(r"\d+")


def check_environment() -> None:
    """Refuse to run where torch.load would silently unpickle arbitrary objects."""
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        raise UnsafeEnvironment(
            "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set, which makes torch.load run arbitrary pickles; unset it"
        )


def is_checkpoint_name(name: str) -> bool:
    """Hidden files, temporaries of rsync/editors/downloads and other suffixes are never candidates."""
    return not name.startswith(".") and not name.endswith(IGNORED_SUFFIXES) and name.endswith(SUFFIXES)


def is_signature_name(name: str) -> bool:
    """A checkpoint's signature file, `<checkpoint name>.sig` (never a candidate itself)."""
    return name.endswith(SIG_SUFFIX) and is_checkpoint_name(name[: -len(SIG_SUFFIX)])


def parse_version(name: str) -> int:
    """The last number in the file's stem: shapes-v12.pt is 12, epoch_003.pt is 3; no number is 0."""
    numbers = _NUMBER.findall(Path(name).stem)
    return int(numbers[-1]) if numbers else 0


@dataclass(frozen=True, order=True)
class Candidate:
    """One checkpoint file as seen by a scan. Ordering is rank: version, then modification time."""

    version: int
    mtime_ns: int
    path: Path
    size: int
    inode: int
    tag: str = ""  # an object's ETag, for a bucket's candidates
    sig: str = ""  # where signatures are required: its .sig's identity, or signing.UNSIGNED when there is none

    @property
    def signature(self) -> tuple[int, int, int, str]:
        """Changes whenever the file's content (or its .sig) may have changed; the sha256 decides if it did."""
        return (self.inode, self.size, self.mtime_ns, f"{self.tag} sig {self.sig}" if self.sig else self.tag)


def stat_candidate(path: Path, signed: bool = False) -> Candidate | None:
    """The candidate at `path`; with `signed`, its .sig's identity too (see signing.sig_identity)."""
    try:
        st = path.stat(follow_symlinks=False)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or not is_checkpoint_name(path.name):
        return None
    sig = sig_identity(path) if signed else ""
    return Candidate(parse_version(path.name), st.st_mtime_ns, path, st.st_size, st.st_ino, sig=sig)


def scan(folder: Path, signed: bool = False) -> list[Candidate]:
    """Every candidate in the folder, newest first."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    found = (stat_candidate(folder / name, signed) for name in names)
    return sorted((c for c in found if c is not None), reverse=True)


def sha256_file(path: Path) -> str:
    with open_regular(path, follow_links=False) as fh:
        return hash_open_file(fh)


def hash_open_file(fh: BinaryIO, size: int | None = None) -> str:
    """The sha256 of what the descriptor reads: up to `size` bytes where given (see open_checkpoint)."""
    digest = hashlib.sha256()
    left = math.inf if size is None else size
    while left > 0 and (block := fh.read(int(min(1 << 20, left)))):
        digest.update(block)
        left -= len(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class LoadedCheckpoint:
    state_dict: dict[str, torch.Tensor]
    sha256: str
    size: int
    mtime_ns: int


def _unwrap(obj: object) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointRejected("load", f"not a state_dict: the file holds a {type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointRejected("load", f"not a state_dict: entries that are not tensors: {', '.join(bad[:5])}")
    return obj


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    def strip(key: str) -> str:
        while key.startswith(STRIPPED_PREFIXES):
            key = key.split(".", 1)[1]
        return key

    return {strip(k): v for k, v in state_dict.items()}


def _deserialize(fh: BinaryIO, suffix: str, size: int, max_bytes: int | None) -> object:
    if suffix == ".safetensors":
        return read_safetensors(fh, size)
    zip_bounds(fh, size, max_bytes)
    try:
        # weights_only refuses any pickle that would build objects other than tensors and containers.
        return torch.load(fh, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise CheckpointRejected(
            "load", f"pickle refused by the weights_only loader: {_unpickling_detail(exc)}"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError) as exc:
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise CheckpointRejected("load", f"not a readable torch.save file: {detail}") from exc


_TORCH_ADVICE = (
    "Weights only load failed",
    "In PyTorch 2.6",
    "Re-running",
    "Do it only if",
    "Please use",
    "Please file",
    "Check the documentation",
    "This file can still be loaded",
    "Alternatively",
)


def _unpickling_detail(exc: Exception) -> str:
    # torch wraps the useful part ("Unsupported global: GLOBAL io.open", "Unsupported operand 120") in advice.
    text = " ".join(str(exc).replace("\x1b[1m", "").replace("\x1b[0m", "").split())
    text = text.split("WeightsUnpickler error:", 1)[-1]
    for trailing in ("Check the documentation", "Please use"):
        text = text.split(trailing, 1)[0]
    sentences = re.split(r"(?<=[.:])\s+", text)
    kept = [s for s in sentences if s and not any(advice in s for advice in _TORCH_ADVICE)]
    return " ".join(kept).strip() or type(exc).__name__


def too_large(size: int, limit: int) -> str:
    return f"{size} bytes, over max_checkpoint_bytes ({limit})"


@dataclass(frozen=True)
class OpenCheckpoint:
    """A checkpoint opened and hashed, not yet parsed: the load parses through this same descriptor."""

    path: Path
    fh: BinaryIO
    before: os.stat_result  # taken before the hash
    sha256: str

    def changing(self) -> bool:
        """The file changed since `before` (through the descriptor, or at its path)."""
        try:
            return _changed(self.before, os.fstat(self.fh.fileno())) or _still_changing(self.path, self.before)
        except OSError:
            return True

    def close(self) -> None:
        self.fh.close()


def open_checkpoint(path: Path, max_bytes: int | None = None) -> OpenCheckpoint:
    """Open a checkpoint (a regular file, links refused) and hash it; the caller parses or closes it."""
    try:
        fh = open_regular(path, follow_links=False)
    except OSError as exc:
        raise CheckpointRejected("load", f"cannot read file: {exc.strerror}") from exc
    try:
        if open_for_writing(fh):
            # However long the writer pauses, a file it still holds open is not finished: judge it at its close.
            raise CheckpointIncomplete("load", "file is still open for writing by another process")
        before = os.fstat(fh.fileno())
        if max_bytes is not None and before.st_size > max_bytes:
            raise CheckpointRejected("load", too_large(before.st_size, max_bytes))
        # No more than the size it had when opened: a file someone appends to without end is not read
        # without end. If it grew meanwhile, its size and mtime differ at the load's check: incomplete.
        return OpenCheckpoint(path, fh, before, hash_open_file(fh, before.st_size))
    except OSError as exc:
        fh.close()
        raise CheckpointRejected("load", f"cannot read file: {exc.strerror}") from exc
    except BaseException:
        fh.close()
        raise


def load_checkpoint(path: Path, max_bytes: int | None = None, opened: OpenCheckpoint | None = None) -> LoadedCheckpoint:
    """Hash and deserialize one open file; if it did not change meanwhile, the hash is of what loaded.

    Streaming through one file descriptor, rather than reading the file into memory first, keeps the
    peak during a swap near one copy of the model: the tensors, not the tensors plus the file's bytes.
    `opened` is the file already opened and hashed (by the signature check, which compared that hash with
    the signed one): it is parsed through that descriptor, and closed.
    """
    check_environment()
    if opened is None:
        opened = open_checkpoint(path, max_bytes)
    before = opened.before
    with opened.fh as fh:
        try:
            fh.seek(0)
            try:
                obj = _deserialize(fh, path.suffix, before.st_size, max_bytes)
            except CheckpointRejected as exc:
                if _changed(before, os.fstat(fh.fileno())) or _still_changing(path, before):
                    raise CheckpointIncomplete("load", f"file is still being written ({exc.reason})") from exc
                raise
            after = os.fstat(fh.fileno())
        except OSError as exc:
            raise CheckpointRejected("load", f"cannot read file: {exc.strerror}") from exc
    if _changed(before, after):
        raise CheckpointIncomplete("load", "file changed while it was read; it is still being written")
    state_dict = _strip_prefixes(_unwrap(obj))
    return LoadedCheckpoint(state_dict, opened.sha256, after.st_size, after.st_mtime_ns)


def _changed(before: os.stat_result, after: os.stat_result) -> bool:
    # ctime too: a writer can set size and mtime back (truncate, utime), never ctime.
    fields = ("st_size", "st_mtime_ns", "st_ctime_ns")
    return tuple(getattr(before, f) for f in fields) != tuple(getattr(after, f) for f in fields)


def _still_changing(path: Path, seen: os.stat_result) -> bool:
    try:
        now = path.stat()
    except OSError:
        return True
    return (now.st_size, now.st_mtime_ns, now.st_ino) != (seen.st_size, seen.st_mtime_ns, seen.st_ino)
