"""Prometheus text exposition for `GET /metrics`, and the two latency histograms the
dispatcher keeps. Small enough that a client library would add more than it saves."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from . import journal as jn
from .tasks import AttemptOutcome, TaskState

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
           gauges: Iterable[tuple[str, str, float]] = (), extra: Iterable[str] = ()) -> str:
    """The whole /metrics page from the scheduler's snapshot and the DB's run counts."""
    nodes = snapshot["nodes"]
    lines = gauge("swarm_info", "Dispatcher version.", {version: 1}, label="version")
    lines += gauge("swarm_uptime_seconds", "Seconds since the dispatcher started.", uptime)
    lines += gauge("swarm_symbols", "Symbols of active runs by state.", snapshot["tasks"])
    lines += gauge("swarm_queue_depth", "Symbols ready and waiting for a worker.",
                   snapshot["tasks"].get(TaskState.READY, 0))
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
    lines += extra
    return "\n".join(lines) + "\n"


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    return ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))


def counter_family(name: str, help: str, labels: Sequence[str],
                   values: Mapping[tuple[str, ...], float]) -> list[str]:
    """A counter with labels (`name` ends in `_total`); no sample until one is counted."""
    lines = [f"# HELP {name} {help}", f"# TYPE {name} counter"]
    lines += [f"{name}{{{_labels(labels, k)}}} {v}" for k, v in sorted(values.items())]
    return lines


# Journal kinds that end a symbol, the state they end it in.
_SYMBOL_END: dict[str, str] = {
    jn.Kind.SYMBOL_COMPLETED: TaskState.COMPLETED, jn.Kind.SYMBOL_FAILED: TaskState.FAILED,
    jn.Kind.SYMBOL_SKIPPED: TaskState.SKIPPED, jn.Kind.SYMBOL_CANCELLED: TaskState.CANCELLED,
    jn.Kind.SYMBOL_ROLLED_BACK: TaskState.ROLLED_BACK}


class Tally:
    """Counters of what the dispatcher journaled since it started, by kind. Taken as the
    journal entries are made (before their commit: a commit that fails stops the
    dispatcher, and with it these counters)."""

    def __init__(self) -> None:
        self.symbols: dict[tuple[str, ...], float] = {}  # (state, kind)
        self.attempts: dict[tuple[str, ...], float] = {}  # (outcome, backend)
        self.runs: dict[tuple[str, ...], float] = {}  # (status,)
        self.retries = 0
        self.worker_losses = 0

    def journal(self, j: jn.Record, core: Any) -> None:
        match j:
            case jn.SymbolQueued() | jn.SymbolStarted():
                pass  # the most frequent: nothing to count
            case jn.AttemptFinished() | jn.AttemptLost():
                outcome = (AttemptOutcome.LOST if isinstance(j, jn.AttemptLost)
                           else AttemptOutcome.OK if j.ok
                           else AttemptOutcome.TIMEOUT if j.timed_out else AttemptOutcome.FAILED)
                key = (outcome.value, core.dispatch_of(j.run_id, j.symbol) or "unknown")
                self.attempts[key] = self.attempts.get(key, 0) + 1
            case (jn.SymbolCompleted() | jn.SymbolFailed() | jn.SymbolSkipped()
                  | jn.SymbolCancelled() | jn.SymbolRolledBack()):
                kind = "rollback" if j.task_id.endswith("/rollback") else "main"
                key = (str(_SYMBOL_END[j.KIND]), kind)
                self.symbols[key] = self.symbols.get(key, 0) + 1
            case jn.SymbolRetrying():
                self.retries += 1
            case jn.NodeLost():
                self.worker_losses += 1
            case jn.RunEnded():
                status = (j.status,)
                self.runs[status] = self.runs.get(status, 0) + 1

    def render(self) -> list[str]:
        return [
            *counter_family("swarm_symbols_finished_total", "Symbols that reached an end "
                            "state, by state and kind (main or rollback).", ("state", "kind"),
                            self.symbols),
            *counter_family("swarm_attempts_total", "Attempts that ended, by outcome (ok, "
                            "failed, timeout, lost) and backend.", ("outcome", "backend"),
                            self.attempts),
            *counter("swarm_retries_total", "Symbols scheduled for another attempt after "
                     "a failure.", self.retries),
            *counter("swarm_worker_losses_total", "Workers declared lost (silent past "
                     "heartbeat_timeout or disconnected without draining).",
                     self.worker_losses),
            *counter_family("swarm_runs_finished_total", "Runs that ended, by status.",
                            ("status",), self.runs),
        ]


def process_metrics() -> list[str]:
    """The standard process_* metrics of the Prometheus client libraries (Linux /proc)."""
    import os
    import resource

    lines: list[str] = []
    ru = resource.getrusage(resource.RUSAGE_SELF)
    lines += counter("process_cpu_seconds_total", "Total user and system CPU time spent in "
                     "seconds.", ru.ru_utime + ru.ru_stime)
    try:
        with open("/proc/self/statm") as f:
            vm_pages, rss_pages = (int(x) for x in f.read().split()[:2])
        page = os.sysconf("SC_PAGE_SIZE")
        lines += gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.",
                       vm_pages * page)
        lines += gauge("process_resident_memory_bytes", "Resident memory size in bytes.",
                       rss_pages * page)
        lines += gauge("process_open_fds", "Number of open file descriptors.",
                       len(os.listdir("/proc/self/fd")))
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        lines += gauge("process_start_time_seconds", "Start time of the process since unix "
                       "epoch in seconds.", btime + start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, StopIteration, IndexError):
        pass  # not Linux: CPU time only
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        lines += gauge("process_max_fds", "Maximum number of open file descriptors.", soft)
    return lines
