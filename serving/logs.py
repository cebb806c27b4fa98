"""The servers' logs: one JSON object per line on stderr, so a log collector needs no parsing rules."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

LOG = logging.getLogger("cartosplit.server")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; the fields passed to :func:`log_event` become keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "info") -> None:
    """Send the servers' logs to stderr as JSON lines (the CLI calls this; a library user may not want it)."""
    logger = logging.getLogger("cartosplit")
    if not any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


def log_event(level: int, event: str, exc_info: bool = False, **fields: object) -> None:
    """Log ``event`` with ``fields`` as JSON keys."""
    LOG.log(level, event, extra={"fields": fields}, exc_info=exc_info)


def short_id(request_id: str) -> str:
    """Request ids are client-chosen: cap what reaches the logs."""
    return request_id[:64]
