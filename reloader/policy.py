"""Which file should serve: a pure function of what the source lists, what serves, the pin, and what is known.

"Policies should be entirely stateless and idempotent" (TF Serving, aspired_version_policy.h): `plan` reads
no files and keeps no state. The worker calls it, carries out the one action it returns (hash a file whose
content may have changed, or have the gate judge one), records the result, and calls it again, until it
returns Settled: the statuses and error that the status listing shows.

The rules:
- Newest first (version, then modification time). A live version bounds the search: older files are
  standby, unless its file was deleted, the pin moved off its version, or the model's definition changed
  (then every file is judged again under the new one).
- `version: N` pins: only files of version N may serve; `latest` follows the newest valid file.
- A file still arriving is incomplete, never judged. A file whose content was rejected stays rejected,
  without being judged again, until its content changes; one rejected by the signature check, until its
  content or its `.sig` changes (a `.sig` that lands later counts).
- A canary (a candidate shadowing live traffic) bounds the search like the live version: older files
  stay standby, a newer one is judged and replaces it.
- Deleting the live file falls back to the newest valid remaining file; with none, the version in memory
  keeps serving and the listing says its file was deleted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Literal

from .checkpoints import Candidate, too_large
from .config import ModelConfig
from .source import Listing

Pin = Literal["latest"] | int
Signature = tuple[int, int, int, str]


class FileStatus(str, Enum):
    LIVE = "live"  # the file the live version was loaded from
    STANDBY = "standby"  # not looked at: older than the live version, or off the pin
    INCOMPLETE = "incomplete"  # still being written; looked at again once settled
    REJECTED = "rejected"  # failed a check; not judged again until its content changes
    CANARY = "canary"  # passed the gate; shadows live traffic until its canary decides


class LiveFile(str, Enum):
    """What became of the file the live version was loaded from."""

    NONE = "none"  # nothing serves
    PRESENT = "present"
    DELETED = "deleted"  # the version keeps serving from memory unless an older file can take over
    REPLACED = "replaced"  # other content at the same path, which did not pass (the live one serves on)


@dataclass(frozen=True)
class Serving:
    """The live version, as the policy needs it."""

    path: Path
    version: int
    mtime_ns: int
    sha256: str
    current: bool  # loaded under the model definition now configured


@dataclass(frozen=True)
class Known:
    """What the worker's caches and this pass have established so far."""

    hashes: Mapping[Path, tuple[Signature, str]]  # sha256 of each path, valid while its signature holds
    rejected: Mapping[str, str]  # sha256 -> why that content was rejected
    judged: Mapping[Path, tuple[FileStatus, str | None]]  # files already settled by this pass
    # (sha256, candidate signature, which holds its .sig's identity) -> why the signature check rejected it
    unsigned: Mapping[tuple[str, Signature], str] = field(default_factory=dict)


@dataclass(frozen=True)
class Hash:
    """Hash this file: it was hashed before, but may have changed since."""

    candidate: Candidate


@dataclass(frozen=True)
class Judge:
    """Have the gate judge this file. `digest` is its hash before, when known, to compare after."""

    candidate: Candidate
    digest: str | None


@dataclass(frozen=True)
class Settled:
    """Nothing left to do in this pass: the status of every listed file, and what the listing should say."""

    files: tuple[tuple[Candidate, FileStatus, str | None], ...]  # newest first
    live_file: LiveFile
    error: str | None


Decision = Hash | Judge | Settled


def same_definition(a: ModelConfig, b: ModelConfig) -> bool:
    """Equal but for `version` and `canary`: a pin moves between files of one definition, and how a candidate
    is tried on live traffic does not change what the model is."""
    return a.model_copy(update={"version": b.version, "canary": b.canary}) == b


def plan(
    listing: Listing, live: Serving | None, pin: Pin, known: Known, canary: Serving | None = None, max_bytes: int = 0
) -> Decision:
    """The next thing to do, or Settled when there is none. A `canary` bounds the search as the live version
    does: older files wait for its decision (a newer file replaces it). A file over `max_bytes` (when set)
    is rejected without being read."""
    by_path = {c.path: c for c in listing.candidates}
    live_file = LiveFile.NONE
    if live is not None:
        cand = by_path.get(live.path)
        digest = None if cand is None else _digest(cand, known)
        if cand is not None and digest is None:
            return Hash(cand)
        live_file = (
            LiveFile.DELETED if cand is None else LiveFile.PRESENT if digest == live.sha256 else LiveFile.REPLACED
        )
    current = live is not None and live.current
    bound = None
    if live is not None and current and live_file is not LiveFile.DELETED and pin in ("latest", live.version):
        bound = (live.version, live.mtime_ns)
    statuses: dict[Path, tuple[FileStatus, str | None]] = {}
    for cand in listing.candidates:
        if pin != "latest" and cand.version != pin:
            continue
        if bound is not None and (cand.version, cand.mtime_ns) < bound:
            break
        if cand.path in known.judged:
            statuses[cand.path] = known.judged[cand.path]
            continue
        if cand.path in listing.arriving:
            statuses[cand.path] = (FileStatus.INCOMPLETE, listing.waiting.get(cand.path, "still being written"))
            continue
        if max_bytes and cand.size > max_bytes:
            statuses[cand.path] = (FileStatus.REJECTED, f"load: {too_large(cand.size, max_bytes)}")
            continue
        # A path never hashed goes straight to the gate, which hashes it as it loads: hashing it here too
        # would read the file twice on the way to going live. One hashed before is hashed again when its
        # signature changed, so a rejected file touched but unchanged is not judged again.
        entry = known.hashes.get(cand.path)
        if entry is not None and entry[0] != cand.signature:
            return Hash(cand)
        digest = None if entry is None else entry[1]
        if live is not None and current and digest == live.sha256 and cand.path == live.path:
            break
        if canary is not None and digest == canary.sha256 and cand.path == canary.path:
            statuses[cand.path] = (FileStatus.CANARY, None)
            break
        reason = None if digest is None else known.rejected.get(digest) or known.unsigned.get((digest, cand.signature))
        if reason is not None:
            statuses[cand.path] = (FileStatus.REJECTED, reason)
            continue
        return Judge(cand, digest)
    files = tuple((c, *_status(c, live, statuses)) for c in listing.candidates)
    return Settled(files, live_file, _error(listing, live, pin))


def _digest(cand: Candidate, known: Known) -> str | None:
    entry = known.hashes.get(cand.path)
    return entry[1] if entry is not None and entry[0] == cand.signature else None


def _status(
    cand: Candidate, live: Serving | None, statuses: Mapping[Path, tuple[FileStatus, str | None]]
) -> tuple[FileStatus, str | None]:
    if cand.path in statuses:
        return statuses[cand.path]
    if live is not None and cand.path == live.path:
        return (FileStatus.LIVE, None)
    return (FileStatus.STANDBY, None)


def _error(listing: Listing, live: Serving | None, pin: Pin) -> str | None:
    if live is not None and not live.current:
        return "the changed definition has no valid checkpoint yet; the previous definition keeps serving"
    if pin != "latest" and (live is None or live.version != pin):
        serving = "nothing serves" if live is None else f"version {live.version} keeps serving"
        return f"pinned version {pin} has no valid checkpoint; {serving}"
    if live is None and listing.error is None:
        return "no valid checkpoint" if listing.candidates else "no checkpoint files"
    return listing.error
