"""One exception root for everything swarm raises on purpose.

    SwarmError
    ├── InputError                 bad input from the user: exit code 2
    │   ├── ManifestError          every problem of a manifest, each with its location
    │   └── ConfigError            a bad config file or value
    ├── ConnectionFailed           the dispatcher cannot be used: exit code 3
    │   ├── DispatcherUnreachable  nothing answered at the URL
    │   ├── AuthenticationFailed   the dispatcher refused our token
    │   └── ClientClosed           the client was closed while a request or stream waited
    ├── ProtocolError              a frame that breaks DESIGN §7
    │   ├── LocalProtocolError     we (or our caller) tried to send something invalid
    │   └── RemoteProtocolError    the peer sent something invalid
    ├── RequestRefused             the dispatcher understood and said no
    ├── BackendError               a backend could not be started or checked
    └── StateError                 the state database is unusable (wrong schema, corrupt)
        ├── StateLocked            another dispatcher holds it: exit code 2
        └── StateBusy              a commit to retry: locked by another process, disk full
"""

from __future__ import annotations

from dataclasses import dataclass


class SwarmError(Exception):
    """Root of every error swarm raises on purpose."""

    exit_code: int = 1


class InputError(SwarmError):
    exit_code = 2


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem in a manifest or config, with where it is."""

    message: str
    file: str = ""
    symbol: str | None = None
    field: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = self.file or "<manifest>"
        if self.line is not None:
            where += f":{self.line}"
        parts = [where]
        if self.symbol is not None:
            parts.append(f"symbol '{self.symbol}'")
        if self.field is not None:
            parts.append(f"field '{self.field}'")
        return ": ".join(parts) + f": {self.message}"


class ManifestError(InputError):
    """A manifest with one or more problems; all of them are in ``problems``."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in manifest"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in self.problems))


class ConfigError(InputError):
    pass


class ConnectionFailed(SwarmError):
    exit_code = 3


class DispatcherUnreachable(ConnectionFailed):
    pass


class ClientClosed(ConnectionFailed):
    """`Client.close()` ended what was still waiting for the dispatcher."""


class AuthenticationFailed(ConnectionFailed):
    pass


class ProtocolError(SwarmError):
    pass


class LocalProtocolError(ProtocolError):
    pass


class RemoteProtocolError(ProtocolError):
    pass


class RequestRefused(SwarmError):
    exit_code = 2


class BackendError(SwarmError):
    pass


class StateError(SwarmError):
    exit_code = 2  # a --db / state_db_path that is not a swarm database is bad input


class StateLocked(StateError):
    """Another dispatcher holds the state DB."""

    exit_code = 2


class StateBusy(StateError):
    """A commit that may succeed if tried again (a lock, a full or failing disk); nothing
    of it was stored."""

    def __init__(self, message: str, why: str) -> None:
        super().__init__(message)
        self.why = why
