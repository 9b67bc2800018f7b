"""Shared fixtures. Test helpers live in plain modules beside this file (backend_support,
e2e_support), importable from every test module."""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from e2e_support import Cluster  # noqa: E402


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A work folder for a dispatcher and workers; every process it starts is ended."""
    cl = Cluster(tmp_path)
    try:
        yield cl
    finally:
        cl.close()


@pytest.fixture
def strict_touch() -> Iterator[None]:
    """Inside `Scheduler.handle`, a task written before the core `touch`ed it would escape
    the undo log: with this fixture such a write raises at once, wherever it is."""
    from swarm import undo
    from swarm.tasks import Task

    def checked(self: Task, name: str, value: object) -> None:
        if undo.entries is not None and name != "tx":
            assert self.tx == undo.serial, f"{self.id}.{name} written before touch(task)"
        object.__setattr__(self, name, value)

    Task.__setattr__ = checked  # type: ignore[assignment]
    try:
        yield
    finally:
        del Task.__setattr__
