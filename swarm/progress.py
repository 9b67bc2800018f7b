"""What long-running symbols say of themselves: checkpoints and progress reports.

Pure helpers shared by the scheduler core (which judges reports) and the worker (which
collects them from backends): the size rule of checkpoints, the `::swarm::` line that
subprocess backends print, and the reasons given when a report is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_CHECKPOINT_SIZE = 256 * 1024  # bytes of JSON
LINE_PREFIX = b"::swarm::"  # a stdout line starting so is a report, not output
# A report line longer than this is not buffered whole: it is counted and dropped (an
# oversized checkpoint), so that a backend cannot make the worker hold unbounded lines.
MAX_LINE_SLACK = 64 * 1024

MAX_MESSAGE = 500  # characters of a progress message kept: a line for people, not a log
HUNG = "no progress for {ms} ms"
RUN_DEADLINE = "run deadline exceeded"
STALE = "stale or unknown attempt"
OPTED_OUT = "checkpoints are off for this symbol (checkpoint: false)"


@dataclass(frozen=True, slots=True)
class Report:
    """One report of a running attempt, as a backend made it (before it is numbered)."""

    checkpoint: Any = None  # None: no checkpoint
    progress: float | None = None
    message: str = ""
    oversize: int = 0  # bytes of a checkpoint refused for its size


def checkpoint_size(data: Any) -> int:
    """The size a checkpoint is judged by: its compact JSON, in bytes."""
    return len(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode())


def too_big(size: int, limit: int) -> str:
    """The error of a checkpoint of `size` bytes, or "" if it fits (limit <= 0: none)."""
    if limit <= 0 or size <= limit:
        return ""
    return (f"checkpoint of {size:,} bytes exceeds max_checkpoint_size ({limit:,} bytes): "
            "not kept; the previous checkpoint stays")


def fraction(value: Any) -> float | None:
    """A progress value as a fraction in [0, 1], or None if it is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return min(1.0, max(0.0, float(value)))


def parse_line(line: bytes) -> Report | None:
    """The report of one stdout line of the form `::swarm::{...}` (any of `checkpoint`,
    `progress`, `message`); None if the line is not a well-formed report."""
    if not line.startswith(LINE_PREFIX):
        return None
    try:
        doc = json.loads(line[len(LINE_PREFIX):])
    except ValueError:
        return None
    if not isinstance(doc, dict) or not doc.keys() & {"checkpoint", "progress", "message"}:
        return None
    message = doc.get("message", "")
    return Report(checkpoint=doc.get("checkpoint"), progress=fraction(doc.get("progress")),
                  message=message if isinstance(message, str) else str(message))
