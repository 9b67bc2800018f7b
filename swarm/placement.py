"""Which ready task runs where: part of the pure scheduler core (no I/O, no clock).

It holds the ready queues (one heap per backend, ordered by the tasks' keys), the
workers with a free slot per backend, and the resources (locks, semaphores) tasks hold.
The scheduler tells it what became ready, which slots filled or freed and which task
claims or releases its resources; `placements()` answers with the next task to start
and the worker to start it on.

Inside `Scheduler.handle` its changes go to the undo log (`swarm.undo`): the heaps and
lists through the log's functions; the locks held and the open-worker index, which
the tasks and nodes determine, are recomputed by `rebuild` after a rollback.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from . import undo
from .tasks import Node, Task, TaskState

_Entry = tuple[tuple[Any, ...], int, Task]


class Placement:
    def __init__(self, *, load_balancing: bool = True, priority_queue: bool = True) -> None:
        self.load_balancing = load_balancing
        self.priority_queue = priority_queue
        self._ready: dict[str, list[_Entry]] = undo.TDict()
        # backend -> the nodes that run it and have a free slot: placement looks at these
        # only, not at every worker (1,000 connected ones with other backends cost nothing).
        self._open: dict[str, dict[str, Node]] = {}
        self.held: dict[str, int] = {}  # resource key -> units held, across all runs
        self._blocked: list[Task] = undo.TList()  # ready, but a resource is held
        self._unplaced: list[Task] = undo.TList()  # ready, but no free worker has its labels
        self._seq = itertools.count()

    # --- ready tasks --------------------------------------------------------------------

    def push(self, task: Task) -> None:
        """A task is ready: in line by its key (priority, then rank), else first come."""
        key = task.key if self.priority_queue and task.key else (next(self._seq),)
        heap = self._ready.get(task.dispatch)
        if heap is None:
            heap = self._ready[task.dispatch] = []
        undo.heappush(heap, (key, next(self._seq), task))

    def push_all(self, tasks: list[Task]) -> None:
        """Tasks set aside (a lock, a matching worker, a paused run) go back in line."""
        for t in tasks:
            if t.state is TaskState.READY:
                self.push(t)
        tasks.clear()

    def placements(self, any_node: bool) -> Iterator[tuple[Task, Node]]:
        """The best ready task that a free worker can take, and that worker, again and
        again; the caller starts each (and so fills the slot) before asking for the next.
        Tasks that cannot go now are set aside without holding back those behind them."""
        if self._unplaced:  # a slot may have freed or a worker joined since
            self.push_all(self._unplaced)
        if not self._ready or not any_node:
            return
        while True:
            best: tuple[Any, ...] | None = None
            best_node: Node | None = None
            best_heap: list[_Entry] | None = None
            for heap in self._ready.values():
                node = None
                while heap:
                    t = heap[0][2]
                    if t.state is not TaskState.READY:
                        undo.heappop(heap)
                    elif t.run.paused:  # set aside until its run resumes
                        t.run.parked.append(undo.heappop(heap)[2])
                    elif t.resources and not self.resources_free(t):
                        # Waiting for a lock never holds back the symbols behind it.
                        self._blocked.append(undo.heappop(heap)[2])
                    elif best is not None and heap[0][:2] >= best:
                        break
                    elif (node := self._pick_node(t)) is None and t.requires:
                        self._unplaced.append(undo.heappop(heap)[2])  # no match free now
                    else:
                        break
                if node is not None and heap and (best is None or heap[0][:2] < best):
                    best, best_node, best_heap = heap[0][:2], node, heap
            if best_node is None or best_heap is None:
                return
            _, _, task = undo.heappop(best_heap)
            yield task, best_node

    def _pick_node(self, task: Task) -> Node | None:
        """A free worker that runs the task's backend and has its labels; least loaded
        first (or the first registered, without load balancing)."""
        requires = task.requires
        best: Node | None = None
        best_key: tuple[float, int] | None = None
        for node in self._open.get(task.dispatch, {}).values():
            if requires and any(node.labels.get(k) != v for k, v in requires.items()):
                continue
            if not self.load_balancing:
                key: tuple[float, int] = (0.0, node.seq)
            else:
                key = (len(node.running) / node.slots, node.seq)
            if best_key is None or key < best_key:
                best, best_key = node, key
        return best

    # --- slots ----------------------------------------------------------------------------

    def occupy(self, node: Node, token: int, task: Task) -> None:
        node.running[token] = task
        if node.free <= 0:
            self.reindex(node)

    def vacate(self, node: Node, token: int, connected: bool) -> Task | None:
        task = node.running.pop(token, None)
        if task is not None and node.free == 1 and connected:
            self.reindex(node)  # it was full: open again
        return task

    def reindex(self, node: Node) -> None:
        """Put a node in or out of the open index of each of its backends (after it joined,
        filled up, freed a slot or started draining)."""
        for cap in node.caps:
            if node.free > 0:
                self._open.setdefault(cap, {})[node.id] = node
            else:
                self._open.get(cap, {}).pop(node.id, None)

    def remove(self, node: Node) -> None:
        for cap in node.caps:
            self._open.get(cap, {}).pop(node.id, None)

    # --- resources ------------------------------------------------------------------------

    def resources_free(self, task: Task) -> bool:
        caps = task.run.workflow.resources
        return all(self.held.get(k, 0) < caps.get(k, 1) for k in task.resources)

    def claim(self, task: Task) -> None:
        if task.resources and not task.holding:
            task.holding = True
            for k in task.resources:
                self.held[k] = self.held.get(k, 0) + 1

    def release(self, task: Task) -> None:
        task.holding = False
        for k in task.resources:
            self.held[k] -= 1
            if not self.held[k]:
                del self.held[k]
        self.push_all(self._blocked)

    def rebuild(self, nodes: Iterable[Node], tasks: Iterable[Task]) -> None:
        """Recompute the locks held and the open-worker index from the tasks and nodes
        (after the scheduler undid an event: these are not in the undo log)."""
        self.held = {}
        for t in tasks:
            if t.holding:
                for k in t.resources:
                    self.held[k] = self.held.get(k, 0) + 1
        self._open = {}
        for n in nodes:
            self.reindex(n)

    # --- invariants -----------------------------------------------------------------------

    def validate(self, nodes: Iterable[Node], tasks: Iterable[Task]) -> None:
        """What the indexes say matches the nodes and tasks (tests call this)."""
        held: dict[str, int] = {}
        for t in tasks:
            if t.holding:
                for k in t.resources:
                    held[k] = held.get(k, 0) + 1
        assert held == self.held, (held, self.held)
        open_now: dict[str, set[str]] = {}
        for n in nodes:
            if n.free > 0:
                for cap in n.caps:
                    open_now.setdefault(cap, set()).add(n.id)
        assert {c: set(ns) for c, ns in self._open.items() if ns} == open_now, \
            "open index out of date"
