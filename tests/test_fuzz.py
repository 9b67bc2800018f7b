"""Fuzzing the trust boundaries: the frame decoder, the manifest loader, the config parser.

Properties (checked here with bounded, derandomized examples; `scripts/fuzz.py` runs the
same `check_*` functions on the same strategies for as long as you like):

- `protocol.decode` raises only `RemoteProtocolError`; what decodes re-encodes to an
  equal message, and every value of the declared field types decodes.
- `parse_manifest` / `workflow_from_dict` raise only `ManifestError`, each `Problem` with a
  message and the file; an accepted workflow round-trips through `to_dict()` and can be
  sent as a deploy request; a document built only from valid values is accepted.
- `parse_config` raises only `ConfigError`; an accepted config keeps its own bounds.
- Hostile manifests (alias bombs, deep nesting, non-UTF-8, huge strings, unknown keys,
  100,000 symbols) end in bounded time with a clear error or a workflow.
- A live dispatcher closes each garbage-sending connection with a close code and keeps
  running a workflow to completion.

Known bugs in `swarm` are listed in `KNOWN_BUGS`: each has a minimal reproduction below
marked `xfail(strict=True)`, and the fuzz properties tolerate (and count) exactly that
failure so the rest of the search stays useful. Fix a bug, and its strict xfail turns into
a failure that says to delete its entry here.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import random
import string
import time
import traceback
import types
import typing
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import msgpack
import pytest
import yaml
from e2e_support import Cluster, wait_for, write_manifest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from swarm import protocol as p
from swarm.config import Config, parse_config
from swarm.errors import (
    ConfigError,
    ManifestError,
    RemoteProtocolError,
)
from swarm.manifest import load_manifest, parse_manifest, workflow_from_dict
from swarm.model import CONTEXTS, DISPATCHES, MODES, ON_FAILURE, SYMBOL_TYPES, Workflow

HANG_GUARD = 10.0  # s: a bound against hangs, not a performance goal
FUZZ = settings(
    max_examples=150, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)
FEW = settings(FUZZ, max_examples=60)


# --- known bugs -------------------------------------------------------------------------


@dataclass(frozen=True)
class KnownBug:
    key: str
    summary: str
    matches: Callable[[BaseException], bool]


def _raised_in(exc: BaseException, *parts: str) -> bool:
    files = [f.filename.replace("\\", "/") for f in traceback.extract_tb(exc.__traceback__)]
    return any(part in name for name in files for part in parts)


KNOWN_BUGS: list[KnownBug] = []  # none open: every bug the fuzzing found is fixed
TOLERATE_KNOWN = True  # scripts/fuzz.py --strict turns this off
KNOWN_HITS: Counter[str] = Counter()


def tolerated(exc: BaseException) -> bool:
    """True if `exc` is one of KNOWN_BUGS (counted) and those are tolerated."""
    for bug in KNOWN_BUGS:
        if bug.matches(exc):
            KNOWN_HITS[bug.key] += 1
            return TOLERATE_KNOWN
    return False


# --- the frame decoder ------------------------------------------------------------------

INT64 = st.integers(min_value=p.INT_MIN, max_value=p.INT_MAX)
MSGPACK_INTS = st.integers(min_value=p.INT_MIN, max_value=(1 << 64) - 1)  # what packb takes
TEXT = st.text(max_size=24)
WIRE_DATA = st.recursive(
    st.none() | st.booleans() | INT64 | st.floats() | TEXT | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
ANY_MSGPACK = st.recursive(  # anything msgpack can carry, including what frames must not
    st.none() | st.booleans() | MSGPACK_INTS | st.floats() | TEXT | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(TEXT | st.binary(max_size=4) | st.integers(-3, 3), inner, max_size=4),
    max_leaves=16,
)
_REQUEST_ARGS = {dict: st.dictionaries(TEXT, WIRE_DATA, max_size=3), bool: st.booleans(),
                 str: TEXT, int: INT64}


def _field_strategy(tp: Any) -> st.SearchStrategy[Any]:
    """Every value of one annotated field type (derived from the dataclasses themselves)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return WIRE_DATA
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return st.none() | _field_strategy(inner[0])
    if origin is tuple:
        return st.lists(_field_strategy(typing.get_args(tp)[0]), max_size=3).map(tuple)
    if origin is dict:
        return st.dictionaries(TEXT, _field_strategy(typing.get_args(tp)[1]), max_size=3)
    if tp in p.ITEMS:
        return _message_strategy(tp)
    return {str: TEXT, int: INT64, bool: st.booleans(), float: st.floats(),
            bytes: st.binary(max_size=32)}[tp]


def _message_strategy(cls: type[Any]) -> st.SearchStrategy[Any]:
    if cls is p.Request:
        def request(op: str) -> st.SearchStrategy[p.Request]:
            schema = p.REQUEST_OPS[op]
            need = {k: _REQUEST_ARGS[tp] for k, (tp, required) in schema.items() if required}
            may = {k: _REQUEST_ARGS[tp] for k, (tp, required) in schema.items() if not required}
            return st.builds(p.Request, id=INT64, op=st.just(op),
                             args=st.fixed_dictionaries(need, optional=may))

        return st.sampled_from(sorted(p.REQUEST_OPS)).flatmap(request)
    hints = typing.get_type_hints(cls)
    need, may = {}, {}
    for f in fields(cls):
        required = f.default is MISSING and f.default_factory is MISSING
        (need if required else may)[f.name] = _field_strategy(hints[f.name])
    return st.fixed_dictionaries(need, optional=may).map(lambda kw: cls(**kw))


MESSAGE = st.one_of([_message_strategy(cls) for cls in p.MESSAGES.values()])


def _pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def _dicts_in(value: Any) -> Iterator[dict[Any, Any]]:
    if isinstance(value, dict):
        yield value
        for v in value.values():
            yield from _dicts_in(v)
    elif isinstance(value, list):
        for v in value:
            yield from _dicts_in(v)


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    """A valid frame of any type, then broken: truncated, bit-flipped, spliced, or with a
    field (at any depth) swapped for another type, dropped, added or retagged."""
    msg = draw(MESSAGE)
    how = draw(st.sampled_from(["truncate", "flip", "splice", "swap", "drop", "extra", "retag"]))
    raw = bytearray(p.encode(msg))
    if how == "truncate":
        return bytes(raw[: draw(st.integers(0, len(raw) - 1))])
    if how == "flip":
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, len(raw) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(raw)
    if how == "splice":
        at = draw(st.integers(0, len(raw)))
        raw[at:at] = draw(st.binary(min_size=1, max_size=8))
        return bytes(raw)
    d = p.to_dict(msg)
    target = draw(st.sampled_from(list(_dicts_in(d))))
    if how == "retag":
        d["t"] = draw(st.sampled_from(sorted(p.MESSAGES)) | TEXT)
    elif how == "extra":
        for _ in range(draw(st.integers(1, 3))):
            target[draw(TEXT | st.binary(max_size=4))] = draw(ANY_MSGPACK)
    elif target:
        key = draw(st.sampled_from(sorted(target, key=repr)))
        if how == "drop":
            del target[key]
        else:
            target[key] = draw(ANY_MSGPACK)
    return _pack(d)


@st.composite
def frame_shaped(draw: st.DrawFn) -> bytes:
    """A map with a real or fake type tag and arbitrary values under real field names."""
    t = draw(st.sampled_from(sorted(p.MESSAGES)) | TEXT | ANY_MSGPACK)
    names = sorted({f.name for cls in p.MESSAGES.values() for f in fields(cls)})
    d = draw(st.fixed_dictionaries({"t": st.just(t)},
                                   optional={n: ANY_MSGPACK for n in names}))
    return _pack(d)


@st.composite
def deep_frames(draw: st.DrawFn) -> bytes:
    """Data nested up to and far past the decoder's limit (64) inside valid frames.

    Written as raw msgpack: `packb` itself refuses to nest much past 1,000 levels.
    """
    depth = draw(st.integers(0, 100) | st.integers(0, 20_000))
    units = {"list": b"\x91", "map": b"\x81\xa1k"}  # a one-item array; {"k": ...}
    shape = draw(st.sampled_from(["list", "map", "both"]))
    if shape == "both":
        nested = (units["list"] + units["map"]) * (depth // 2)
    else:
        nested = units[shape] * depth
    nested += _pack(draw(WIRE_DATA))
    where = draw(st.sampled_from(["event", "reply", "request"]))
    fixed, last, wrap = {  # the last field holds the nesting, maybe inside a one-key map
        "event": ({"t": "event", "kind": "k", "ts": 1.0}, "data", b"\x81" + _pack("x")),
        "reply": ({"t": "reply", "id": 1, "ok": True}, "data", b""),
        "request": ({"t": "request", "id": 1, "op": "deploy"}, "args",
                    b"\x81" + _pack("workflow")),
    }[where]
    out = bytes([0x80 | (len(fixed) + 1)])  # a fixmap header
    for key, value in fixed.items():
        out += _pack(key) + _pack(value)
    out += _pack(last) + wrap
    return out + nested


def _has_nan(value: Any) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, dict):
        return any(_has_nan(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_nan(v) for v in value)
    return False


def _round_trips(msg: p.Message) -> None:
    frame = p.encode(msg)  # a message the decoder built must be sendable again
    again = p.decode(frame, max_size=len(frame))
    assert p.encode(again) == frame
    assert again == msg or _has_nan(p.to_dict(msg)), (again, msg)


def check_decode(frame: bytes | str) -> None:
    """Only RemoteProtocolError comes out; whatever decodes, round-trips."""
    try:
        msg = p.decode(frame)
    except RemoteProtocolError as e:
        assert str(e)
        return
    except Exception as e:
        if tolerated(e):
            return
        raise
    _round_trips(msg)


def check_valid_message(msg: p.Message) -> None:
    """Every value of the declared field types is accepted and comes back equal."""
    frame = p.encode(msg)
    _round_trips(p.decode(frame, max_size=len(frame)))


@FUZZ
@given(st.binary(max_size=512) | st.text(max_size=64))
def test_decode_of_arbitrary_bytes_raises_only_remote_protocol_error(frame: bytes | str) -> None:
    check_decode(frame)


@FUZZ
@given(ANY_MSGPACK.map(_pack) | frame_shaped())
def test_decode_of_arbitrary_msgpack_raises_only_remote_protocol_error(frame: bytes) -> None:
    check_decode(frame)


@settings(FUZZ, max_examples=300)
@given(mutated_frames())
def test_decode_of_mutated_valid_frames_raises_only_remote_protocol_error(frame: bytes) -> None:
    check_decode(frame)


@FEW
@given(deep_frames())
def test_decode_of_deeply_nested_frames_raises_only_remote_protocol_error(frame: bytes) -> None:
    check_decode(frame)


@settings(FUZZ, max_examples=200)
@given(MESSAGE)
def test_every_message_type_with_any_valid_fields_round_trips(msg: p.Message) -> None:
    check_valid_message(msg)


def test_the_message_strategy_covers_every_message_type() -> None:
    seen: set[str] = set()
    for cls in p.MESSAGES.values():
        @settings(max_examples=1, database=None, derandomize=True)
        @given(_message_strategy(cls))
        def one(msg: Any) -> None:
            seen.add(msg.T)

        one()
    assert seen == set(p.MESSAGES)


# --- the manifest loader ----------------------------------------------------------------

SOURCE = "fuzz-manifest"
NAME_CHARS = string.ascii_letters + string.digits + "_.-"
# A name may not start with '-' (it reaches command lines): valid names never do.
SYMBOL_NAME = st.builds(str.__add__, st.sampled_from(NAME_CHARS.replace("-", "")),
                        st.text(NAME_CHARS, max_size=9))
NONBLANK = st.text(min_size=1, max_size=16).filter(str.strip)
POS64, NONNEG64 = st.integers(1, p.INT_MAX), st.integers(0, p.INT_MAX)
JSON_DATA = st.recursive(
    st.none() | st.booleans() | INT64 | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=8,
)
PARAMETERS = st.dictionaries(st.text(max_size=8), JSON_DATA, max_size=4)
WRONG = st.one_of(  # a wrong type or a wrong value for any field, as a text format has it
    st.none(), st.booleans(), st.integers(), st.integers(1 << 63, 1 << 200), st.floats(),
    st.text(max_size=16),
    st.sampled_from(["30s", "5 min", "1.5h", "actoin", "interna", "-1", "", " ", "a b",
                     "x" * 300, "rollback", "waves"]),
    st.lists(st.integers() | st.text(max_size=5) | st.none(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
)
WRONG_OBJECTS = WRONG | st.one_of(  # and what only a Python caller can pass
    st.binary(max_size=8), st.tuples(st.integers()), st.frozensets(st.integers(), max_size=2),
    st.dictionaries(st.integers() | st.none() | st.binary(max_size=3), st.integers(),
                    min_size=1, max_size=2),
    st.builds(object),
)
EXTRA_KEY = st.text(max_size=12) | st.sampled_from(
    ["dependency", "param", "prority", "timout", "rolback", "symbol", "names"])


@st.composite
def _retry(draw: st.DrawFn) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if draw(st.booleans()):  # the delays come as a pair: max_delay may not undercut it
        d["initial_delay"] = draw(st.integers(0, 1 << 40))
        d["max_delay"] = draw(st.integers(d["initial_delay"], p.INT_MAX))
    if draw(st.booleans()):
        d["backoff_factor"] = draw(st.floats(1, 1e6) | st.integers(1, 100))
    if draw(st.booleans()):
        d["jitter"] = draw(st.floats(0, 1))
    return d


ROLLBACK = st.fixed_dictionaries({}, optional={
    "name": SYMBOL_NAME, "type": st.sampled_from(SYMBOL_TYPES),
    "context": st.sampled_from(CONTEXTS), "dispatch": st.sampled_from(DISPATCHES),
    "parameters": PARAMETERS, "timeout": POS64, "retries": NONNEG64,
})
SYMBOL_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "type": st.sampled_from(SYMBOL_TYPES),
    "context": st.sampled_from(CONTEXTS),
    "dispatch": st.sampled_from(DISPATCHES),
    "parameters": PARAMETERS,
    "priority": INT64,
    "timeout": POS64,
    "retries": NONNEG64,
    "resources": st.lists(st.text(min_size=1, max_size=8), unique=True, max_size=3),
    "description": st.text(max_size=20),
    "deadline": POS64,
    "requires": st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=2),
    "rollback": ROLLBACK,
    "retry": _retry(),
}
TOP_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "description": st.text(max_size=20),
    "mode": st.sampled_from(MODES),
    "on_failure": st.sampled_from(ON_FAILURE),
    "resources": st.dictionaries(st.text(min_size=1, max_size=6), POS64, max_size=2),
}


@st.composite
def near_valid_documents(draw: st.DrawFn, wrong: st.SearchStrategy[Any] = WRONG
                         ) -> tuple[dict[Any, Any], bool]:
    """A manifest document near the schema, and whether it is valid as built.

    Valid values for a random subset of fields and a random dependency graph (acyclic, or
    anything, cycles and self-dependencies included); then, sometimes, a few fields of the
    top level or of a symbol get a wrong value, go missing, or gain an unknown neighbour.
    """
    names = draw(st.lists(SYMBOL_NAME, min_size=1, max_size=7, unique=True))
    acyclic = draw(st.booleans())
    valid = acyclic
    symbols = []
    for i, name in enumerate(names):
        sym: dict[Any, Any] = {"name": name, "type": draw(SYMBOL_FIELDS["type"])}
        for key in sorted(draw(st.sets(st.sampled_from(sorted(SYMBOL_FIELDS)), max_size=5))):
            sym[key] = draw(SYMBOL_FIELDS[key])
        pool = names[:i] if acyclic else names
        if pool:
            sym["dependencies"] = draw(st.lists(st.sampled_from(pool), unique=True, max_size=3))
        if draw(st.integers(0, 3)) == 0:
            valid &= not _spoil(draw, sym, [*SYMBOL_FIELDS, "name", "dependencies"], wrong,
                                names)
        symbols.append(sym)
    doc: dict[Any, Any] = {"name": draw(NONBLANK), "version": draw(NONBLANK)}
    for key in sorted(draw(st.sets(st.sampled_from(sorted(TOP_FIELDS)), max_size=3))):
        doc[key] = draw(TOP_FIELDS[key])
    doc["symbols"] = draw(st.permutations(symbols))  # dependencies resolve in any order
    if draw(st.integers(0, 5)) == 0:
        valid &= not _spoil(draw, doc, [*TOP_FIELDS, "name", "version", "symbols"], wrong,
                            names)
    return doc, valid


def _spoil(draw: st.DrawFn, d: dict[Any, Any], keys: list[str], wrong: st.SearchStrategy[Any],
           names: list[str]) -> bool:
    """Break one to three things in `d`; True if something was changed."""
    changed = False
    hows = ["wrong", "missing", "extra", "duplicate", "unknown-dep", "huge", "deep"]
    for how in draw(st.lists(st.sampled_from(hows), min_size=1, max_size=3)):
        key = draw(st.sampled_from(keys))
        if how == "wrong":
            d[key] = draw(wrong)
        elif how == "huge" and "type" in d:  # right type, past what the wire carries
            d[draw(st.sampled_from(["priority", "timeout", "retries", "deadline"]))] = \
                draw(st.integers(1 << 63, 1 << 70))
        elif how == "deep" and "type" in d:
            deep: Any = draw(JSON_DATA)
            for _ in range(draw(st.integers(50, 80))):
                deep = [deep]
            d["parameters"] = {"deep": deep}
        elif how == "missing" and key in d:
            del d[key]
        elif how == "extra":
            d[draw(EXTRA_KEY)] = draw(wrong)
        elif how == "duplicate" and "type" in d:  # a symbol taking another's name
            d["name"] = draw(st.sampled_from(names))
        elif how == "unknown-dep" and "type" in d:
            deps = d.get("dependencies")
            d["dependencies"] = [*(deps if isinstance(deps, list) else []),
                                 draw(st.text(max_size=8))]
        else:
            continue
        changed = True
    return changed


class Unrepresentable(Exception):
    pass


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) \
            else repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise Unrepresentable("TOML keys are strings")
        return "{" + ", ".join(f"{_toml_value(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise Unrepresentable(f"TOML has no {type(v).__name__}")


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def dump(doc: dict[Any, Any], fmt: str) -> str:
    """`doc` as manifest text in `fmt`; Unrepresentable if that format cannot carry it."""
    if fmt == "yaml":
        text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False, width=1 << 30)
        if repr(yaml.load(text, Loader=_YAML_LOADER)) != repr(doc):
            # PyYAML does not always read its own output back ('a\x85' comes back 'a ')
            raise Unrepresentable("lost in PyYAML's round trip")
        return text
    if fmt == "json":
        return json.dumps(doc, ensure_ascii=False)
    if not all(isinstance(k, str) for k in doc):
        raise Unrepresentable("TOML keys are strings")
    return "".join(f"{_toml_value(k)} = {_toml_value(v)}\n" for k, v in doc.items())


def check_problems(e: ManifestError, source: str, text: str | None = None) -> None:
    assert e.problems, "a ManifestError without problems"
    last_line = None if text is None else len(text.splitlines()) + 2  # YAML breaks on \x85 too
    for pr in e.problems:
        assert pr.message.strip() and pr.file == source, pr
        if pr.line is not None and last_line is not None:
            assert 1 <= pr.line <= last_line, pr
    assert str(e)


def check_workflow(w: Workflow) -> None:
    """What was accepted is usable: it round-trips, hashes, and goes over the wire."""
    try:
        assert workflow_from_dict(w.to_dict(), w.source) == w
        assert len(w.content_hash) == 64
        frame = p.encode(p.Request(id=1, op="deploy", args={"workflow": w.to_dict()}))
        sent = p.decode(frame, max_size=len(frame))
    except Exception as e:
        if tolerated(e):
            return
        raise
    assert isinstance(sent, p.Request)
    back = workflow_from_dict(sent.args["workflow"], w.source)
    canonical = {"sort_keys": True, "default": repr}  # NaN-proof comparison
    assert json.dumps(back.to_dict(), **canonical) == json.dumps(w.to_dict(), **canonical)


def check_manifest_text(text: str, fmt: str) -> Workflow | None:
    """Only ManifestError comes out of parse_manifest; what loads is usable."""
    try:
        w = parse_manifest(text, SOURCE, fmt)
    except ManifestError as e:
        check_problems(e, SOURCE, text)
        return None
    except Exception as e:
        if tolerated(e):
            return None
        raise
    check_workflow(w)
    return w


def check_document(case: tuple[dict[Any, Any], bool], fmt: str) -> None:
    """A near-valid document in `fmt` ("yaml", "json", "toml" or "dict" for
    workflow_from_dict): clean errors only, and a valid document loads as written."""
    doc, valid = case
    if fmt == "dict":
        try:
            w = workflow_from_dict(doc, SOURCE)
        except ManifestError as e:
            check_problems(e, SOURCE)
            assert not valid, f"a valid document was refused: {e}"
            return
        except Exception as e:
            if tolerated(e):
                return
            raise
        check_workflow(w)
    else:
        try:
            text = dump(doc, fmt)
        except Unrepresentable:
            fmt, text = "json", dump(doc, "json")
        loaded = check_manifest_text(text, fmt)
        if loaded is None:
            if valid:  # refused: say why
                parse_manifest(text, SOURCE, fmt)
            return
        w = loaded
    if valid:
        _same_as_written(w, doc)


_LEFT_OUT = {"resources": {}, "description": "", "requires": {}}  # to_dict omits them empty


def _same_as_written(w: Workflow, doc: dict[Any, Any]) -> None:
    got = w.to_dict()
    for key in ("name", "version", *TOP_FIELDS):
        if key in doc:
            assert got.get(key, _LEFT_OUT.get(key)) == doc[key], key
    assert [s["name"] for s in got["symbols"]] == [s["name"] for s in doc["symbols"]]
    for mine, theirs in zip(doc["symbols"], got["symbols"], strict=True):
        for key, value in mine.items():
            if key in ("rollback", "retry"):
                assert {k: theirs[key][k] for k in value} == value, key
            elif key == "resources":
                assert theirs.get(key, []) == value, (mine["name"], key)
            else:
                assert theirs.get(key, _LEFT_OUT.get(key)) == value, (mine["name"], key)


YAML_TOKENS = st.sampled_from([
    "name: ", "version: ", "symbols:", "parameters: ", "dependencies: ", "type: action",
    "- ", "  ", "\n", "&a ", "*a ", "&b ", "*b ", "<<: ", "? ", ": ", ", ", "{", "}", "[", "]",
    "'", '"', "# c", "|\n", ">\n", "---\n", "...\n", "%YAML 1.1\n", "%TAG ! tag:x,1:\n",
    "!!set ", "!!int ", "!!float ", "!!bool ", "!!str ", "!!null ", "!!binary ", "!!omap ",
    "!!pairs ", "!!timestamp ", "!!map ", "!!seq ", "!local ", "!!python/name:os.system ",
    "1", "0x1F", "0o17", "1_000", "1.5", ".nan", "-.inf", "~", "yes", "off", "2001-12-14",
    "12:30:00", "a", "x", "action", "internal", "\t", "\\u0000", "\x85", "\ufeff", "é",
])
TOML_TOKENS = st.sampled_from([
    "[symbols]", "[[symbols]]", "[symbols.parameters]", "name = ", "version = ", "type = ",
    "parameters = ", "dependencies = ", '"a"', "'b'", '"""m"""', "1", "-0", "0x1F", "1e400",
    "nan", "inf", "true", "1979-05-27", "07:32:00", "1979-05-27T07:32:00Z", "[", "]", "{",
    "}", "=", ",", ".", "\n", " ", "#", "a", '"\\u0000"', "\\", "\r\n",
])
JSON_TOKENS = st.sampled_from([
    "{", "}", "[", "]", ",", ":", '"name"', '"version"', '"symbols"', '"type"', '"action"',
    '"parameters"', '"dependencies"', '"a"', "1", "-0", "1e400", "NaN", "Infinity", "true",
    "null", '"\\ud800"', '"\\u0000"', " ", "\n",
])


@pytest.mark.parametrize("fmt", ["yaml", "toml", "json"])
@FUZZ
@given(text=st.text(max_size=200))
def test_manifest_of_arbitrary_text_raises_only_manifest_error(fmt: str, text: str) -> None:
    check_manifest_text(text, fmt)


@pytest.mark.parametrize("fmt, tokens", [("yaml", YAML_TOKENS), ("toml", TOML_TOKENS),
                                         ("json", JSON_TOKENS)])
@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_manifest_of_token_soup_raises_only_manifest_error(fmt: str, tokens: Any,
                                                           data: st.DataObject) -> None:
    check_manifest_text("".join(data.draw(st.lists(tokens, max_size=40))), fmt)


@pytest.mark.parametrize("fmt", ["yaml", "json", "toml", "dict"])
@settings(FUZZ, max_examples=120)
@given(case=near_valid_documents())
def test_near_valid_manifests_give_clean_errors_and_valid_ones_load_as_written(
        fmt: str, case: tuple[dict[Any, Any], bool]) -> None:
    check_document(case, fmt)


@FUZZ
@given(case=near_valid_documents(WRONG_OBJECTS))
def test_workflow_from_dict_takes_any_python_object_in_any_field(
        case: tuple[dict[Any, Any], bool]) -> None:
    check_document(case, "dict")


@FEW
@given(doc=WRONG_OBJECTS | st.lists(WRONG_OBJECTS, max_size=3))
def test_workflow_from_dict_of_a_non_document_is_a_manifest_error(doc: object) -> None:
    with pytest.raises(ManifestError) as e:
        workflow_from_dict(doc, SOURCE)
    check_problems(e.value, SOURCE)


# --- the config parser ------------------------------------------------------------------


def _sections(cls: type[Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """Every TOML table of the config with its keys and their defaults."""
    out: dict[str, dict[str, Any]] = {prefix: {}}
    for f in fields(cls):
        if f.name in ("path", "base_dir"):
            continue
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        name = f"{prefix}.{f.name}" if prefix else f.name
        if hasattr(default, "__dataclass_fields__"):
            out.update(_sections(type(default), name))
        else:
            out[prefix][f.name] = default
    return out


def _toml_containers(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    arrays = st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]")
    keys = st.sampled_from(sorted(DISPATCHES)) | st.text(NAME_CHARS, min_size=1, max_size=6)
    tables = st.dictionaries(keys, inner, max_size=3).map(
        lambda d: "{" + ", ".join(f"{k} = {v}" for k, v in d.items()) + "}")
    return arrays | tables


CONFIG_SECTIONS = _sections(Config)
TOML_LITERAL = st.recursive(  # any TOML value, as text: numbers huge and odd, dates, tables
    st.one_of(st.integers(), st.integers(-5, 70_000), st.floats(), st.booleans(),
              st.text(max_size=12),
              st.sampled_from(["FULL", "normal", "debug", "INFO", "internal", "ws://x:1"])
              ).map(_toml_value)
    | st.sampled_from(["1979-05-27", "07:32:00", "1979-05-27T07:32:00Z", "9" * 5000]),
    _toml_containers,
    max_leaves=6,
)


def _right_literal(default: Any) -> st.SearchStrategy[str]:
    if isinstance(default, bool):
        return st.booleans().map(_toml_value)
    if isinstance(default, int):
        return st.integers(-2, 100_000).map(_toml_value)
    if isinstance(default, float):
        return (st.floats() | st.sampled_from([math.nan, math.inf, -math.inf])).map(_toml_value)
    if isinstance(default, dict):
        return st.dictionaries(st.sampled_from(DISPATCHES), st.booleans(), max_size=4).map(
            _toml_value)
    return st.sampled_from(["", "FULL", "NORMAL", "debug", "info", "x", "./state.db"]).map(
        _toml_value)


@st.composite
def config_texts(draw: st.DrawFn) -> str:
    """TOML built from the real tables and keys, with right or wrong values and typos."""
    lines = []
    for section in draw(st.lists(st.sampled_from(sorted(CONFIG_SECTIONS)) | EXTRA_KEY,
                                 max_size=4)):
        if section:
            lines.append(f"[{section}]" if draw(st.integers(0, 9)) else f"[[{section}]]")
        keys = CONFIG_SECTIONS.get(section, {})
        for key in draw(st.lists(st.sampled_from(sorted(keys) or ["x"]) | EXTRA_KEY,
                                 max_size=4)):
            right = key in keys and draw(st.booleans())
            value = draw(_right_literal(keys[key]) if right else TOML_LITERAL)
            lines.append(f"{_toml_value(key) if not key.isidentifier() else key} = {value}")
        if draw(st.integers(0, 9)) == 0:
            lines.append(draw(st.text(max_size=20)))
    return "\n".join(lines) + "\n"


def check_config(text: str) -> None:
    """Only ConfigError comes out; an accepted config keeps the bounds it checks."""
    try:
        cfg = parse_config(text, path="fuzz.toml")
    except ConfigError as e:
        assert str(e).startswith("fuzz.toml: ") and len(str(e)) > len("fuzz.toml: ")
        return
    except Exception as e:
        if tolerated(e):
            return
        raise
    try:
        assert 0 <= cfg.dispatcher.websocket_port <= 65535
        assert cfg.retry.backoff_factor >= 1, f"backoff_factor {cfg.retry.backoff_factor}"
        assert 0 <= cfg.retry.jitter <= 1, f"jitter {cfg.retry.jitter}"
        assert cfg.worker.max_concurrent_tasks >= 1
    except AssertionError as e:
        if tolerated(e):
            return
        raise


@FUZZ
@given(st.text(max_size=200))
def test_config_of_arbitrary_text_raises_only_config_error(text: str) -> None:
    check_config(text)


@settings(FUZZ, max_examples=300)
@given(config_texts())
def test_config_of_near_valid_toml_raises_only_config_error(text: str) -> None:
    check_config(text)


# --- hostile manifests ------------------------------------------------------------------


def load_bounded(text: str | bytes, fmt: str, tmp_path: Path) -> Workflow | ManifestError:
    """Load through a file, as users do; a Workflow or the ManifestError, within the guard."""
    path = tmp_path / f"hostile.{fmt}"
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    start = time.monotonic()
    try:
        result: Workflow | ManifestError = load_manifest(path)
    except ManifestError as e:
        check_problems(e, str(path))
        result = e
    took = time.monotonic() - start
    assert took < HANG_GUARD, f"took {took:.1f} s"
    return result


HEAD_YAML = "name: hostile\nversion: '1'\nsymbols:\n  - name: a\n    type: action\n"


def alias_bomb(used_in: str = "parameters", levels: int = 9, width: int = 10) -> str:
    """'Billion laughs': `levels` anchors in a's parameters, each `width` aliases of the one
    before (10**9 strings once expanded); then maybe a second symbol uses the last one."""
    lines = ["      l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"      l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    text = HEAD_YAML + "    parameters:\n" + "\n".join(lines) + "\n"
    last = f"*l{levels - 1}"
    if used_in == "parameters":
        return text
    if used_in == "top level":
        return text + f"junk: {last}\n"
    return text + f"  - name: b\n    type: action\n    {used_in}: {last}\n"


def expanded_size(value: Any, memo: dict[int, int] | None = None) -> int:
    """How many values `value` holds once aliases are expanded (without expanding them)."""
    memo = {} if memo is None else memo
    if id(value) in memo:
        return memo[id(value)]
    children = value.values() if isinstance(value, dict) else \
        value if isinstance(value, list) else ()
    n = 1 + sum(expanded_size(c, memo) for c in children)
    memo[id(value)] = n
    return n


@pytest.mark.parametrize("used_in", ["parameters", "dependencies", "resources", "requires",
                                     "description", "rollback", "top level"])
def test_yaml_alias_bomb_loads_in_bounded_time(tmp_path: Path, used_in: str) -> None:
    result = load_bounded(alias_bomb(used_in), "yaml", tmp_path)
    if used_in == "parameters":
        assert isinstance(result, (Workflow, ManifestError))
    else:
        assert isinstance(result, ManifestError)
        assert max(len(pr.message) for pr in result.problems) < 200


def test_yaml_alias_bomb_is_refused_or_small_once_expanded(tmp_path: Path) -> None:
    result = load_bounded(alias_bomb(), "yaml", tmp_path)
    if isinstance(result, Workflow):  # (never let pytest repr it: that expands it)
        size = expanded_size(result.symbols[0].parameters)
        assert size < 10**7, f"{size} values once expanded"


@pytest.mark.parametrize("shape", ["list", "map"])
def test_yaml_nested_10000_deep_ends_cleanly(tmp_path: Path, shape: str) -> None:
    opening, closing = ("[", "]") if shape == "list" else ("{k: ", "}")
    deep = opening * 10_000 + "1" + closing * 10_000
    for text in (deep, HEAD_YAML + f"    parameters: {{deep: {deep}}}\n"):
        assert isinstance(load_bounded(text, "yaml", tmp_path), (Workflow, ManifestError))


@pytest.mark.parametrize("shape", ["list", "map"])
def test_json_nested_10000_deep_ends_cleanly(tmp_path: Path, shape: str) -> None:
    opening, closing = ("[", "]") if shape == "list" else ('{"k": ', "}")
    text = opening * 10_000 + "1" + closing * 10_000
    assert isinstance(load_bounded(text, "json", tmp_path), (Workflow, ManifestError))


def test_toml_nested_10000_deep_ends_cleanly(tmp_path: Path) -> None:
    text = "k = " + "[" * 10_000 + "1" + "]" * 10_000 + "\n"
    assert isinstance(load_bounded(text, "toml", tmp_path), (Workflow, ManifestError))


@pytest.mark.parametrize("depth", [70, 2000])
def test_parameters_nested_too_deep_to_send_are_a_manifest_error(depth: int) -> None:
    text = HEAD_YAML + "    parameters: {deep: " + "[" * depth + "]" * depth + "}\n"
    with pytest.raises(ManifestError):
        w = parse_manifest(text, SOURCE, "yaml")
        frame = p.encode(p.Request(id=1, op="deploy", args={"workflow": w.to_dict()}))
        p.decode(frame)
        assert w.content_hash


@pytest.mark.parametrize("fmt, data", [
    ("yaml", HEAD_YAML.encode() + b"    description: caf\xe9\n"),
    ("yaml", b"\xff\xfe" + HEAD_YAML.encode("utf-16-le")),
    ("json", b'{"name": "\x80\x81"}'),
    ("toml", b'name = "ok"\nversion = "\xc3\x28"\n'),
    ("yaml", bytes(range(256))),
])
def test_non_utf8_manifest_is_a_manifest_error_with_its_line(tmp_path: Path, fmt: str,
                                                              data: bytes) -> None:
    result = load_bounded(data, fmt, tmp_path)
    assert isinstance(result, ManifestError)
    (problem,) = result.problems
    assert "not UTF-8" in problem.message and problem.line is not None


@pytest.mark.parametrize("fmt", ["yaml", "json", "toml"])
def test_a_50_mb_string_value_loads_in_bounded_time(tmp_path: Path, fmt: str) -> None:
    big = "x" * (50 << 20)
    doc = {"name": "big", "version": "1",
           "symbols": [{"name": "a", "type": "action", "parameters": {"blob": big}}]}
    # (PyYAML's emitter takes ~20 s over such a scalar: the YAML is written by hand)
    text = HEAD_YAML + f"    parameters: {{blob: '{big}'}}\n" if fmt == "yaml" else dump(doc, fmt)
    result = load_bounded(text, fmt, tmp_path)
    assert isinstance(result, Workflow)
    assert result.symbols[0].parameters["blob"] == big, "the value came back different"


@pytest.mark.parametrize("field", ["type", "dependencies", "unknown-key"])
def test_a_huge_wrong_value_gives_a_short_message(field: str) -> None:
    big = "q" * (1 << 20)
    sym: dict[str, Any] = {"name": "a", "type": "action"}
    if field == "type":
        sym["type"] = big
    elif field == "dependencies":
        sym["dependencies"] = [big]
    else:
        sym[big] = 1
    with pytest.raises(ManifestError) as e:
        workflow_from_dict({"name": "x", "version": "1", "symbols": [sym]}, SOURCE)
    assert len(str(e.value)) < 10_000


def test_unknown_keys_everywhere_are_each_named(tmp_path: Path) -> None:
    doc: dict[str, Any] = {"name": "x", "version": "1", "symbols": [
        {"name": f"s{i}", "type": "action", **{f"junk{i}_{j}": j for j in range(100)},
         "rollback": {"bogus": 1}, "retry": {"bogus": 2}}
        for i in range(100)]}
    doc.update({f"top{j}": j for j in range(100)})
    result = load_bounded(dump(doc, "yaml"), "yaml", tmp_path)
    assert isinstance(result, ManifestError)
    assert len(result.problems) == 100 + 100 * 102
    assert all("unknown key" in pr.message for pr in result.problems)
    assert {pr.field for pr in result.problems} >= {"top7", "junk3_99", "rollback.bogus",
                                                    "retry.bogus"}


def test_a_100000_symbol_manifest_loads_or_errors_cleanly(tmp_path: Path) -> None:
    n = 100_000
    text = "name: big\nversion: '1'\nsymbols:\n" + "".join(
        f"  - {{name: s{i}, type: action, dependencies: [s{(i - 1) // 2}]}}\n" if i else
        "  - {name: s0, type: action}\n" for i in range(n))
    result = load_bounded(text, "yaml", tmp_path)
    assert isinstance(result, Workflow) and len(result.symbols) == n


@pytest.mark.parametrize("tagged", ["!!int x", "!!int", "!!float x", "!!bool x",
                                    "!!timestamp x"])
def test_a_bad_explicitly_tagged_yaml_scalar_is_a_manifest_error(tagged: str) -> None:
    with pytest.raises(ManifestError):
        parse_manifest(f"name: {tagged}\n", SOURCE, "yaml")


@pytest.mark.parametrize("fmt", ["yaml", "json", "toml", "config"])
def test_an_integer_of_5000_digits_is_a_clean_error(fmt: str) -> None:
    digits = "9" * 5000
    if fmt == "config":
        with pytest.raises(ConfigError):
            parse_config(f"[dispatcher]\nwebsocket_port = {digits}\n")
        return
    text = {"yaml": f"priority: {digits}\n", "json": f'{{"priority": {digits}}}',
            "toml": f"priority = {digits}\n"}[fmt]
    with pytest.raises(ManifestError):
        parse_manifest(text, SOURCE, fmt)


def test_a_lone_surrogate_in_yaml_text_is_a_manifest_error() -> None:
    with pytest.raises(ManifestError):
        parse_manifest('name: "\ud800"\n', SOURCE, "yaml")


@pytest.mark.parametrize("field", ["priority", "timeout", "retries", "deadline"])
@pytest.mark.parametrize("value", [1 << 63, 1 << 64])  # msgpack packs the first, not the second
def test_an_integer_field_beyond_64_bits_is_a_manifest_error(field: str, value: int) -> None:
    with pytest.raises(ManifestError):
        parse_manifest(HEAD_YAML + f"    {field}: {value}\n", SOURCE, "yaml")


def test_a_nan_backoff_factor_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        parse_config("[retry]\nbackoff_factor = nan\n")


def test_a_frame_with_str_and_bytes_unknown_keys_is_a_remote_protocol_error() -> None:
    with pytest.raises(RemoteProtocolError):
        p.decode(_pack({"t": "ack", "tokens": [], b"x": 1, "y": 2}))


# --- a live dispatcher under garbage ----------------------------------------------------

CLOSE_BAD = {p.CLOSE_INVALID_DATA}
CLOSE_REFUSED = {p.CLOSE_POLICY}


@contextlib.contextmanager
def _session(url: str) -> Iterator[ClientConnection]:
    """A raw connection to the dispatcher, past its challenge."""
    assert url.startswith("ws://127.0.0.1:"), url  # only ever the cluster's own dispatcher
    with connect(url, compression=None, max_size=None, open_timeout=5, close_timeout=2) as ws:
        assert isinstance(p.decode(ws.recv(timeout=5)), p.Challenge)
        yield ws


def _close_code(ws: ClientConnection, frames: list[bytes | str], timeout: float = 8.0
                ) -> int | str:
    """Send `frames`, then read until the dispatcher closes: its close code."""
    deadline = time.monotonic() + timeout
    try:
        for frame in frames:
            ws.send(frame)
        for _ in range(100):
            ws.recv(timeout=max(0.05, deadline - time.monotonic()))
        return "still open after 100 frames"
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd is not None else "closed without a close frame"
    except TimeoutError:
        return "still open"


def _attack(url: str, frames: list[bytes | str], timeout: float = 8.0) -> int | str:
    with _session(url) as ws:
        return _close_code(ws, frames, timeout)


def _hello(role: str = "client", **kw: Any) -> bytes:
    return p.encode(p.Hello(role=role, name=f"fuzz-{role}", **kw))


def _attacks(rng: random.Random) -> list[tuple[str, list[bytes | str], set[int]]]:
    """(what, frames sent after the challenge, close codes the dispatcher may answer with)."""
    results = p.encode(p.Results(items=(p.TaskResult(token=1 << 40, task_id="nope", ok=True),)))
    status = p.encode(p.Request(id=1, op="status"))
    worker = _hello("worker", slots=1)  # no backends: the dispatcher gives it no task
    flipped = bytearray(results)
    for _ in range(3):
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
    return [
        ("random bytes", [rng.randbytes(rng.randrange(1, 300))], CLOSE_BAD),
        ("truncated hello", [_hello()[: rng.randrange(1, len(_hello()))]], CLOSE_BAD),
        ("text frame", ['{"t": "hello", "role": "client", "name": "x"}'], CLOSE_BAD),
        ("empty frame", [b""], CLOSE_BAD),
        ("hello with a wrong field type", [_pack({"t": "hello", "role": "client", "name": 5})],
         CLOSE_BAD),
        ("results before hello", [results], CLOSE_REFUSED),
        ("request before hello", [status], CLOSE_REFUSED),
        ("challenge as hello", [p.encode(p.Challenge(nonce=b"n"))], CLOSE_REFUSED),
        ("hello of an unknown role", [_hello("admin")], CLOSE_REFUSED),
        ("hello of a future version", [_hello(v=99)], CLOSE_REFUSED),
        ("worker without slots", [_hello("worker")], CLOSE_REFUSED),
        ("second hello", [_hello(), _hello()], CLOSE_REFUSED),
        ("client sends results", [_hello(), results], CLOSE_REFUSED),
        ("client sends a heartbeat", [_hello(), p.encode(p.Heartbeat(free=1))], CLOSE_REFUSED),
        ("client sends bit-flipped results", [_hello(), bytes(flipped)],
         CLOSE_BAD | CLOSE_REFUSED),
        ("worker sends a request", [worker, status], CLOSE_REFUSED),
        ("worker sends a welcome", [worker, p.encode(p.Welcome("x", 1))], CLOSE_REFUSED),
        ("worker: stale results, heartbeat, then garbage",
         [worker, results, p.encode(p.Heartbeat(free=1, running=(1 << 41,))),
          rng.randbytes(40)], CLOSE_BAD),
        ("request with a wrong argument type",
         [_hello(), _pack({"t": "request", "id": 1, "op": "run", "args": {"run_id": 5}})],
         CLOSE_BAD),
        ("request of an unknown op", [_hello(), _pack({"t": "request", "id": 1, "op": "rm"})],
         CLOSE_BAD),
        ("request with an unknown argument",
         [_hello(), _pack({"t": "request", "id": 1, "op": "status", "args": {"x": 1}})],
         CLOSE_BAD),
        ("truncated request", [_hello(), status[:-1]], CLOSE_BAD),
        ("text frame after hello", [_hello(), "status"], CLOSE_BAD),
        # Before its hello, and from a worker, max_frame_size (1 MiB) holds; an
        # authenticated client may send up to max_request_size (a large deploy).
        ("frame over max_size before hello", [b"\x00" * (2 << 20)], {p.CLOSE_TOO_BIG}),
        ("worker frame over max_size",
         [_hello("worker", slots=1), b"\x00" * (2 << 20)], {p.CLOSE_TOO_BIG}),
        # Sent right behind the hello, before the welcome: either limit may still apply.
        ("client garbage of 2 MiB", [_hello(), b"\x00" * (2 << 20)],
         CLOSE_BAD | {p.CLOSE_TOO_BIG}),
    ]


def _refused_requests_then_garbage(url: str) -> int | str:
    """Valid requests the dispatcher must refuse with a Reply, then a broken frame."""
    with _session(url) as ws:
        ws.send(_hello())
        assert isinstance(p.decode(ws.recv(timeout=5)), p.Welcome)
        return _refused_then_garbage(ws)


def _refused_then_garbage(ws: ClientConnection) -> int | str:
    asks = [p.Request(id=1, op="run", args={"run_id": "no-such-run"}),
            p.Request(id=2, op="deploy", args={"workflow": {"name": 1}, "follow": False}),
            p.Request(id=3, op="rollback", args={"run_id": "no-such-run"}),
            p.Request(id=4, op="watch", args={"run_id": "no-such-run"})]
    for ask in asks:
        ws.send(p.encode(ask))
        reply = p.decode(ws.recv(timeout=5))
        assert isinstance(reply, p.Reply) and reply.id == ask.id and not reply.ok, reply
        assert reply.error and reply.code == 2, reply
    ws.send(p.encode(p.Request(id=5, op="status")))
    reply = p.decode(ws.recv(timeout=5))
    assert isinstance(reply, p.Reply) and reply.ok  # and it still serves this connection
    return _close_code(ws, [p.encode(p.Request(id=6, op="status"))[:3]])


def _attack_round(url: str, rng: random.Random, pool: concurrent.futures.Executor
                  ) -> list[str]:
    """Every attack once, in parallel; the list of what went wrong."""
    jobs = {pool.submit(_attack, url, frames): (what, codes)
            for what, frames, codes in _attacks(rng)}
    jobs[pool.submit(_refused_requests_then_garbage, url)] = ("refused requests", CLOSE_BAD)
    wrong = []
    for job in concurrent.futures.as_completed(jobs, timeout=60):
        what, codes = jobs[job]
        code = job.result()
        if code not in codes:
            wrong.append(f"{what}: closed with {code!r}, expected one of {sorted(codes)}")
    return wrong


def delay_dag(n: int = 20, ms: int = 50) -> str:
    """A DAG of `n` internal delay symbols, four wide: each level needs the previous one."""
    out = ["name: fuzz-dag", "version: '1'", "symbols:"]
    for i in range(n):
        deps = [f"d{j}" for j in range(i - i % 4 - 4, i - i % 4) if j >= 0][: 1 + i % 3]
        out += [f"  - name: d{i}", "    type: action", f"    dependencies: [{', '.join(deps)}]",
                f"    parameters: {{handler: delay, ms: {ms}}}"]
    return "\n".join(out) + "\n"


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_a_live_dispatcher_survives_garbage_while_a_workflow_completes(
        cluster: Cluster) -> None:
    cluster.start_dispatcher()
    cluster.start_worker("w1")
    url = cluster.url
    rng = random.Random(20240611)
    manifest = write_manifest(cluster.root, delay_dag())
    wrong: list[str] = []
    rounds = overlapping = 0
    run_id = ""
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        # The silent peer: nothing within the hello timeout (5 s) gets a policy close.
        silent = pool.submit(_attack, url, [], 10)
        with concurrent.futures.ThreadPoolExecutor(1) as side:
            first = side.submit(_attack_round, url, rng, pool)  # running during the deploy
            run_id = cluster.detach(manifest)
            wrong += first.result(timeout=60)
        rounds = 1
        deadline = time.monotonic() + 40
        while rounds < 30 and time.monotonic() < deadline:
            status = cluster.query("SELECT status FROM runs WHERE run_id = ?", (run_id,))
            if status and status[0]["status"] != "running":
                break
            overlapping += 1
            wrong += _attack_round(url, rng, pool)
            rounds += 1
        if silent.result(timeout=15) != p.CLOSE_POLICY:
            wrong.append(f"silent peer: closed with {silent.result()!r}")
    assert not wrong, "\n".join(wrong)
    assert overlapping >= 1, "the workflow finished before the garbage started"

    wait_for(lambda: cluster.query("SELECT 1 FROM runs WHERE run_id = ? AND status != 'running'",
                                   (run_id,)), timeout=30, what="the run to end")
    tasks = cluster.tasks(run_id)
    assert len(tasks) == 20
    assert {t["state"] for t in tasks.values()} == {"completed"}
    assert {t["node"] for t in tasks.values()} == {"w1"}  # no fake worker got any work
    assert cluster.query("SELECT status FROM runs WHERE run_id = ?",
                         (run_id,))[0]["status"] == "completed"
    assert cluster.procs["dispatcher"].poll() is None

    def nodes() -> list[str]:
        cp = cluster.cli("status", str(cluster.config_path), "--url", url, "--json")
        assert cp.returncode == 0, cp.stderr
        return [n["name"] for n in json.loads(cp.stdout)["nodes"]]

    wait_for(lambda: nodes() == ["w1"], timeout=15, what="status to show only w1",
             interval=0.2)
    log = cluster.log("dispatcher")
    assert "Traceback" not in log and "connection handler failed" not in log, log[-3000:]


@pytest.mark.e2e
def test_a_live_dispatcher_closes_a_mixed_key_frame_with_1007(cluster: Cluster) -> None:
    cluster.start_dispatcher()
    frame = _pack({"t": "hello", "role": "client", "name": "x", b"k": 1, "z": 2})
    assert _attack(cluster.url, [frame]) == p.CLOSE_INVALID_DATA
