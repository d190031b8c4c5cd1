"""Logging: one line per event that matters, readable by people or, with --log-format json, by shippers."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

from .events import (
    CheckpointJudged,
    CheckpointSeen,
    ConfigApplied,
    ConfigRejected,
    Event,
    Outcome,
    ReloadFailed,
    SourceStatus,
)
from .files import shown

# Named as before the reload core was split, so log filters on the logger name keep working.
_checkpoint_log = logging.getLogger("reloader.jobs")
_config_log = logging.getLogger("reloader.supervisor")
# uvicorn attaches an ANSI-coloured copy of some messages; JSON consumers want the plain one only.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


class _ShutdownRace(logging.Filter):
    """watchdog 7 logs an ERROR when stop() closes the inotify fd while its thread is still in read():
    a harmless race on stop or unschedule, which would read as a fault of ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `extra=` fields come along as keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(fmt: str = "text", level: str = "INFO", access_log: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = not access_log
    # watchdog logs every inotify event at DEBUG; keep it out of the daemon's INFO stream.
    logging.getLogger("watchdog").setLevel(max(logging.INFO, root.level))
    inotify = logging.getLogger("watchdog.observers.inotify")
    if not any(isinstance(f, _ShutdownRace) for f in inotify.filters):
        inotify.addFilter(_ShutdownRace())
    # Python warnings (torch's among them) would otherwise be bare stderr text between JSON lines.
    logging.captureWarnings(True)


def log_event(event: Event) -> None:
    """A bus subscriber: one log line per event (two for a swap: validated, then live)."""
    if isinstance(event, CheckpointSeen):
        _checkpoint_log.info(
            "model %s: checkpoint %s seen (%s)",
            event.model,
            shown(event.path.name),
            event.how.value,
            extra={"event": "checkpoint_seen", "model": event.model, "file": event.file, "how": event.how.value},
        )
    elif isinstance(event, CheckpointJudged):
        _log_judged(event)
    elif isinstance(event, ReloadFailed):
        pass  # logged with its traceback where it happened
    elif isinstance(event, SourceStatus):
        fields = {"event": "source_error", "model": event.model, "source": event.location, "error": event.error}
        if event.error is None:
            _checkpoint_log.info("model %s: %s can be read again", event.model, event.location, extra=fields)
        else:
            _checkpoint_log.warning("model %s: %s", event.model, event.error, extra=fields)
    elif isinstance(event, ConfigApplied):
        config = event.config
        _config_log.info(
            "config loaded from %s: models %s",
            config.path,
            ", ".join(config.models) or "(none)",
            extra={"event": "config_loaded", "config": str(config.path), "models": list(config.models)},
        )
    elif isinstance(event, ConfigRejected):
        _config_log.error(
            "config rejected, the running config stays: %s",
            event.error,
            extra={"event": "config_rejected", "config": str(event.path), "error": event.error},
        )


def _log_judged(event: CheckpointJudged) -> None:
    fields = {"model": event.model, "file": event.report.path, "sha256": event.sha256}
    file = shown(event.path.name)
    if event.outcome is Outcome.REJECTED:
        fields |= {"event": "checkpoint_rejected", "reason": event.reason}
        _checkpoint_log.warning("model %s: rejected %s: %s", event.model, file, event.reason, extra=fields)
    if event.outcome not in (Outcome.SWAPPED, Outcome.CANARY):
        return
    checks = {c.name: c.ms for c in event.report.checks}
    if event.reason is None:  # not a canary's promotion: its validation was logged when its canary started
        _checkpoint_log.info(
            "model %s: %s passed validation (%s)",
            event.model,
            file,
            ", ".join(f"{name} {ms:.0f} ms" for name, ms in checks.items()),
            extra={**fields, "event": "checkpoint_validated", "timings_ms": checks},
        )
    if event.outcome is Outcome.CANARY:
        _checkpoint_log.info(
            "model %s: version %s is the canary (%s): it shadows live traffic until its canary decides",
            event.model,
            event.version,
            file,
            extra={**fields, "event": "canary_started", "version": event.version},
        )
        return
    since = event.since_detected_ms
    promoted = "" if event.reason is None else f", promoted by its {event.reason}"
    _checkpoint_log.info(
        "model %s: version %s live (%s, sha256 %s) in %.0f ms%s, replacing %s%s",
        event.model,
        event.version,
        file,
        (event.sha256 or "")[:12],
        event.report.total_ms,
        "" if since is None else f", {since:.0f} ms after it was seen",
        "nothing" if event.previous_version is None else f"version {event.previous_version}",
        promoted,
        extra={
            **fields,
            "event": "checkpoint_swapped",
            "version": event.version,
            "previous_version": event.previous_version,
            "timings_ms": event.timings_ms(),
            "canary": event.reason,
        },
    )
