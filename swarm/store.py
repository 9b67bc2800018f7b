"""What the dispatcher needs of a state store: the seam between the scheduler's shell and
the database (DESIGN §10).

`swarm.state.Store` (SQLite) is the implementation today; a PostgreSQL store (issue #18)
is another. The dispatcher, its operations (`ops.py`) and the retention loop type against
`StateStore`, never against SQLite. The protocol is the surface they use, nothing more:

- writes: `write` is the only one. It commits a batch of journal entries, and the
  stimuli that caused them, in one transaction (group commit), and numbers the entries'
  events in order. A store has one writer at a time (`open` takes a lock or a lease).
- reads: what `status`, `runs`, `report`, `watch --since` and a restart need.
- maintenance: prune and backup, on the store's own connections, beside the writer.

Rows come back as plain dicts of column -> value (JSON columns decoded where noted),
the same for every implementation.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .events import TaskRecord
from .journal import Record

if TYPE_CHECKING:
    from .maintenance import BackupResult, PruneResult
    from .stimuli import Stimulus


class StateStore(Protocol):
    """The state store one dispatcher writes (see the module docstring)."""

    @property
    def identity(self) -> tuple[int, int] | None:
        """What the store is now (for SQLite the file's device and inode); None if it is
        gone. A change while the dispatcher runs means it was replaced under it."""
        ...

    @property
    def last_stimulus(self) -> int:
        """The id of the last stimulus stored; a new session numbers on from there."""
        ...

    async def close(self) -> None: ...

    # --- writing -----------------------------------------------------------------------

    async def write(self, entries: Sequence[Record], stimuli: Sequence[Stimulus] = ()
                    ) -> range:
        """Commit the entries (and the stimuli that caused them) in one transaction; the
        seqs of their events, one per entry, in order. StateBusy if it may succeed when
        tried again, StateError if not."""
        ...

    async def reclaim(self) -> None:
        """Try to give back space (a full disk may be our own log); best effort."""
        ...

    # --- what a restart and a deploy read ------------------------------------------------

    async def node_key(self) -> bytes:
        """The secret node secrets are derived from, made once per store."""
        ...

    async def unfinished_runs(self) -> list[str]:
        """Runs to resume, oldest first."""
        ...

    async def load_run(self, run_id: str) -> tuple[dict[str, Any], list[TaskRecord]] | None:
        """A run's row (manifest document, outputs of its completed symbols, rollback
        phase) and its task records, to rebuild it in the scheduler."""
        ...

    async def expected_durations(self, workflow: str, symbols: dict[str, str],
                                 default: float = ...) -> dict[str, float]:
        """Expected ms per symbol (name -> dispatch given), from the history."""
        ...

    # --- what clients read ------------------------------------------------------------

    async def counts(self) -> dict[str, int]: ...

    async def symbol_totals(self) -> dict[str, int]: ...

    async def runs_by_status(self) -> dict[str, int]: ...

    async def run(self, run_id: str) -> dict[str, Any] | None: ...

    async def runs(self, limit: int = 20) -> list[dict[str, Any]]: ...

    async def events(self, run_id: str, since: int = 0) -> list[dict[str, Any]]:
        """A run's journal in order, after seq `since`."""
        ...

    async def report_rows(self, run_id: str) -> dict[str, Any] | None:
        """Everything `report.build` needs about one run."""
        ...

    # --- maintenance --------------------------------------------------------------------

    async def prune(self, older_than: float, *, dry_run: bool = False,
                    protected: Collection[str] = (), pruning: set[str] | None = None
                    ) -> PruneResult:
        """Remove finished runs older than that (seconds), except `protected` ones; the
        runs being deleted are in `pruning` meanwhile. The dispatcher serves on."""
        ...

    async def backup(self, dest: str) -> BackupResult:
        """Write a consistent, checked copy of the store to `dest` (never overwritten)."""
        ...
