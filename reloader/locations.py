"""Where things named in the config live: paths relative to the config file, a bucket prefix, the download cache."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo

# S3's bucket naming rules: 3-63 lower-case letters, digits, dots and hyphens, starting and ending alphanumeric.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class S3Location(BaseModel):
    """`s3://bucket/prefix/`: the objects directly under the prefix are the model's checkpoints."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bucket: str
    prefix: str  # "" or ending in "/"

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not _BUCKET.match(bucket):
            raise ValueError(f"{uri!r}: the bucket name must be 3-63 lower-case letters, digits, dots and hyphens")
        prefix = prefix.strip("/")
        return cls(bucket=bucket, prefix=f"{prefix}/" if prefix else "")

    def uri(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{name}"

    def __str__(self) -> str:
        return self.uri()


def default_cache_dir() -> Path:
    systemd = os.environ.get("CACHE_DIRECTORY")  # set by the unit's CacheDirectory= (':'-separated if several)
    if systemd:
        return Path(systemd.split(":")[0])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reloader"


def resolve_path(value: Any, info: ValidationInfo) -> Any:
    """Relative paths resolve against the config file's folder, not the working directory."""
    if value is None or not isinstance(value, (str, Path)):
        return value
    try:
        path = Path(value).expanduser()
    except RuntimeError as exc:  # "~user" for a user that does not exist
        raise ValueError(f"{str(value)!r}: {exc}") from None
    base = (info.context or {}).get("base_dir")
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    # Normalised without following links, so watcher events (reported under this path) compare equal.
    return Path(os.path.abspath(path))
