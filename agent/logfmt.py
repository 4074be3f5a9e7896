"""Log output for the agent and the CLI: `text` (one line: time, level, logger, message) or
`json` (one JSON object a line: ts, level, logger, msg, and exc when there is a traceback), for
log shippers that parse fields instead of guessing them.

Levels mean what they say: INFO for what a healthy agent does (start-up, a model going live,
an install committed, shutdown), WARNING for what an operator should look at (answering from
the fallback rules, a failed install, no model to serve), ERROR for what failed.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

__all__ = ["FORMATS", "LEVELS", "JsonFormatter", "configure"]


class JsonFormatter(logging.Formatter):
    """One JSON object per record; `ts` is UTC, RFC 3339 with milliseconds."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        doc = {"ts": f"{ts}.{int(record.msecs):03d}Z", "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def configure(level: str = "info", fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Send every log record at `level` or above to `stream` (stderr) in format `fmt`."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
