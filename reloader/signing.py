"""Signed checkpoints: a model with `signature:` serves only files signed with its key (OpenSSF model-signing).

A checkpoint `NAME` is signed by `NAME.sig` beside it: a Sigstore bundle made by `model_signing sign key`
(or its Python API) over that one file, whose DSSE payload, signed with an elliptic-curve private key,
records the file's name and sha256. Here:

- the config names the public key; it is read and checked when the config loads (`SignatureConfig`);
- a source lists each checkpoint with the identity of its `.sig` (none, or inode/size/mtime, or an ETag),
  and holds a checkpoint whose `.sig` has not come as incomplete for `settle_ms` (`SignatureWait`);
- the gate's first check (`SignatureCheck`) reads the `.sig` once, verifies it with the key, and compares
  the signed sha256 with the sha256 of the file, hashed through the very descriptor the load then parses.

Nothing here imports torch, or model-signing until a model asks for signatures.
"""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pydantic import BaseModel, ConfigDict, ValidationInfo, model_validator

from .errors import CheckpointIncomplete, CheckpointRejected, ConfigError
from .files import open_regular, shown
from .locations import resolve_path

if TYPE_CHECKING:
    from model_signing._signing.sign_ec_key import Verifier

SIG_SUFFIX = ".sig"
UNSIGNED = "none"  # a candidate's `sig` when signatures are required and its .sig is not there
CHECK = "signature"  # the gate's check, and the prefix of every reason it gives
MAX_SIG_BYTES = 1 << 20  # a key-signed bundle is about 1.4 kB: anything this big is not one
MAX_KEY_BYTES = 64 << 10


def signature_path(path: Path) -> Path:
    """Where the signature of the checkpoint at `path` lies: `shapes-v3.pt` -> `shapes-v3.pt.sig`."""
    return path.with_name(path.name + SIG_SUFFIX)


def sig_identity(path: Path) -> str:
    """What makes the checkpoint's `.sig` another one: its inode, size and mtime; UNSIGNED when none is there.

    Folded into the candidate's signature, a `.sig` that lands, goes or changes makes the checkpoint
    "changed", so a file rejected for its signature is judged again with the new one."""
    try:
        st = signature_path(path).stat(follow_symlinks=False)
    except OSError:
        return UNSIGNED
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}" if stat.S_ISREG(st.st_mode) else UNSIGNED


def is_signature_reason(reason: str) -> bool:
    """A rejection by the signature check: it says nothing of the content once another .sig lands."""
    return reason.startswith(CHECK + ":")


# -- the config ------------------------------------------------------------------------------------


class SignatureConfig(BaseModel):
    """`signature: {public_key: keys/release.pub}`; `key_sha256` is read from the key file, never written.

    A key file that cannot be read, or that model-signing's key verifier refuses, is a config error; a new
    key (after a config reload) is a new model definition: every checkpoint is judged again with it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    public_key: Path
    key_sha256: str

    @model_validator(mode="before")
    @classmethod
    def _read_key(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        if not isinstance(data.get("public_key"), (str, Path)):
            raise ValueError("public_key is required: the path of the PEM public key to verify with")
        if "key_sha256" in data:
            raise ValueError("key_sha256 is read from the public key file, not given")
        path = resolve_path(data["public_key"], info)
        return {**data, "public_key": path, "key_sha256": key_verifier(path)[1]}


def key_verifier(path: Path, expect_sha256: str | None = None) -> tuple[Verifier, str]:
    """model-signing's verifier for the elliptic-curve public key in `path`, and the sha256 of the file.

    ValueError naming the file when it cannot be read, is not a key the verifier takes, or (with
    `expect_sha256`) is not the key the config was loaded with."""
    what = f"public key {shown(path)!r}"
    try:
        with open_regular(path, follow_links=True) as fh:  # a ConfigMap's key is a link; /dev/zero is refused
            data = fh.read(MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"{what} cannot be read: {exc.strerror or exc}") from exc
    if len(data) > MAX_KEY_BYTES:
        raise ValueError(f"{what} is over {MAX_KEY_BYTES} bytes: not a PEM public key")
    digest = hashlib.sha256(data).hexdigest()
    if expect_sha256 is not None and digest != expect_sha256:
        raise ValueError(f"{what} changed since the config was loaded; reload the config (SIGHUP) to use it")
    from model_signing._signing.sign_ec_key import Verifier

    try:
        return Verifier(path), digest
    except Exception as exc:  # cryptography's ValueError, TypeError or UnsupportedAlgorithm, the library's own
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ValueError(
            f"{what} is not a PEM elliptic-curve public key (P-256, P-384 or P-521) that model-signing "
            f"verifies with: {detail}"
        ) from exc


# -- the source's side: a checkpoint waits for its .sig --------------------------------------------


class SignatureWait:
    """Holds a settled checkpoint without its `.sig` as incomplete for `wait_s`, then lets the gate reject it.

    The wait runs from the first listing that found the file settled (the end of its own settle time),
    and starts again when the file changes. Not thread-safe: its source calls it under its own lock."""

    def __init__(self) -> None:
        self._since: dict[Path, tuple[tuple[int, int, int, str], float]] = {}  # path -> (identity, deadline)
        self._pending: list[float] = []

    def hold(self, candidates: Iterable[Any], arriving: frozenset[Path], now: float, wait_s: float) -> dict[Path, str]:
        """The candidates (checkpoints.Candidate) still waiting for their `.sig`, each with why."""
        since: dict[Path, tuple[tuple[int, int, int, str], float]] = {}
        held: dict[Path, str] = {}
        for cand in candidates:
            if cand.sig != UNSIGNED or cand.path in arriving:
                continue
            identity = (cand.inode, cand.size, cand.mtime_ns, cand.tag)
            before = self._since.get(cand.path)
            deadline = before[1] if before is not None and before[0] == identity else now + wait_s
            since[cand.path] = (identity, deadline)
            if deadline > now:
                held[cand.path] = f"{CHECK}: waiting for {shown(cand.path.name)}{SIG_SUFFIX}"
        self._since = since
        self._pending = [deadline for path, (_, deadline) in since.items() if path in held]
        return held

    def next_due(self) -> float | None:
        """When a held checkpoint's wait ends (and a pass should reject it); None when none is held."""
        return min(self._pending, default=None)


# -- the gate's side: the check ----------------------------------------------------------------------


@dataclass(frozen=True)
class Signed:
    """What a verified signature covers: one file, by the name it was signed under and its sha256."""

    name: str
    sha256: str


class _Text:
    """The `.sig`'s text, read once (bounded, links refused), for the library's reader instead of a path it
    would open again: what is verified is what was read."""

    def __init__(self, text: str) -> None:
        self._text = text

    def read_text(self, encoding: str = "utf-8") -> str:
        return self._text


class SignatureCheck:
    """The gate's `signature` check for one model definition, with the key read once when it is built."""

    def __init__(self, model: str, spec: SignatureConfig) -> None:
        self.spec = spec
        try:
            self._verifier = key_verifier(spec.public_key, spec.key_sha256)[0]
        except ValueError as exc:
            raise ConfigError(f"models.{model}.signature.public_key: {exc}") from exc

    def verify(self, path: Path) -> Signed:
        """Read and verify `path`'s `.sig`: signed with this key, over this one file. Reads none of `path`."""
        from model_signing._signing.sign_sigstore_pb import Signature

        sig = shown(signature_path(path).name)
        try:
            with open_regular(signature_path(path), follow_links=False) as fh:
                data = fh.read(MAX_SIG_BYTES + 1)
        except FileNotFoundError:
            raise CheckpointRejected(CHECK, f"no {sig} beside the file") from None
        except OSError as exc:
            raise CheckpointRejected(CHECK, f"cannot read {sig}: {exc.strerror or exc}") from exc
        if len(data) > MAX_SIG_BYTES:
            raise CheckpointRejected(CHECK, f"{sig} is over {MAX_SIG_BYTES} bytes: not a model-signing signature")
        try:
            bundle = Signature.read(cast(Path, _Text(data.decode("utf-8"))))
        except Exception as exc:  # JSON, UTF-8, missing keys, a bundle that does not parse: all mean garbage
            raise CheckpointRejected(CHECK, f"{sig} is not a model-signing signature: {_detail(exc)}") from exc
        key = shown(self.spec.public_key.name)
        try:
            manifest = self._verifier.verify(bundle)
        except Exception as exc:  # cryptography's InvalidSignature, the library's ValueErrors, a malformed bundle
            if "Key mismatch" in str(exc):
                raise CheckpointRejected(CHECK, f"{sig} was signed with another key than {key}") from exc
            if type(exc).__name__ == "InvalidSignature":
                detail = "signed with another key, or altered after signing"
                raise CheckpointRejected(CHECK, f"{sig} does not verify with {key}: {detail}") from exc
            raise CheckpointRejected(CHECK, f"{sig} does not verify with {key}: {_detail(exc)}") from exc
        return self._single_file(manifest, path, sig)

    def _single_file(self, manifest: Any, path: Path, sig: str) -> Signed:
        method = manifest.serialization_type.get("method")
        items = list(manifest.resource_descriptors())
        if method != "files" or len(items) != 1 or items[0].identifier != ".":
            what = f"{method} of {len(items)} item(s)" if method == "files" else f"{method} serialization"
            raise CheckpointRejected(CHECK, f"{sig} signs a folder or shards ({what}), not this one file")
        digest = items[0].digest
        if digest.algorithm != "sha256":
            raise CheckpointRejected(CHECK, f"{sig} was hashed with {digest.algorithm}; sign with sha256 (the default)")
        # The version is read from the name: a signed epoch001.pt renamed to epoch999.pt must not outrank.
        if manifest.model_name != path.name:
            named = shown(manifest.model_name)
            raise CheckpointRejected(CHECK, f"{sig} signs a file named {named!r}, not {shown(path.name)!r}")
        return Signed(manifest.model_name, digest.digest_hex)

    def match(self, signed: Signed, path: Path, sha256: str, changing: Callable[[], bool]) -> str:
        """Compare the signed sha256 with the file's, hashed through the descriptor the load will parse.

        Why this way, and not the library's `verify(model, sig)`: that hashes the file by its path, and the
        load would open it again, so a file swapped in between would load unverified. Here the file is opened
        once, hashed once, compared with the signed digest, and then parsed through the same descriptor: a
        file renamed over the path meanwhile is not what that descriptor reads, and a rewrite in place
        before the parse ends changes its size, mtime or ctime (which no one can set back), so the load
        retries it as incomplete instead of passing it."""
        if sha256 == signed.sha256:
            return f"signed with {shown(self.spec.public_key.name)}; sha256 {sha256[:12]} as signed"
        if changing():
            raise CheckpointIncomplete(CHECK, "file is still being written (its sha256 is not the signed one yet)")
        raise CheckpointRejected(
            CHECK, f"the file changed after it was signed: sha256 {sha256[:12]}, signed {signed.sha256[:12]}"
        )


def _detail(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__
