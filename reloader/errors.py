"""The few named exceptions; they are turned into log lines, HTTP errors and exit codes at the edges."""

from __future__ import annotations


class ReloaderError(Exception):
    """Base class for every error reloader raises on purpose."""


class ConfigError(ReloaderError):
    """The config file is missing, unreadable, not YAML, or does not fit the schema."""


class UnsafeEnvironment(ReloaderError):
    """The process environment would make checkpoint loading unsafe."""


class CheckpointRejected(ReloaderError):
    """A checkpoint failed one check of the validation gate."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(f"{check}: {reason}")
        self.check = check
        self.reason = reason


class CheckpointIncomplete(CheckpointRejected):
    """The file changed while it was read: it is still being written, so it is retried, not rejected."""


class InvalidImage(ReloaderError):
    """A request body (or a warm-up file) is not an image that can be decoded."""
