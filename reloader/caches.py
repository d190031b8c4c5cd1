"""What one model's worker remembers between passes: file hashes and rejected contents, and their eviction."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from .checkpoints import Candidate, sha256_file
from .policy import FileStatus, Known, Signature
from .signing import is_signature_reason


class CheckpointCache:
    """sha256 by path (valid while the file's signature holds) and rejection reasons by sha256.

    A rejection by the signature check is kept by (sha256, signature) instead, and the candidate's
    signature holds its `.sig`'s identity: the same content with another `.sig` is judged again.

    Only the worker's thread touches it. Both shrink with the folder: a daemon that sees thousands of
    checkpoints come and go stays the same size."""

    def __init__(self) -> None:
        self._hashes: dict[Path, tuple[Signature, str]] = {}
        self._rejected: dict[str, str] = {}
        self._unsigned: dict[tuple[str, Signature], str] = {}

    def known(self, judged: Mapping[Path, tuple[FileStatus, str | None]]) -> Known:
        """A view for the policy, with what this pass has judged so far."""
        return Known(self._hashes, self._rejected, judged, self._unsigned)

    def digest(self, path: Path) -> str | None:
        entry = self._hashes.get(path)
        return None if entry is None else entry[1]

    def hash(self, candidate: Candidate, local: Path) -> str:
        """Read `local` (the candidate's file, fetched) and remember its sha256 under the signature the
        candidate was listed with. OSError if gone."""
        digest = sha256_file(local)
        self.remember(candidate, digest)
        return digest

    def remember(self, candidate: Candidate, digest: str) -> None:
        self._hashes[candidate.path] = (candidate.signature, digest)

    def reject(self, digest: str, reason: str) -> None:
        if not is_signature_reason(reason):
            self._rejected[digest] = reason
            return
        # The worker remembered the judged candidate's hash (under its signature) before rejecting it.
        for signature, known in self._hashes.values():
            if known == digest:
                self._unsigned[(digest, signature)] = reason

    def forget_rejections(self) -> None:
        """The model's definition changed: a file rejected under the old one may fit the new one."""
        self._rejected.clear()
        self._unsigned.clear()

    def keep_only(self, paths: Iterable[Path]) -> None:
        """Forget files that are gone, and rejections of contents no remaining file has."""
        present = set(paths)
        self._hashes = {p: h for p, h in self._hashes.items() if p in present}
        digests = {digest for _, digest in self._hashes.values()}
        self._rejected = {d: r for d, r in self._rejected.items() if d in digests}
        current = {(digest, signature) for signature, digest in self._hashes.values()}
        self._unsigned = {k: r for k, r in self._unsigned.items() if k in current}
