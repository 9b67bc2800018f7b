"""Logging of the daemons as `[logging]` asks: a level, stderr or not, a file or not, and
plain text or JSON lines (`ts`, `level`, `logger`, `msg`, and where they apply `run_id`,
`symbol`, `node`, `attempt`, passed as `extra=` by the code that logs)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from .secrets import RedactingFormatter, redact_text

CONTEXT_FIELDS = ("run_id", "symbol", "node", "attempt")
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object a line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            # Redacted: a line quoting `password=...` or a value the worker resolved as a
            # secret shows "[redacted]" instead (swarm.secrets).
            "msg": redact_text(record.getMessage()),
        }
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = redact_text(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


def setup_logging(level: str = "info", file: str = "", *, console: bool = True,
                  fmt: str = "text") -> None:
    """Configure the root logger for a daemon (replacing what was there)."""
    lvl = getattr(logging, level.upper(), logging.INFO)
    handlers: list[logging.Handler] = []
    if console:
        stream = logging.StreamHandler(sys.stderr)
        # A terminal shows the time of day; a file keeps the date too.
        stream.setFormatter(JsonFormatter() if fmt == "json"
                            else RedactingFormatter(TEXT_FORMAT, "%H:%M:%S"))
        handlers.append(stream)
    if file:
        fh = logging.FileHandler(file)
        fh.setFormatter(JsonFormatter() if fmt == "json" else RedactingFormatter(TEXT_FORMAT))
        handlers.append(fh)
    if not handlers:  # neither: silence rather than Python's last-resort stderr handler
        handlers.append(logging.NullHandler())
    logging.basicConfig(level=lvl, handlers=handlers, force=True)
    for noisy in ("websockets", "aiosqlite"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))
