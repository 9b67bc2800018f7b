"""Wire messages as frozen dataclasses <-> msgpack frames (DESIGN §7).

Every frame is one msgpack map `{"t": type, ...}`. `decode()` turns bytes into a
message dataclass or raises RemoteProtocolError; nothing past this module ever sees
an unvalidated value. `encode()` is the inverse. No pickle, no ext types.

Handshake: the dispatcher sends `Challenge` (a nonce) on connect; the peer's first
frame must be `Hello` carrying HMAC-SHA256(token, nonce) when a token is configured;
the dispatcher answers `Welcome`. Then workers exchange Assign/Results/Ack/Heartbeat/
Abandon/Draining and Progress/Kept (checkpoints and progress of running attempts; `Kept`
answers a checkpoint once it is committed), and clients send `Request` and receive
`Reply` and `Event`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, Union

import msgpack  # type: ignore[import-untyped]

from .errors import LocalProtocolError, RemoteProtocolError

# 2: events travel in batches (one "events" frame per commit); 3: node identities proven
# by a per-node secret, heartbeats count the assignments received; 4: progress reports and
# checkpoints (`progress`/`kept` frames), assignments carry the checkpoint to resume from
PROTOCOL_VERSION = 4
MAX_NAME = 256
# Node names reach logs, reports and command lines: a host name's characters, bounded.
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,63}")

# Close codes (RFC 6455 §7.4.1 plus the 4000 range for our own reasons).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_HEARTBEAT = 4000  # silent past heartbeat_timeout
CLOSE_REPLACED = 4001


@dataclass(frozen=True, slots=True)
class Challenge:
    T: ClassVar[str] = "challenge"
    nonce: bytes
    v: int = PROTOCOL_VERSION
    auth: bool = False


@dataclass(frozen=True, slots=True)
class Hello:
    T: ClassVar[str] = "hello"
    role: str  # worker | client
    name: str
    v: int = PROTOCOL_VERSION
    capabilities: tuple[str, ...] = ()
    slots: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    proof: bytes = b""
    running: tuple[int, ...] = ()  # attempt tokens a reconnecting worker still runs
    pid: int = 0
    # A reconnecting worker's identity (from its first Welcome), proven by
    # HMAC(node secret, nonce): only then may it adopt attempts or report orphaned ones.
    node_id: str = ""
    node_proof: bytes = b""
    max_size: int = 0  # bytes of one frame the peer accepts (0: the dispatcher's limit)


@dataclass(frozen=True, slots=True)
class Welcome:
    T: ClassVar[str] = "welcome"
    node_id: str
    heartbeat_interval: int  # ms the dispatcher expects between heartbeats
    version: str = ""
    node_secret: bytes = b""  # a worker's proof of `node_id` when it reconnects
    max_checkpoint_size: int = 0  # bytes of JSON a checkpoint may take (0: no limit)


@dataclass(frozen=True, slots=True)
class TaskAssignment:
    T: ClassVar[str] = "task"
    task_id: str
    run_id: str
    symbol: str
    type: str
    context: str
    dispatch: str
    parameters: dict[str, Any]
    attempt: int
    token: int
    timeout: int  # ms for this attempt
    # Env name -> secret reference, resolved by the worker: values never cross the wire.
    secrets: dict[str, str] = field(default_factory=dict)
    # The last checkpoint committed for the symbol (None: start from scratch).
    checkpoint: Any = None


@dataclass(frozen=True, slots=True)
class Assign:
    T: ClassVar[str] = "assign"
    tasks: tuple[TaskAssignment, ...]


@dataclass(frozen=True, slots=True)
class TaskResult:
    T: ClassVar[str] = "result"
    token: int
    task_id: str
    ok: bool
    output: Any = None
    error: str = ""
    exit_code: int | None = None
    retryable: bool = True
    timed_out: bool = False
    duration_ms: float = 0.0
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False


@dataclass(frozen=True, slots=True)
class Results:
    T: ClassVar[str] = "results"
    items: tuple[TaskResult, ...]


@dataclass(frozen=True, slots=True)
class Ack:
    T: ClassVar[str] = "ack"
    tokens: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ProgressReport:
    """What a running attempt said of itself: a checkpoint to keep, and/or how far it is.
    `seq` counts an attempt's reports: the acknowledgement of one covers those before."""

    T: ClassVar[str] = "report"
    token: int
    task_id: str
    seq: int
    checkpoint: Any = None  # None: no checkpoint in this report
    progress: float | None = None  # 0.0 to 1.0
    message: str = ""
    oversize: int = 0  # bytes of a checkpoint too big to send (refused by the worker)


@dataclass(frozen=True, slots=True)
class Progress:
    T: ClassVar[str] = "progress"
    items: tuple[ProgressReport, ...]


@dataclass(frozen=True, slots=True)
class CheckpointKept:
    """The answer to a report with a checkpoint, sent once its fate is committed."""

    T: ClassVar[str] = "checkpoint_kept"
    token: int
    seq: int
    error: str = ""  # why it was not kept ("" : kept)


@dataclass(frozen=True, slots=True)
class Kept:
    T: ClassVar[str] = "kept"
    items: tuple[CheckpointKept, ...]


@dataclass(frozen=True, slots=True)
class Heartbeat:
    T: ClassVar[str] = "heartbeat"
    free: int
    running: tuple[int, ...] = ()  # attempts running, or finished with results unacknowledged
    assigned: int = 0  # tasks received on this connection when the heartbeat was sent


@dataclass(frozen=True, slots=True)
class Abandon:
    T: ClassVar[str] = "abandon"
    tokens: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Draining:
    T: ClassVar[str] = "draining"


@dataclass(frozen=True, slots=True)
class Request:
    T: ClassVar[str] = "request"
    id: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reply:
    T: ClassVar[str] = "reply"
    id: int
    ok: bool
    data: Any = None
    error: str = ""
    code: int = 0  # exit code the CLI should use when ok is false


@dataclass(frozen=True, slots=True)
class Event:
    T: ClassVar[str] = "event"
    kind: str
    ts: float
    run_id: str | None = None
    task_id: str | None = None
    symbol: str | None = None
    node: str | None = None
    attempt: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    seq: int = 0


@dataclass(frozen=True, slots=True)
class Events:
    """The events of one group commit, in order: one frame instead of one per event."""

    T: ClassVar[str] = "events"
    items: tuple[Event, ...]


Message = (Challenge | Hello | Welcome | Assign | Results | Ack | Heartbeat | Abandon | Draining
           | Request | Reply | Event | Events | Progress | Kept)
MESSAGES: dict[str, type[Any]] = {
    c.T: c
    for c in (
        Challenge, Hello, Welcome, Assign, Results, Ack, Heartbeat, Abandon, Draining,
        Request, Reply, Event, Events, Progress, Kept,
    )
}
# Dataclasses that travel inside other messages (as maps).
ITEMS = (TaskAssignment, TaskResult, Event, ProgressReport, CheckpointKept)
# Requests a client may make, with the type of each argument (None: optional).
REQUEST_OPS: dict[str, dict[str, tuple[type, bool]]] = {
    "deploy": {"workflow": (dict, False), "follow": (bool, False), "new": (bool, False),
               "resume": (str, False)},
    "rollback": {"run_id": (str, True), "follow": (bool, False)},
    "pause": {"run_id": (str, True)},
    "resume": {"run_id": (str, True)},
    "cancel": {"run_id": (str, True), "rollback": (bool, False), "follow": (bool, False)},
    "report": {"run_id": (str, True)},
    "status": {},
    "run": {"run_id": (str, True)},
    "runs": {"limit": (int, False)},
    "watch": {"run_id": (str, False), "since": (int, False)},
    "prune": {"older_than": (str, True), "dry_run": (bool, False)},
    "backup": {"path": (str, True)},
}


def proof_for(token: str, nonce: bytes) -> bytes:
    """HMAC-SHA256 of the nonce under the shared token: the token never crosses the wire."""
    return hmac.new(token.encode(), nonce, hashlib.sha256).digest()


def check_proof(token: str, nonce: bytes, proof: bytes) -> bool:
    return hmac.compare_digest(proof_for(token, nonce), proof)


def proof_of(secret: bytes, nonce: bytes) -> bytes:
    """A node's proof of its identity: HMAC-SHA256 of the nonce under its node secret."""
    return hmac.new(secret, nonce, hashlib.sha256).digest()


def check_proof_bytes(secret: bytes, nonce: bytes, proof: bytes) -> bool:
    return hmac.compare_digest(proof_of(secret, nonce), proof)


# --- encoding -------------------------------------------------------------------------


_REQUIRED = object()
_Names = tuple[tuple[str, bool, Any], ...]
_NAMES: dict[type[Any], _Names] = {}


def _names(cls: type[Any]) -> _Names:
    """Per field of a class: its name, whether it holds a tuple of item dataclasses
    (msgpack packs everything else, tuples included, as it is), and its default."""
    names = _NAMES.get(cls)
    if names is None:
        hints = typing.get_type_hints(cls)
        names = _NAMES[cls] = tuple(
            (f.name,
             typing.get_origin(hints[f.name]) is tuple
             and typing.get_args(hints[f.name])[0] in ITEMS,
             f.default if f.default is not MISSING
             else f.default_factory() if f.default_factory is not MISSING else _REQUIRED)
            for f in fields(cls))
    return names


def _item(value: Any) -> dict[str, Any]:
    return {name: getattr(value, name) for name, _, _ in _names(type(value))}


def _compact_item(value: Any) -> dict[str, Any]:
    """An item without the fields at their default: a no-op task's result is 5 fields
    instead of 12, and the peer decodes fewer."""
    d = {}
    for name, _, default in _names(type(value)):
        v = getattr(value, name)
        if default is _REQUIRED or v != default or type(v) is not type(default):
            d[name] = v
    return d


def to_dict(msg: Message, item: Callable[[Any], dict[str, Any]] = _item) -> dict[str, Any]:
    """A message as plain data, every field present (frames leave out items' defaults)."""
    d: dict[str, Any] = {"t": msg.T}
    for name, nested, _ in _names(type(msg)):
        value = getattr(msg, name)
        d[name] = [item(v) for v in value] if nested else value
    return d


def encode(msg: Message) -> bytes:
    try:
        return msgpack.packb(to_dict(msg, _compact_item), use_bin_type=True, datetime=False)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as e:
        raise LocalProtocolError(f"cannot encode {msg.T}: {e}") from None


# --- decoding -------------------------------------------------------------------------

Check = typing.Callable[[Any, str], Any]
INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1  # what SQLite and every peer can hold
MAX_DEPTH = 64


_SCALARS = frozenset({type(None), bool, float, str, bytes})


def check_data(v: Any, w: str, depth: int = 0) -> Any:
    """Free-form data (parameters, outputs): JSON-like, str keys, 64-bit ints, bounded depth."""
    t: type[Any] = type(v)
    if t in _SCALARS:  # the exact types msgpack decodes to first: most values are these
        return v
    if t is not dict and t is not list and t is not int:  # subclasses, from local code
        if isinstance(v, (bool, float, str, bytes)):
            return v
        t = next((b for b in (dict, list, int) if isinstance(v, b)), type(None))
        if t is type(None):
            _fail(w, "plain data", v)
    if t is int:
        if not INT_MIN <= v <= INT_MAX:
            _fail(w, "a 64-bit integer", v)
        return v
    if depth >= MAX_DEPTH:
        raise RemoteProtocolError(f"field '{w}': nested deeper than {MAX_DEPTH}")
    if t is list:
        for x in v:
            if type(x) not in _SCALARS:
                check_data(x, w, depth + 1)
        return v
    for k, x in v.items():
        if type(k) is not str and not isinstance(k, str):
            _fail(w, "string map keys", k)
        if type(x) not in _SCALARS:
            check_data(x, w, depth + 1)
    return v


def _fail(where: str, expected: str, value: Any) -> typing.NoReturn:
    raise RemoteProtocolError(f"field '{where}': expected {expected}, got {type(value).__name__}")


def _checker(tp: Any) -> Check:
    """Build a validator/converter for one annotated type (done once per class)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return check_data
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        inner = [_checker(a) for a in args if a is not type(None)]
        assert len(inner) == 1, tp

        def opt(v: Any, w: str) -> Any:
            return None if v is None else inner[0](v, w)

        return opt
    if origin is tuple:
        item = _checker(typing.get_args(tp)[0])

        def seq(v: Any, w: str) -> Any:
            if not isinstance(v, list):
                _fail(w, "a list", v)
            return tuple(item(x, w) for x in v)

        return seq
    if origin is dict or tp is dict:
        vtype = typing.get_args(tp)[1] if origin is dict else Any
        vcheck = _checker(vtype)

        def mapping(v: Any, w: str) -> Any:
            if not isinstance(v, dict):
                _fail(w, "a map", v)
            if vtype is Any:  # free-form: checked in place, not copied
                return check_data(v, w)
            for k in v:
                if not isinstance(k, str):
                    _fail(w, "string map keys", k)
            return {k: vcheck(x, f"{w}.{k}") for k, x in v.items()}

        return mapping
    if tp in ITEMS:
        return lambda v, w: _build(tp, v, w)
    if tp is float:

        def number(v: Any, w: str) -> Any:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                _fail(w, "a number", v)
            return float(v)

        return number

    def exact(v: Any, w: str) -> Any:
        if type(v) is not tp:
            _fail(w, tp.__name__, v)
        if tp is int and not INT_MIN <= v <= INT_MAX:
            _fail(w, "a 64-bit integer", v)
        return v

    return exact


_Spec = tuple[tuple[tuple[str, Check, bool], ...], frozenset[str]]
_SPECS: dict[type[Any], _Spec] = {}


def _spec(cls: type[Any]) -> _Spec:
    """Per field: name, checker, required; and every key a frame of `cls` may have."""
    spec = _SPECS.get(cls)
    if spec is None:
        hints = typing.get_type_hints(cls)
        checks = tuple((f.name, _checker(hints[f.name]),
                        f.default is MISSING and f.default_factory is MISSING)
                       for f in fields(cls))
        spec = _SPECS[cls] = (checks, frozenset([*(n for n, _, _ in checks), "t"]))
    return spec


def _build(cls: type[Any], d: Any, where: str) -> Any:
    if type(d) is not dict:
        _fail(where, "a map", d)
    checks, allowed = _spec(cls)
    if not allowed.issuperset(d):
        name = sorted(map(repr, set(d) - allowed))[0][:40]  # keys may mix str and bytes
        raise RemoteProtocolError(f"'{cls.T}' frame has unknown field {name}")
    kwargs = {}
    for name, check, required in checks:
        if name in d:
            kwargs[name] = check(d[name], where + "." + name if where else name)
        elif required:
            raise RemoteProtocolError(f"'{cls.T}' frame lacks field '{name}'")
    return cls(**kwargs)


def _no_ext(code: int, data: bytes) -> Any:
    raise RemoteProtocolError("msgpack ext types are not allowed")


def decode(frame: bytes | str, max_size: int = 1 << 20) -> Message:
    """Decode and validate one frame; RemoteProtocolError says what was wrong."""
    if isinstance(frame, str):
        raise RemoteProtocolError("text frames are not allowed; frames are binary msgpack")
    if len(frame) > max_size:
        raise RemoteProtocolError(f"frame of {len(frame)} bytes exceeds {max_size}")
    try:
        d = msgpack.unpackb(
            frame, raw=False, strict_map_key=True, ext_hook=_no_ext
        )
    except RemoteProtocolError:
        raise
    except Exception as e:  # msgpack raises a zoo of types for broken input
        raise RemoteProtocolError(f"undecodable frame: {type(e).__name__}") from None
    if not isinstance(d, dict):
        raise RemoteProtocolError("a frame must be a msgpack map")
    t = d.get("t")
    cls = MESSAGES.get(t) if isinstance(t, str) else None
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {t!r}")
    msg = _build(cls, d, "")
    if isinstance(msg, Request):
        _check_request(msg)
    return msg  # type: ignore[no-any-return]


def _check_request(req: Request) -> None:
    schema = REQUEST_OPS.get(req.op)
    if schema is None:
        raise RemoteProtocolError(f"unknown request op {req.op!r}")
    for key, value in req.args.items():
        if key not in schema:
            raise RemoteProtocolError(f"request '{req.op}' has unknown argument '{key}'")
        tp = schema[key][0]
        if type(value) is not tp:
            _fail(f"args.{key}", tp.__name__, value)
        check_data(value, f"args.{key}")
    for key, (_, required) in schema.items():
        if required and key not in req.args:
            raise RemoteProtocolError(f"request '{req.op}' lacks argument '{key}'")
