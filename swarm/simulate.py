"""`swarm simulate`: the real scheduler core on a virtual clock, over random workflows.

Nothing here sleeps or opens a socket. `simulate` feeds `swarm.core.Scheduler` the events
a swarm would send it (nodes join, a run is submitted, attempts finish) with `now` taken
from a virtual clock that jumps from one completion to the next, so a 5,000-symbol run
takes as long as the core needs to decide it, not as long as the symbols would run.

Every attempt succeeds and lasts exactly its expected duration; the only thing measured is
the order the core chooses. A run's makespan is compared with the lower bound
``max(critical path, total work / slots)`` that no scheduler can beat.

Policies:
- ``critical-path``: the priority queue, ranks weighted by the expected durations;
- ``fifo``: ready symbols start in the order they became ready;
- ``waves``: as ``critical-path``, but the workflow in ``mode: waves`` (a barrier
  between levels, when the core implements it).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from .core import (
    Assign,
    Command,
    NodeConnected,
    ResultsReceived,
    RunSubmitted,
    Scheduler,
    SchedulerConfig,
    Tick,
)
from .errors import SwarmError
from .journal import Kind, RunEnded
from .model import Symbol, Workflow
from .plan import analyze
from .protocol import TaskResult

__all__ = [
    "POLICIES",
    "SHAPES",
    "SimResult",
    "SimulationStuck",
    "add_simulate_arguments",
    "benchmark",
    "main_simulate",
    "predict",
    "random_workflow",
    "result_dict",
    "simulate",
    "summarize",
]

POLICIES = ("critical-path", "fifo", "waves")
SHAPES = ("layered", "irregular")
MEDIAN_MS = 100.0  # lognormal durations: median 100 ms, sigma 1 (p90/p10 is about 13)
SIGMA = 1.0
TARGET_RATIO = 1.10  # critical-path makespan / lower bound, on average
TARGET_VS_WAVES = 0.80  # critical-path makespan / waves makespan, on average

_RUN_ID = "sim"


class SimulationStuck(SwarmError):
    """The core left symbols unstarted with nothing running: the simulated nodes cannot
    run them (capabilities, labels), or the scheduler has a bug."""


@dataclass(frozen=True, slots=True)
class SimResult:
    """One simulated run. Times are milliseconds of virtual time."""

    makespan: float
    lower_bound: float  # max(critical_path, total_work / slots)
    ratio: float  # makespan / lower_bound, >= 1
    utilisation: float  # total_work / (makespan * slots), <= 1
    critical_path: float
    total_work: float
    slots: int
    policy: str


# --- random workflows -------------------------------------------------------------------


def random_workflow(rng: random.Random, n: int, shape: str) -> tuple[Workflow, dict[str, float]]:
    """A random acyclic workflow of `n` symbols and its expected durations (ms).

    ``layered``: levels of random width (1 to 2*sqrt(n)), each symbol needs 1-3 symbols of
    the level before. ``irregular``: each symbol needs 0-3 earlier symbols, half of them
    among the last few (which makes long chains), half anywhere before. Durations are
    lognormal (median 100 ms, sigma 1). All symbols are `internal`, priority 0, no retries.
    """
    if n < 1:
        raise ValueError(f"a workflow needs at least one symbol, got {n}")
    names = [f"s{i:05d}" for i in range(n)]
    deps: list[tuple[str, ...]] = []
    if shape == "layered":
        widest = max(2, round(2 * math.sqrt(n)))
        previous: list[str] = []
        i = 0
        while i < n:
            width = min(n - i, rng.randint(1, widest))
            layer = names[i:i + width]
            for _ in layer:
                k = min(len(previous), rng.randint(1, 3))
                deps.append(tuple(sorted(rng.sample(previous, k))))
            previous, i = layer, i + width
    elif shape == "irregular":
        for i in range(n):
            k = min(i, rng.choice((0, 1, 1, 2, 2, 3)))
            chosen: set[int] = set()
            while len(chosen) < k:
                near = rng.random() < 0.5
                chosen.add(rng.randint(max(0, i - 8), i - 1) if near else rng.randrange(i))
            deps.append(tuple(names[j] for j in sorted(chosen)))
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    symbols = tuple(Symbol(name=name, type="action", dispatch="internal", dependencies=d,
                           retries=0) for name, d in zip(names, deps, strict=True))
    mu = math.log(MEDIAN_MS)
    durations = {name: rng.lognormvariate(mu, SIGMA) for name in names}
    return Workflow(name=f"sim-{shape}-{n}", version="1", symbols=symbols), durations


# --- one simulated run ------------------------------------------------------------------


def simulate(workflow: Workflow, durations: Mapping[str, float], slots: int, policy: str,
             nodes: int = 1, *, check: bool = False) -> SimResult:
    """Run `workflow` through the scheduler core on `nodes` nodes sharing `slots` slots.

    Each attempt succeeds after exactly its expected duration (a symbol missing from
    `durations` takes 1 ms, as `swarm.plan.analyze` counts it). Deterministic. Raises
    SimulationStuck if the core stops starting symbols before the run ends. With `check`,
    the core's invariants are validated after every event (slow; for tests).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
    if slots < 1 or not 1 <= nodes <= slots:
        raise ValueError(f"need 1 <= nodes <= slots, got {nodes} nodes for {slots} slots")
    cost = {s.name: float(durations.get(s.name, 1.0)) for s in workflow.symbols}
    plan = analyze(workflow, cost)
    if policy == "waves":
        workflow = replace(workflow, mode="waves")
    sched = Scheduler(SchedulerConfig(heartbeat_timeout=math.inf,
                                      priority_queue=policy != "fifo"))
    caps = tuple(sorted({s.dispatch for s in workflow.symbols}))
    # (finishes at, seq, node, token, task id, ms); seq keeps equal times in start order
    running: list[tuple[float, int, str, int, str, float]] = []
    seq = itertools.count()
    now = 0.0  # ms
    outcome = ""

    def apply(commands: Iterable[Command]) -> None:
        nonlocal outcome
        if check:
            sched.validate()
        for cmd in commands:
            if isinstance(cmd, Assign):
                for a in cmd.tasks:
                    ms = cost[a.symbol]
                    heapq.heappush(running, (now + ms, next(seq), cmd.node_id, a.token,
                                             a.task_id, ms))
            elif isinstance(cmd, RunEnded) and cmd.run_id == _RUN_ID:
                outcome = cmd.kind

    for i in range(nodes):
        share = slots // nodes + (1 if i < slots % nodes else 0)
        apply(sched.handle(NodeConnected(f"n{i}", f"n{i}", caps, share, 0.0)))
    apply(sched.handle(RunSubmitted(_RUN_ID, workflow, 0.0, durations=cost)))
    last_tick = -math.inf
    while not outcome:
        deadline = sched.next_deadline()
        due = math.inf if deadline is None else deadline * 1000.0
        if due < (running[0][0] if running else math.inf) and due > last_tick:
            # A timer in the core (none today: no failures, no heartbeat timeout).
            now = last_tick = max(now, due)
            apply(sched.handle(Tick(now / 1000.0)))
            continue
        if not running:
            raise SimulationStuck(f"{workflow.name}: the core stopped starting symbols "
                                  f"at {now:.0f} ms with the run unfinished")
        now = running[0][0]
        batch: dict[str, list[TaskResult]] = {}
        while running and running[0][0] == now:
            _, _, node_id, token, task_id, ms = heapq.heappop(running)
            batch.setdefault(node_id, []).append(
                TaskResult(token=token, task_id=task_id, ok=True, duration_ms=ms))
        for node_id in sorted(batch):
            apply(sched.handle(ResultsReceived(node_id, tuple(batch[node_id]), now / 1000.0)))
    if outcome != Kind.RUN_COMPLETED:
        raise SimulationStuck(f"{workflow.name}: the run ended {outcome!r}, not completed")

    lower = max(plan.critical_length, plan.total_work / slots)
    return SimResult(
        makespan=now,
        lower_bound=lower,
        ratio=now / lower if lower > 0 else 1.0,
        utilisation=plan.total_work / (now * slots) if now > 0 else 1.0,
        critical_path=plan.critical_length,
        total_work=plan.total_work,
        slots=slots,
        policy=policy,
    )


def predict(workflow: Workflow, durations: Mapping[str, float], slots: int) -> SimResult:
    """The makespan `swarm plan --workers N` expects: the critical-path policy on one node
    with `slots` slots that can run every symbol (label requirements are assumed met)."""
    if any(s.requires for s in workflow.symbols):
        workflow = replace(workflow, symbols=tuple(
            replace(s, requires={}) if s.requires else s for s in workflow.symbols))
    return simulate(workflow, durations, slots, "critical-path")


# --- the benchmark ----------------------------------------------------------------------


def benchmark(seed: int, sizes: Sequence[int], slot_counts: Sequence[int],
              shapes: Sequence[str], policies: Sequence[str] = POLICIES) -> list[dict[str, Any]]:
    """One row per (shape, size, slots): the bounds, and per policy its makespan, ratio to
    the lower bound and utilisation. The workflow of a (shape, size) depends only on the
    seed, so every slot count and policy sees the same one."""
    rows: list[dict[str, Any]] = []
    for shape in shapes:
        for n in sizes:
            wf, durations = random_workflow(random.Random(f"{seed}:{shape}:{n}"), n, shape)
            for slots in slot_counts:
                results = {p: simulate(wf, durations, slots, p) for p in policies}
                any_result = next(iter(results.values()))
                rows.append({
                    "shape": shape, "size": n, "slots": slots,
                    "critical_path": any_result.critical_path,
                    "total_work": any_result.total_work,
                    "lower_bound": any_result.lower_bound,
                    "policies": {p: {"makespan": r.makespan, "ratio": r.ratio,
                                     "utilisation": r.utilisation}
                                 for p, r in results.items()},
                })
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per policy the mean ratio and utilisation; the mean of critical-path makespan over
    waves makespan (below 1: critical-path is shorter); and whether the targets are met."""
    policies: dict[str, dict[str, float]] = {}
    for p in dict.fromkeys(p for row in rows for p in row["policies"]):
        cells = [row["policies"][p] for row in rows if p in row["policies"]]
        policies[p] = {"mean_ratio": _mean(c["ratio"] for c in cells),
                       "mean_utilisation": _mean(c["utilisation"] for c in cells)}
    out: dict[str, Any] = {"rows": len(rows), "policies": policies}
    pairs = [(row["policies"]["critical-path"]["makespan"], row["policies"]["waves"]["makespan"])
             for row in rows if {"critical-path", "waves"} <= row["policies"].keys()]
    if pairs:
        out["critical_path_vs_waves"] = _mean(cp / w for cp, w in pairs)
    if "critical-path" in policies:
        out["target_ratio_met"] = policies["critical-path"]["mean_ratio"] <= TARGET_RATIO
    if pairs:
        out["target_vs_waves_met"] = out["critical_path_vs_waves"] <= TARGET_VS_WAVES
    return out


def _mean(values: Iterable[float]) -> float:
    items = list(values)
    return sum(items) / len(items) if items else math.nan


# --- command line -----------------------------------------------------------------------


def _counts(text: str) -> list[int]:
    """``"50,500"`` -> ``[50, 500]``: positive integers, comma-separated."""
    try:
        items = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        items = []
    if not items or min(items) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 2,8,64, got {text!r}")
    return items


def _choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [part.strip() for part in text.split(",") if part.strip()]
        if not items or any(i not in allowed for i in items):
            raise argparse.ArgumentTypeError(
                f"expected some of {','.join(allowed)}, got {text!r}")
        return items
    return parse


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `swarm simulate`, for its sub-parser."""
    parser.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    parser.add_argument("--sizes", type=_counts, default=[50, 500, 5000],
                        help="symbols per workflow, comma-separated (default 50,500,5000)")
    parser.add_argument("--slots", type=_counts, default=[2, 8, 64],
                        help="total slots, comma-separated (default 2,8,64)")
    parser.add_argument("--shapes", type=_choices(SHAPES), default=list(SHAPES),
                        help="workflow shapes (default layered,irregular)")
    parser.add_argument("--policies", type=_choices(POLICIES), default=list(POLICIES),
                        help="scheduling policies (default critical-path,fifo,waves)")
    parser.add_argument("--json", action="store_true", help="print the rows and summary as JSON")


def main_simulate(args: argparse.Namespace) -> int:
    """`swarm simulate`: run the benchmark and print a table (or JSON) and the summary."""
    policies = list(getattr(args, "policies", POLICIES))
    started = time.perf_counter()
    rows = benchmark(args.seed, args.sizes, args.slots, args.shapes, policies)
    summary = summarize(rows)
    elapsed = time.perf_counter() - started
    if args.json:
        print(json.dumps({"seed": args.seed, "rows": rows, "summary": summary}, indent=2))
        return 0
    from rich import box
    from rich.table import Table

    from .console import console

    out = console()
    table = Table(box=box.SIMPLE if out.is_terminal else box.ASCII2,
                  title=f"swarm simulate (seed {args.seed}): makespan / lower bound, utilisation")
    for name in ("shape", "size", "slots", "lower bound"):
        table.add_column(name, justify="left" if name == "shape" else "right")
    for p in policies:
        table.add_column(f"{p} ratio", justify="right")
        table.add_column("util", justify="right")
    for row in rows:
        cells = [row["shape"], str(row["size"]), str(row["slots"]),
                 f"{row['lower_bound'] / 1000:.2f} s"]
        for p in policies:
            cell = row["policies"][p]
            cells += [f"{cell['ratio']:.3f}", f"{cell['utilisation']:.0%}"]
        table.add_row(*cells)
    out.print(table)
    for p, s in summary["policies"].items():
        out.print(f"{p:>14}: mean ratio {s['mean_ratio']:.3f}, "
                  f"mean utilisation {s['mean_utilisation']:.0%}")
    if "target_ratio_met" in summary:
        mark = "met" if summary["target_ratio_met"] else "NOT met"
        out.print(f"target: critical-path within {TARGET_RATIO:.2f} of the lower bound: {mark}")
    if "critical_path_vs_waves" in summary:
        mark = "met" if summary["target_vs_waves_met"] else "NOT met"
        out.print(f"critical-path / waves makespan: {summary['critical_path_vs_waves']:.3f} "
                  f"(target <= {TARGET_VS_WAVES:.2f}: {mark})")
    out.print(f"{len(rows)} rows in {elapsed:.1f} s")
    return 0


def result_dict(result: SimResult) -> dict[str, Any]:
    """A SimResult as JSON-able data (for `swarm plan --json`)."""
    return asdict(result)
