"""The dependency graph of a workflow: cycles, levels (waves), ranks and the critical path.

Pure functions on the model, no I/O. Everything is iterative and linear (or n log n for
the stable topological order), so a 100,000-symbol chain is as fine as a wide fan-out.

Edges point from a symbol to what it needs: ``deps["b"] == ["a"]`` means b runs after a.
"""

from __future__ import annotations

import gc
import heapq
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from swarm.model import DISPATCHES, Workflow

__all__ = ["Plan", "analyze", "find_cycle", "find_cycles", "gc_paused"]


@contextmanager
def gc_paused() -> Iterator[None]:
    """For building big trees of fresh containers that hold no garbage cycles (manifests,
    plans): the cyclic collector would rescan them over and over while they grow (~20%
    of loading 100,000 symbols)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def find_cycle(deps: Mapping[str, Sequence[str]]) -> list[str] | None:
    """One dependency cycle as a closed path (``["a", "b", "c", "a"]``), or None if acyclic.

    Names that appear only as dependencies (not as keys) are treated as leaves.
    """
    cycles = find_cycles(deps)
    return cycles[0] if cycles else None


def find_cycles(deps: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one, in the mapping's order.

    Each cycle is a shortest cycle through the component's first name (in mapping
    order), written as a closed path: ``a -> b -> a`` is ``["a", "b", "a"]``.
    """
    position = {name: i for i, name in enumerate(deps)}
    if _backward(deps.values(), position):
        return []
    cycles: list[list[str]] = []
    for component in _strongly_connected(deps):
        if len(component) == 1:  # the common case: acyclic, unless it needs itself
            if component[0] in deps[component[0]]:
                cycles.append([component[0], component[0]])
            continue
        start = min(component, key=position.__getitem__)
        cycles.append(_shortest_cycle(deps, start, set(component)))
    cycles.sort(key=lambda cycle: position[cycle[0]])
    return cycles


def _backward(deps: Iterable[Sequence[str]], position: Mapping[str, int]) -> bool:
    """Whether every dependency comes earlier in the order given (names not in
    `position` are leaves): then there is no cycle, and that order is topological. Most
    manifests are written this way; checking it is one pass over the edges."""
    get = position.get
    return all(get(dep, -1) < i for i, needs in enumerate(deps) for dep in needs)


def _strongly_connected(deps: Mapping[str, Sequence[str]]) -> Iterator[list[str]]:
    """Tarjan's algorithm with an explicit stack: recursion would fail on long chains."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    for root in deps:
        if root in index:
            continue
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        work: list[tuple[str, Iterator[str]]] = [(root, iter(deps[root]))]
        while work:
            node, children = work[-1]
            for child in children:
                if child not in deps:
                    continue
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(deps[child])))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component: list[str] = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    yield component


def _shortest_cycle(deps: Mapping[str, Sequence[str]], start: str, inside: set[str]) -> list[str]:
    """Breadth-first search from `start` back to itself, staying inside its component."""
    parent: dict[str, str | None] = {start: None}
    queue = [start]
    for node in queue:  # the list grows while we walk it: a FIFO without deque churn
        for child in deps[node]:
            if child == start:
                path = [node]
                while (up := parent[path[-1]]) is not None:
                    path.append(up)
                path.reverse()
                path.append(start)
                return path
            if child in inside and child not in parent:
                parent[child] = node
                queue.append(child)
    raise AssertionError(f"{start!r} is in a cyclic component but no cycle was found")


@dataclass(frozen=True, slots=True)
class Plan:
    """What the scheduler and the CLI want to know about a workflow's DAG."""

    order: tuple[str, ...]  # topological; among ready symbols, manifest order
    levels: tuple[tuple[str, ...], ...]  # waves: 0 = no deps, else 1 + deepest dep
    rank: dict[str, float]  # longest path from the symbol to the end, its own duration included
    critical_path: tuple[str, ...]
    critical_length: float
    total_work: float
    by_backend: dict[str, int]  # dispatch -> count, in DISPATCHES order, only those used
    dependents: dict[str, tuple[str, ...]]  # symbol -> symbols that need it, manifest order

    @property
    def max_width(self) -> int:
        """The widest level: how many symbols could run at once with unlimited slots."""
        return max((len(level) for level in self.levels), default=0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (for ``--json`` output and the status API)."""
        return {
            "symbols": len(self.order),
            "levels": [list(level) for level in self.levels],
            "max_width": self.max_width,
            "critical_path": list(self.critical_path),
            "critical_length": self.critical_length,
            "total_work": self.total_work,
            "by_backend": dict(self.by_backend),
        }


def analyze(workflow: Workflow, durations: Mapping[str, float] | None = None) -> Plan:
    """The plan of a validated, acyclic workflow.

    `durations` are expected milliseconds per symbol name; a symbol without one counts
    1.0, so by default ranks and the critical path count symbols. Raises ValueError for a
    negative or non-finite duration, and for a cycle or unknown dependency (which a
    validated workflow never has).
    """
    with gc_paused():
        return _analyze(workflow, durations)


def _analyze(workflow: Workflow, durations: Mapping[str, float] | None) -> Plan:
    symbols = workflow.symbols
    names = [s.name for s in symbols]
    position = {name: i for i, name in enumerate(names)}
    if durations is None:
        cost = dict.fromkeys(names, 1.0)
    else:
        cost = {}
        for name in names:
            value = float(durations.get(name, 1.0))
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"duration of {name!r} must be a finite number >= 0, "
                                 f"got {value}")
            cost[name] = value

    # Hot loops below (100,000 symbols): map() over dict lookups, no generator per symbol.
    needs: dict[str, list[str]] = {name: [] for name in names}
    for s in symbols:
        for dep in s.dependencies:
            needed_by = needs.get(dep)
            if needed_by is None:
                raise ValueError(f"{s.name!r} depends on unknown symbol {dep!r}")
            needed_by.append(s.name)
    dependents = {name: tuple(after) for name, after in needs.items()}

    # Kahn's algorithm; the heap key is the manifest position, which keeps the order stable.
    # When every dependency comes earlier, it would pop the manifest order itself.
    waiting = [len(s.dependencies) for s in symbols]
    backward = _backward((s.dependencies for s in symbols), position)
    ready = [] if backward else [i for i, n in enumerate(waiting) if n == 0]  # a heap
    order: list[str] = list(names) if backward else []
    pop, push = heapq.heappop, heapq.heappush
    while ready:
        name = names[pop(ready)]
        order.append(name)
        for later in dependents[name]:
            i = position[later]
            waiting[i] -= 1
            if waiting[i] == 0:
                push(ready, i)
    if len(order) != len(names):
        stuck = [name for name, n in zip(names, waiting, strict=True) if n > 0]
        raise ValueError(f"the workflow has a dependency cycle among {stuck[:5]}")

    level: dict[str, int] = {}
    for name in order:
        deps = symbols[position[name]].dependencies
        level[name] = 1 + max(map(level.__getitem__, deps)) if deps else 0
    grouped: list[list[str]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for name in names:
        grouped[level[name]].append(name)

    rank: dict[str, float] = {}
    for name in reversed(order):
        next_ = dependents[name]
        rank[name] = cost[name] + max(map(rank.__getitem__, next_)) if next_ else cost[name]
    rank = {name: rank[name] for name in names}  # manifest order reads better when printed

    # Follow the heaviest successor from the heaviest start; ties go to manifest order
    # because max() keeps the first of equal keys.
    path: list[str] = []
    if names:
        node = max(names, key=rank.__getitem__)
        path.append(node)
        while dependents[node]:
            node = max(dependents[node], key=rank.__getitem__)
            path.append(node)

    used = {s.dispatch for s in symbols}
    counts = dict.fromkeys((d for d in DISPATCHES if d in used), 0)
    for s in symbols:
        counts[s.dispatch] = counts.get(s.dispatch, 0) + 1

    return Plan(
        order=tuple(order),
        levels=tuple(tuple(group) for group in grouped),
        rank=rank,
        critical_path=tuple(path),
        critical_length=rank[path[0]] if path else 0.0,
        total_work=sum(cost.values()),
        by_backend=counts,
        dependents=dependents,
    )
