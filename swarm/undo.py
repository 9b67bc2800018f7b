"""The undo log that makes `Scheduler.handle` all or nothing.

While an event is handled, every change to the core's mutable state is logged with
what it replaced: attribute writes on tasks, runs, nodes and the scheduler (their
classes use `tracked_setattr`), item writes on `TDict`s, appends and clears of
`TList`s, and pushes and pops of heaps through `heappush`/`heappop` here (the C heapq
functions go around any list subclass). If the handler raises, `rollback()` undoes the
log newest first and the core is as it was before the event; if it returns, the log is
dropped. Outside `handle` nothing is logged, and logging costs one global read.

State that other state determines (a run's counts per task state, the locks held, the
open-worker index, the waiting index) is not logged: the scheduler recomputes it after
a rollback, which is rare, instead of paying for it on every change, which is not.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")
_MISSING: Any = object()
_Entry = tuple[Callable[[Any, Any, Any], None], Any, Any, Any]

# The log of the transaction under way; None outside `Scheduler.handle`. Read as
# `undo.entries` by objects that log themselves (a plain read: this is the hot path).
entries: list[_Entry] | None = None
serial = 0  # the number of the transaction under way, or of the last one


def begin() -> list[_Entry]:
    """Start logging; one transaction at a time (the core is not re-entrant)."""
    global entries, serial
    if entries is not None:
        raise RuntimeError("a scheduler transaction is already under way")
    entries = []
    serial += 1
    return entries




def commit() -> None:
    global entries
    entries = None


def rollback() -> None:
    """Undo everything logged since `begin`, newest first, and stop logging."""
    global entries
    log, entries = entries, None
    for undo, a, b, c in reversed(log or ()):
        undo(a, b, c)


# --- attributes ------------------------------------------------------------------------

_setattr = object.__setattr__


def _restore_attr(obj: Any, name: str, old: Any) -> None:
    if old is _MISSING:
        object.__delattr__(obj, name)
    else:
        _setattr(obj, name, old)


def tracked_setattr(self: Any, name: str, value: Any) -> None:
    """`__setattr__` of the core's classes: logs the value it replaces."""
    log = entries
    if log is not None:
        log.append((_restore_attr, self, name, getattr(self, name, _MISSING)))
    _setattr(self, name, value)


# --- containers ------------------------------------------------------------------------


def _restore_item(d: dict[Any, Any], key: Any, old: Any) -> None:
    if old is _MISSING:
        dict.pop(d, key, None)
    else:
        dict.__setitem__(d, key, old)


def _restore_dict(d: dict[Any, Any], old: dict[Any, Any], _: Any) -> None:
    dict.clear(d)
    dict.update(d, old)


class TDict(dict[Any, Any]):
    """A dict whose writes are logged inside a transaction (reads cost nothing more)."""

    __slots__ = ()

    def __setitem__(self, key: Any, value: Any) -> None:
        log = entries
        if log is not None:
            log.append((_restore_item, self, key, dict.get(self, key, _MISSING)))
        dict.__setitem__(self, key, value)

    def __delitem__(self, key: Any) -> None:
        log = entries
        if log is not None and key in self:
            log.append((_restore_item, self, key, dict.__getitem__(self, key)))
        dict.__delitem__(self, key)

    def pop(self, key: Any, *default: Any) -> Any:
        log = entries
        if log is not None and key in self:
            log.append((_restore_item, self, key, dict.__getitem__(self, key)))
        return dict.pop(self, key, *default)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return dict.__getitem__(self, key)

    def clear(self) -> None:
        log = entries
        if log is not None and self:
            log.append((_restore_dict, self, dict(self), None))
        dict.clear(self)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def popitem(self) -> tuple[Any, Any]:
        raise NotImplementedError("TDict.popitem is not undoable; use pop")


def _restore_len(lst: list[Any], length: int, _: Any) -> None:
    list.__delitem__(lst, slice(length, None))


def _restore_list(lst: list[Any], old: list[Any], _: Any) -> None:
    list.__setitem__(lst, slice(None), old)


class TList(list[Any]):
    """A list whose appends and clears are logged inside a transaction. (Heaps go
    through `heappush`/`heappop` below instead.)"""

    __slots__ = ()

    def append(self, item: Any) -> None:
        log = entries
        if log is not None:
            log.append((_restore_len, self, len(self), None))
        list.append(self, item)

    def extend(self, items: Iterable[Any]) -> None:
        log = entries
        if log is not None:
            log.append((_restore_len, self, len(self), None))
        list.extend(self, items)

    def clear(self) -> None:
        log = entries
        if log is not None and self:
            log.append((_restore_list, self, list(self), None))
        list.clear(self)

    def _refuse(self, *_: Any) -> Any:
        raise NotImplementedError("this TList operation is not undoable")

    # Anything else that changes a list in place would escape the log.
    insert = remove = reverse = sort = __setitem__ = __delitem__ = __iadd__ = _refuse  # type: ignore[assignment]
    pop = _refuse


def append(lst: list[T], item: T) -> None:
    """Append to a plain list, logged: for lists that are not worth a `TList` everywhere
    (a task's dependents change inside a transaction only when a rollback is added)."""
    log = entries
    if log is not None:
        log.append((_restore_len, lst, len(lst), None))
    lst.append(item)


# --- heaps -----------------------------------------------------------------------------


def _unpush(heap: list[Any], item: Any, _: Any) -> None:
    for i, entry in enumerate(heap):  # by identity: entries of equal keys are distinct
        if entry is item:
            heap[i] = heap[-1]
            heap.pop()
            heapq.heapify(heap)
            return


def _unpop(heap: list[Any], item: Any, _: Any) -> None:
    heapq.heappush(heap, item)


def heappush(heap: list[Any], item: Any) -> None:
    heapq.heappush(heap, item)
    log = entries
    if log is not None:
        log.append((_unpush, heap, item, None))


def heappop(heap: list[Any]) -> Any:
    item = heapq.heappop(heap)
    log = entries
    if log is not None:
        log.append((_unpop, heap, item, None))
    return item
