"""Prometheus text exposition for `GET /metrics`, and the two latency histograms the
dispatcher keeps. Small enough that a client library would add more than it saves."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# Seconds: dispatch is sub-millisecond when idle, tens of ms under a group commit.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.name = name
        self.help = help
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)  # per bucket, not yet cumulative
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, n in zip(self.buckets, self.counts, strict=True):
            running += n
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {running}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{self.name}_sum {self.sum}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def gauge(name: str, help: str, values: Mapping[str, float] | float,
          label: str = "state") -> list[str]:
    lines = [f"# HELP {name} {help}", f"# TYPE {name} gauge"]
    if isinstance(values, Mapping):
        lines += [f'{name}{{{label}="{_escape(k)}"}} {v}' for k, v in values.items()]
    else:
        lines.append(f"{name} {values}")
    return lines


def counter(name: str, help: str, value: float) -> list[str]:
    return [f"# HELP {name} {help}", f"# TYPE {name} counter", f"{name} {value}"]


def render(snapshot: Mapping[str, Any], runs_by_state: Mapping[str, int],
           histograms: Iterable[Histogram], uptime: float, version: str,
           counters: Iterable[tuple[str, str, float]] = (),
           gauges: Iterable[tuple[str, str, float]] = ()) -> str:
    """The whole /metrics page from the scheduler's snapshot and the DB's run counts."""
    nodes = snapshot["nodes"]
    lines = gauge("swarm_info", "Dispatcher version.", {version: 1}, label="version")
    lines += gauge("swarm_uptime_seconds", "Seconds since the dispatcher started.", uptime)
    lines += gauge("swarm_symbols", "Symbols of active runs by state.", snapshot["tasks"])
    lines += gauge("swarm_queue_depth", "Symbols ready and waiting for a worker.",
                   snapshot["tasks"].get("ready", 0))
    lines += gauge("swarm_workers_connected", "Worker nodes connected.", len(nodes))
    lines += gauge("swarm_worker_slots", "Slots of connected workers.",
                   sum(n["slots"] for n in nodes))
    lines += gauge("swarm_worker_free_slots", "Free slots of connected workers.",
                   sum(max(0, n["slots"] - n["running"]) for n in nodes if not n["draining"]))
    lines += gauge("swarm_runs", "Runs in the state DB by status.", runs_by_state)
    for name, help, value in counters:
        lines += counter(name, help, value)
    for name, help, value in gauges:
        lines += gauge(name, help, value)
    for h in histograms:
        lines += h.render()
    return "\n".join(lines) + "\n"
