"""Checkpoints in S3-compatible object storage (AWS S3, MinIO, Ceph RGW, R2 ...), listed through boto3.

boto3's standard settings apply and the config holds no keys: credentials come from its usual chain
(environment, shared files, web identity on Kubernetes), the endpoint from AWS_ENDPOINT_URL, the region
from AWS_DEFAULT_REGION, retries from AWS_MAX_ATTEMPTS and AWS_RETRY_MODE.

Every `watch.poll_interval` the prefix is listed (paginated; objects directly under it, named as in a
folder). An object is known by its ETag, size and LastModified, so an unchanged one is downloaded once.
`fetch` downloads to a hidden temporary name in the model's cache folder (botocore checks the checksum S3
sends; the size is checked here), then renames it into place. An index beside the files says which object
each one holds, so a restart with the endpoint down serves the newest valid version in the cache.

While the endpoint cannot be listed, the last listing stands (or, at start, the cache's contents): the
live version keeps serving, and listing is retried with exponential backoff and jitter.

Where the model requires signatures, a checkpoint's signature is the object `<key>.sig` beside it: its
ETag is part of the candidate (a new .sig makes the checkpoint judged again), `fetch` downloads it (at
most MAX_SIG_BYTES of it) to `<file>.sig` beside the cached file, and a checkpoint listed without one is
incomplete for `settle_ms`, then judged (and rejected unsigned), as in a folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoints import Candidate, is_checkpoint_name, is_signature_name, parse_version
from .config import WatchConfig
from .errors import FetchFailed
from .events import CheckpointSeen, EventBus
from .locations import S3Location
from .settle import FileEvent
from .signing import MAX_SIG_BYTES, SIG_SUFFIX, UNSIGNED, SignatureWait, signature_path
from .source import Clock, Listing, Wake

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

INDEX = ".index.json"
MAX_BACKOFF_S = 30.0
CHUNK = 1 << 20
_HINTS = {
    "InvalidAccessKeyId": "the endpoint does not know this access key; check AWS_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": "the secret key does not match the access key; check AWS_SECRET_ACCESS_KEY",
    "AccessDenied": "the credentials may not list or read this prefix",
    "ExpiredToken": "the session token has expired",
    "NoSuchBucket": "the bucket does not exist",
    "PreconditionFailed": "the object changed since it was listed",
}


@dataclass(frozen=True)
class Entry:
    """What the index remembers of one cached file: the object it was downloaded from."""

    etag: str
    size: int
    mtime_ns: int


def why(exc: Exception) -> str:
    """One stable line for a boto3 failure: the same outage gives the same text on every poll."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return (
            "no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
            "or web identity (AWS_ROLE_ARN and AWS_WEB_IDENTITY_TOKEN_FILE)"
        )
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "unknown")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{code} (HTTP {status}): {_HINTS.get(code) or error.get('Message') or 'no message'}"
    if isinstance(exc, EndpointConnectionError):
        return f"cannot reach the endpoint: {exc}"
    return f"{type(exc).__name__}: {exc}"


class BucketSource:
    """One model's prefix in a bucket, polled by its worker; downloads land in `cache_dir/<model>/`."""

    def __init__(
        self,
        model: str,
        where: S3Location,
        watch: WatchConfig,
        cache_dir: Path,
        keep: int,
        bus: EventBus,
        clock: Clock = time.monotonic,
    ) -> None:
        self.model = model
        self.where = where
        self.location = where.uri()
        self.folder = cache_dir / model
        self._interval = watch.poll_interval
        self._settle_s = watch.settle_ms / 1000.0
        self._keep = keep
        self._bus = bus
        self._clock = clock
        self._client: S3Client | None = None
        self._failures = 0
        self._next_poll = clock()  # list at once
        self._listed: tuple[Candidate, ...] | None = None  # the last listing that succeeded
        self._seen: dict[Path, float] = {}  # a new or changed object -> when a listing first showed it
        self._index: dict[str, Entry] = self._read_index()
        self._sigs: dict[str, str] = {}  # file name -> ETag of the .sig downloaded beside it
        self._unsigned = SignatureWait()

    # -- configuration and naming ------------------------------------------------------------------

    def subscribe(self, wake: Wake) -> None:
        pass  # nothing pushes news of a bucket: its worker polls on `next_poll`

    def configure(self, watch: WatchConfig, keep: int) -> None:
        self._interval, self._keep = watch.poll_interval, keep
        self._settle_s = watch.settle_ms / 1000.0

    def name(self, path: Path) -> str:
        return self.where.uri(path.name)

    # -- the source protocol -----------------------------------------------------------------------

    def listing(self, now: float, signed: bool = False) -> Listing:
        try:
            candidates = self._list(signed)
        except Exception as exc:  # boto3 raises botocore's and its own; every one is the source's error
            self._failures += 1
            delay = min(self._interval * 2**self._failures, max(self._interval, MAX_BACKOFF_S))
            self._next_poll = now + delay * random.uniform(0.5, 1.0)
            known = self._listed if self._listed is not None else self._cached()
            waiting = self._unsigned.hold(known if signed else (), frozenset(), now, self._settle_s)
            return Listing(known, frozenset(waiting), f"cannot list {self.location}: {why(exc)}", waiting)
        self._failures = 0
        self._next_poll = now + self._interval
        for cand in candidates:
            if cand.path not in self._seen and not self._holds(cand):
                self._seen[cand.path] = now
                self._bus.publish(CheckpointSeen(self.model, cand.path, FileEvent.LISTED, self.name(cand.path)))
        self._listed = candidates
        waiting = self._unsigned.hold(candidates if signed else (), frozenset(), now, self._settle_s)
        return Listing(candidates, frozenset(waiting), None, waiting)

    def arriving(self, now: float) -> frozenset[Path]:
        return frozenset()  # S3 lists an object only once its upload completed; downloads finish in `fetch`

    def fetch(self, candidate: Candidate) -> Path:
        """The object's bytes in the cache, downloading them unless the cache already holds this version
        (and, where signatures are required, its `.sig` beside them)."""
        if not self._holds(candidate):
            self._download(candidate)
        if candidate.sig:  # "": not required, or an offline start from the cache, whose .sig stays as it was
            self._fetch_signature(candidate)
        return candidate.path

    def _download(self, candidate: Candidate) -> None:
        name = candidate.path.name
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.folder / f".{name}.{uuid.uuid4().hex[:8]}.part"
        try:
            response = self._s3().get_object(
                Bucket=self.where.bucket, Key=self.where.prefix + name, IfMatch=candidate.tag, ChecksumMode="ENABLED"
            )
            got = 0
            with open(tmp, "xb") as out:
                for chunk in response["Body"].iter_chunks(CHUNK):
                    out.write(chunk)
                    got += len(chunk)
            if got != candidate.size:
                raise OSError(f"downloaded {got} bytes of the {candidate.size} listed")
            os.utime(tmp, ns=(candidate.mtime_ns, candidate.mtime_ns))
            os.replace(tmp, candidate.path)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            raise FetchFailed(f"cannot download {self.name(candidate.path)}: {why(exc)}") from exc
        self._index[name] = Entry(candidate.tag, candidate.size, candidate.mtime_ns)
        self._write_index()

    def _fetch_signature(self, candidate: Candidate) -> None:
        name, local = candidate.path.name, signature_path(candidate.path)
        if candidate.sig == UNSIGNED or self._sigs.get(name) != candidate.sig:
            local.unlink(missing_ok=True)  # never judge a checkpoint with a .sig its object no longer has
            self._sigs.pop(name, None)
        if candidate.sig == UNSIGNED or local.exists():
            return
        tmp = self.folder / f".{name}{SIG_SUFFIX}.{uuid.uuid4().hex[:8]}.part"
        key = self.where.prefix + name + SIG_SUFFIX
        try:
            response = self._s3().get_object(Bucket=self.where.bucket, Key=key, IfMatch=candidate.sig)
            with response["Body"] as body:
                tmp.write_bytes(body.read(MAX_SIG_BYTES + 1))  # a bigger one is cut there, and refused by the gate
            os.replace(tmp, local)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            raise FetchFailed(f"cannot download {self.where.uri(name + SIG_SUFFIX)}: {why(exc)}") from exc
        self._sigs[name] = candidate.sig

    def unchanged(self, candidate: Candidate) -> bool:
        return self._holds(candidate)

    def next_due(self) -> float | None:
        return self._unsigned.next_due()  # nothing is half-arrived (see `arriving`), but a .sig may be awaited

    def next_poll(self) -> float | None:
        return self._next_poll

    def retry(self, path: Path, now: float, after_s: float | None = None) -> None:
        pass  # the next listing looks again

    def take_arrival(self, path: Path) -> float | None:
        return self._seen.pop(path, None)

    def keep(self, live: Path | None) -> None:
        """Evict cached files: those whose object is gone, then all but the newest `cache_keep`.

        The live version's file always stays (it counts as one of those kept)."""
        listed = None if self._listed is None else {c.path.name for c in self._listed}
        ranked = sorted(self._index.items(), key=lambda item: (parse_version(item[0]), item[1].mtime_ns), reverse=True)
        room = self._keep - (live is not None and live.parent == self.folder and live.name in self._index)
        evicted = False
        for name, _ in ranked:
            if self.folder / name == live:
                continue
            if (listed is None or name in listed) and room > 0:
                room -= 1
                continue
            (self.folder / name).unlink(missing_ok=True)
            signature_path(self.folder / name).unlink(missing_ok=True)
            self._sigs.pop(name, None)
            del self._index[name]
            evicted = True
        if evicted:
            self._write_index()

    # -- helpers -----------------------------------------------------------------------------------

    def _s3(self) -> S3Client:
        if self._client is None:
            import boto3
            from botocore.config import Config

            config = Config(connect_timeout=5, read_timeout=60, user_agent_extra="reloader")
            self._client = boto3.session.Session().client("s3", config=config)
        return self._client

    def _list(self, signed: bool) -> tuple[Candidate, ...]:
        prefix = self.where.prefix
        sigs: dict[str, str] = {}  # checkpoint name -> its .sig's ETag
        pages = self._s3().get_paginator("list_objects_v2").paginate(
            Bucket=self.where.bucket, Prefix=prefix, Delimiter="/"
        )
        found = []
        for page in pages:
            for obj in page.get("Contents", ()):
                name = obj["Key"][len(prefix) :]
                if "\0" in name:
                    continue
                if signed and is_signature_name(name):
                    sigs[name[: -len(SIG_SUFFIX)]] = obj["ETag"]
                if not is_checkpoint_name(name):
                    continue
                mtime_ns = int(obj["LastModified"].timestamp() * 1e9)
                found.append(
                    Candidate(parse_version(name), mtime_ns, self.folder / name, obj["Size"], 0, obj["ETag"])
                )
        if signed:
            found = [replace(c, sig=sigs.get(c.path.name, UNSIGNED)) for c in found]
        return tuple(sorted(found, reverse=True))

    def _holds(self, candidate: Candidate) -> bool:
        """The cache holds this very object: same ETag, size and LastModified, and the file is there."""
        entry = self._index.get(candidate.path.name)
        if entry != Entry(candidate.tag, candidate.size, candidate.mtime_ns):
            return False
        try:
            return candidate.path.stat().st_size == candidate.size
        except OSError:
            return False

    def _cached(self) -> tuple[Candidate, ...]:
        """The cache's files as candidates: what serves at start while the endpoint cannot be listed."""
        found = [
            Candidate(parse_version(name), e.mtime_ns, self.folder / name, e.size, 0, e.etag)
            for name, e in self._index.items()
        ]
        return tuple(sorted((c for c in found if self._holds(c)), reverse=True))

    def _read_index(self) -> dict[str, Entry]:
        """The index, when it was written for this same location; files of another location are dropped."""
        with contextlib.suppress(OSError):
            for stale in self.folder.glob(".*.part"):  # downloads cut short by a crash
                stale.unlink(missing_ok=True)
        try:
            data: dict[str, Any] = json.loads((self.folder / INDEX).read_text())
            if data.get("location") == self.location:
                return {name: Entry(**entry) for name, entry in data["files"].items() if is_checkpoint_name(name)}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            pass
        with contextlib.suppress(OSError):
            for old in self.folder.iterdir():
                if is_checkpoint_name(old.name) or is_signature_name(old.name):
                    old.unlink()
        return {}

    def _write_index(self) -> None:
        data = {"location": self.location, "files": {name: asdict(entry) for name, entry in self._index.items()}}
        tmp = self.folder / f"{INDEX}.{uuid.uuid4().hex[:8]}.part"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.folder / INDEX)
