"""Logging: one line per event that matters, readable by people or, with --log-format json, by shippers."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

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
