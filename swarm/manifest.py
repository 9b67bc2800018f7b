"""Manifests: YAML, TOML or JSON documents -> a validated `Workflow` (DESIGN §3).

Nothing is half-accepted: every problem of a manifest is collected and raised at once as
`ManifestError`, each `Problem` naming the file, the symbol (its name, or ``#<n>``
counting from 1 when the name is unusable), the field and, where known, the line.
YAML gets lines for field problems too: its events carry positions, and building the
document from them is also the fastest way through PyYAML (see `_read_yaml`).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import tomli
import yaml
from yaml import events
from yaml.nodes import ScalarNode

from swarm.errors import ManifestError, Problem
from swarm.model import (
    CONTEXTS,
    DEFAULT_TIMEOUT_MS,
    DISPATCHES,
    MODES,
    ON_FAILURE,
    SYMBOL_TYPES,
    RetryPolicy,
    RollbackSpec,
    Symbol,
    Workflow,
)
from swarm.plan import find_cycles, gc_paused
from swarm.secrets import REFERENCE_NAME, check_env_name

__all__ = ["load_manifest", "parse_manifest", "workflow_from_dict"]

_FORMATS = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json"}
_NAME = re.compile(r"[A-Za-z0-9_.-]+")

_TOP_KEYS = frozenset(
    {"name", "version", "description", "mode", "on_failure", "resources", "symbols",
     "wait_for_worker", "deadline"}
)
_ROLLBACK_KEYS = frozenset(
    {"name", "type", "context", "dispatch", "parameters", "timeout", "retries", "secrets"}
)
_SYMBOL_KEYS = _ROLLBACK_KEYS | {
    "dependencies", "priority", "resources", "rollback", "description", "retry", "deadline",
    "requires", "wait_for_worker", "heartbeat_timeout", "checkpoint",
}  # fmt: skip
_RETRY_KEYS = frozenset({"initial_delay", "max_delay", "backoff_factor", "jitter"})
_SCALARS = {str, int, float, bool, type(None)}
_SUGGESTION_BUDGET = 20  # difflib over 100,000 names is slow: only the first few get a hint


def _name_problem(name: str) -> str:
    """Why `name` cannot be a symbol name, or "" if it can. Names reach backend command
    lines (`--symbol NAME`), so one starting with '-' would read as an option there."""
    if not _NAME.fullmatch(name):
        return f"invalid name {name!r}: use letters, digits, '_', '.' and '-' only"
    if name.startswith("-"):
        return f"invalid name {name!r}: must not start with '-' (it would read as an option)"
    return ""

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"
_MERGE = object()  # what a plain `<<` key builds to
_PLAIN_TAGS = {None, "!", "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}


def load_manifest(path: str | os.PathLike[str]) -> Workflow:
    """Read and validate a manifest; the format comes from the extension."""
    source = os.fspath(path)
    ext = os.path.splitext(source)[1].lower()
    if ext not in _FORMATS:
        msg = (
            f"unknown manifest format {ext or '(no extension)'!r}: use .yaml, .yml, .toml or .json"
        )
        raise ManifestError([Problem(msg, file=source)])
    try:
        with open(source, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ManifestError([Problem(f"cannot read the file: {e.strerror or e}", source)]) from e
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        msg = f"not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start}"
        raise ManifestError([Problem(msg, source, line=line)]) from None
    return parse_manifest(text, source, _FORMATS[ext])


def parse_manifest(text: str, source: str, fmt: str) -> Workflow:
    """Parse `text` as ``fmt`` ("yaml", "toml" or "json") and validate it."""
    if fmt not in ("yaml", "yml"):
        return _parse(text, source, fmt, None)
    try:  # most manifests are fine: the lines of their keys and items are never asked for
        return _parse(text, source, fmt, _Lines(record=False))
    except ManifestError:
        return _parse(text, source, fmt, _Lines())  # again, to say where each problem is


def _parse(text: str, source: str, fmt: str, lines: _Lines | None) -> Workflow:
    with gc_paused():
        try:
            if lines is not None:
                doc = _read_yaml(text, lines)
            elif fmt == "toml":
                doc = tomli.loads(text)
            elif fmt == "json":
                doc = json.loads(text)
            else:
                raise ManifestError([Problem(f"unknown manifest format {fmt!r}", source)])
        except yaml.YAMLError as e:
            raise ManifestError([_yaml_problem(e, source)]) from None
        except tomli.TOMLDecodeError as e:
            # tomli puts the position in the message: "... (at line 3, column 9)"
            m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", str(e))
            msg = str(e)[: m.start()] + f" (column {m[2]})" if m else str(e)
            line = int(m[1]) if m else text.count("\n") + 1
            raise ManifestError([Problem(f"TOML syntax error: {msg}", source, line=line)]) from None
        except json.JSONDecodeError as e:
            msg = f"JSON syntax error: {e.msg} (column {e.colno})"
            raise ManifestError([Problem(msg, source, line=e.lineno)]) from None
        except RecursionError:
            raise ManifestError([Problem("the document is nested too deeply to read", source)]
                                ) from None
        except (ValueError, KeyError, IndexError, AttributeError, TypeError) as e:
            # The parsers' own limits and PyYAML's constructors for explicit tags (`!!int x`,
            # a 5,000-digit number, a lone surrogate): the text is not a manifest we can read.
            raise ManifestError([Problem(f"cannot read the document: {_clip(str(e))}", source)]
                                ) from None
        return _Checker(source, lines or _Lines()).workflow(doc)


def workflow_from_dict(doc: object, source: str = "<memory>") -> Workflow:
    """Validate a plain document, such as `Workflow.to_dict()` sent over the wire."""
    with gc_paused():
        return _Checker(source, _Lines()).workflow(doc)


# ---------------------------------------------------------------------------------- YAML


class _Lines:
    """1-based source lines of a YAML document's containers and of their keys and items.

    Keyed by id(): the containers live as long as the document being checked.
    """

    __slots__ = ("duplicates", "items", "record", "start", "version")

    def __init__(self, record: bool = True) -> None:
        self.record = record  # False: only duplicates and the version (a first, fast read)
        self.start: dict[int, int] = {}
        self.items: dict[int, Any] = {}  # id -> {key: line} for mappings, [line] for lists
        self.duplicates: list[tuple[object, int]] = []  # PyYAML would keep the last silently
        self.version: str | None = None  # the text of a numeric top-level version: 1.10 stays

    def reset(self) -> None:
        self.start.clear()
        self.items.clear()
        self.duplicates.clear()
        self.version = None

    def of(self, container: object, key: object = None) -> int | None:
        items = self.items.get(id(container))
        if key is not None and items is not None:
            if isinstance(items, dict) and isinstance(key, str) and key in items:
                return int(items[key])
            if isinstance(items, list) and isinstance(key, int) and 0 <= key < len(items):
                return int(items[key])
        return self.start.get(id(container))


class _Fallback(Exception):
    """A construct the fast path does not build itself (e.g. ``!!set``)."""


def _read_yaml(text: str, lines: _Lines) -> object:
    try:
        return _build_yaml(text, lines)
    except _Fallback:
        lines.reset()  # what it holds is partial
        return yaml.load(text, Loader=_Loader)  # _Loader is a safe loader


def _build_yaml(text: str, lines: _Lines) -> object:
    """Build the document from parser events, recording lines on the way.

    PyYAML's own composer and constructor take three times as long (a Python resolver
    call and a Node object per node, then a generator per container); here a plain scalar
    that no implicit resolver can match (most names) is a string at once, and the others
    are resolved once per distinct text. Tags, anchors, aliases and merge keys behave as
    in `yaml.safe_load`; the rare explicit container tags (``!!set``...) fall back to it.
    """
    # Locals, not globals: this loop runs once per event, millions of times for big files.
    Scalar, Alias, DocumentStart, StreamEnd = (
        events.ScalarEvent, events.AliasEvent, events.DocumentStartEvent, events.StreamEndEvent
    )  # fmt: skip
    MapStart, MapEnd = events.MappingStartEvent, events.MappingEndEvent
    ListStart, ListEnd = events.SequenceStartEvent, events.SequenceEndEvent
    record = lines.record
    loader = _Loader(text)
    try:
        # The stubs leave these untyped; events are duck-typed below anyway.
        get_event: Callable[[], Any] = loader.get_event
        resolve: Callable[[type[ScalarNode], str, tuple[bool, bool]], str] = loader.resolve
        resolvers: dict[Any, Any] = loader.yaml_implicit_resolvers
        special = None if None in resolvers else frozenset(resolvers)  # first characters
        plain: dict[str, object] = {}
        anchors: dict[str, object] = {}
        # A frame: [container, item lines, is a list, pending key (boxed) or None,
        #           the key's line, merges or None, the container's line]
        stack: list[list[Any]] = []
        root: object = None
        documents = 0
        while True:
            event = get_event()
            kind = type(event)
            value: Any
            line = 0  # 0: the event's own line, computed only when needed
            if kind is Scalar:
                tag, value = event.tag, event.value
                source = value
                if tag is None and event.implicit[0]:
                    if special is not None and value and value[0] not in special:
                        pass  # no implicit type starts with this character: a string
                    elif value in plain:
                        value = plain[value]
                    else:
                        tag = resolve(ScalarNode, value, (True, False))
                        built = _MERGE if tag == _MERGE_TAG else _construct(loader, event, tag)
                        plain[value] = built
                        value = built
                    if value is _MERGE and (not stack or stack[-1][2] or stack[-1][3]):
                        raise _marked("'<<' (a merge) can only be a mapping key", event)
                elif tag is not None and tag != "!":
                    value = _construct(loader, event, tag)
                if event.anchor is not None:
                    anchors[event.anchor] = value
            elif kind is MapStart or kind is ListStart:
                if event.tag not in _PLAIN_TAGS:
                    raise _Fallback
                is_list = kind is ListStart
                container: Any = [] if is_list else {}
                items: Any = None
                if record:
                    items = [] if is_list else {}
                    line = event.start_mark.line + 1
                    lines.items[id(container)] = items
                    lines.start[id(container)] = line
                if event.anchor is not None:
                    anchors[event.anchor] = container
                stack.append([container, items, is_list, None, 0, None, line])
                continue
            elif kind is MapEnd or kind is ListEnd:
                frame = stack.pop()
                value, line = frame[0], frame[6]
                if frame[5] is not None:
                    _merge(value, frame[5], event)
            elif kind is Alias:
                if event.anchor not in anchors:
                    raise _marked("found undefined alias", event)
                value = anchors[event.anchor]
            elif kind is DocumentStart:
                documents += 1
                if documents > 1:
                    raise _marked("expected a single document in the stream", event)
                continue
            elif kind is StreamEnd:
                return root
            else:
                continue

            if not stack:
                root = value
                continue
            frame = stack[-1]
            if frame[2]:
                frame[0].append(value)
                if record:
                    frame[1].append(line or event.start_mark.line + 1)
            elif frame[3] is None:
                frame[3], frame[4] = (value,), (line or event.start_mark.line + 1) if record else 0
            else:
                key, key_line, frame[3] = frame[3][0], frame[4], None
                if key is _MERGE:
                    frame[5] = (frame[5] or []) + [value]
                    continue
                target = frame[0]
                if kind is Scalar and key == "version" and len(stack) == 1:
                    lines.version = source  # used only if it reads as a number
                try:
                    if key in target:
                        lines.duplicates.append((key, key_line))
                    target[key] = value
                except TypeError:
                    raise _marked(f"found unhashable key ({_describe(key)})", event) from None
                if record:
                    frame[1][key] = key_line
    finally:
        loader.dispose()


def _construct(loader: yaml.SafeLoader, event: Any, tag: str) -> object:
    node = ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
    return loader.construct_object(node)


def _merge(target: dict[Any, Any], merges: list[object], event: object) -> None:
    """``<<: *base`` as PyYAML does it: explicit keys win, then earlier merged maps."""
    merged: dict[Any, Any] = {}
    for value in merges:
        sources = value if isinstance(value, list) else [value]
        if not all(isinstance(s, dict) for s in sources):
            raise _marked("a merge key '<<' needs a mapping or a list of mappings", event)
        for source in reversed(sources):
            merged.update(source)
    merged.update(target)
    target.clear()
    target.update(merged)


def _marked(problem: str, event: object) -> yaml.MarkedYAMLError:
    return yaml.MarkedYAMLError(problem=problem, problem_mark=getattr(event, "start_mark", None))


def _yaml_problem(e: yaml.YAMLError, source: str) -> Problem:
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        text = e.problem or e.context or "invalid YAML"
        if e.problem and e.context:
            text = f"{e.problem} ({e.context})"
        return Problem(f"YAML syntax error: {text}", source, line=mark.line + 1 if mark else None)
    return Problem(f"YAML error: {e}", source)


# ---------------------------------------------------------------------------- validation


@dataclass(slots=True)
class _At:
    """Where a field lives: which symbol, which part of it, which container."""

    symbol: str | None
    prefix: str  # "" for a symbol or the top level, "rollback." or "retry." inside those
    container: dict[Any, Any]


class _Checker:
    def __init__(self, source: str, lines: _Lines) -> None:
        self.source = source
        self.lines = lines
        self.problems: list[Problem] = []
        self.suggestions = _SUGGESTION_BUDGET

    def add(self, message: str, symbol: str | None, fld: str | None, line: int | None) -> None:
        self.problems.append(Problem(message, self.source, symbol, fld, line))

    def bad(self, at: _At, key: str, message: str) -> None:
        self.add(message, at.symbol, at.prefix + key, self.lines.of(at.container, key))

    def workflow(self, doc: object) -> Workflow:
        if not isinstance(doc, dict):
            what = "an empty document" if doc is None else _describe(doc)
            self.add(
                f"the top level must be a mapping with name, version and symbols, got {what}",
                None,
                None,
                None,
            )
            raise ManifestError(self.problems)
        for key, line in self.lines.duplicates:
            msg = f"duplicate key {key!r}: the later value would silently win"
            self.add(msg, None, str(key), line)
        at = _At(None, "", doc)
        self.unknown_keys(at, _TOP_KEYS)
        name = self.string(at, "name", required=True)
        version = doc.get("version")
        if isinstance(version, (int, float)) and not isinstance(version, bool):
            version = self.lines.version or str(version)  # YAML reads `version: 1.0` as a float
        else:
            version = self.string(at, "version", required=True)
        description = self.string(at, "description")
        mode = self.choice(at, "mode", MODES, "rolling")
        on_failure = self.choice(at, "on_failure", ON_FAILURE, "rollback")
        capacities = self.mapping(at, "resources")
        for key, value in capacities.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"capacity of {key!r} must be an integer 1 or more, got {_describe(value)}"
                self.add(msg, None, "resources", self.lines.of(capacities, key))
        wait = self.integer(at, "wait_for_worker", None, 0, " (milliseconds)")
        deadline = self.integer(at, "deadline", None, 1, " (milliseconds)")
        self.problems.sort(key=_by_position(doc))
        symbols = self.symbols(doc.get("symbols"), at)
        if self.problems:
            raise ManifestError(self.problems)
        return Workflow(
            name, str(version), symbols, description, mode, on_failure, capacities, self.source,
            wait_for_worker=wait, deadline=deadline,
        )

    def symbols(self, raw: object, top: _At) -> tuple[Symbol, ...]:
        if raw is None:
            self.bad(top, "symbols", "required field is missing")
            return ()
        if not isinstance(raw, (list, tuple)) or not raw:
            got = "an empty list" if isinstance(raw, (list, tuple)) else _describe(raw)
            self.bad(top, "symbols", f"expected a non-empty list of symbols, got {got}")
            return ()
        # First pass: names, so that dependencies can be resolved in any order.
        labels: list[str] = []
        first: dict[str, int] = {}
        early: dict[int, list[tuple[str, int | None]]] = {}
        for i, entry in enumerate(raw):
            label = f"#{i + 1}"
            name = entry.get("name") if isinstance(entry, dict) else None
            if isinstance(name, str):
                if name in first:
                    msg = f"duplicate symbol name {name!r}: symbol #{first[name] + 1} has it too"
                    early[i] = [(msg, self.lines.of(entry, "name"))]
                else:
                    first[name] = i
                if _NAME.fullmatch(name):
                    label = name  # printable, so problems name it even if it is refused
                why = _name_problem(name)
                if why:
                    early.setdefault(i, []).append((why, self.lines.of(entry, "name")))
            labels.append(label)

        built: list[Symbol] = []
        graph: dict[str, list[str]] = {}
        for i, entry in enumerate(raw):
            for msg, line in early.get(i, ()):
                self.add(msg, labels[i], "name", line)
            if not isinstance(entry, dict):
                line = self.lines.of(raw, i)
                self.add(f"expected a mapping, got {_describe(entry)}", labels[i], None, line)
                continue
            before = len(self.problems)
            symbol = self.symbol(_At(labels[i], "", entry), first)
            if len(self.problems) > before + 1:  # in the order the user wrote the fields
                self.problems[before:] = sorted(self.problems[before:], key=_by_position(entry))
            built.append(symbol)
            if first.get(symbol.name) == i:
                graph[symbol.name] = list(symbol.dependencies)
        for cycle in find_cycles(graph):
            entry = raw[first[cycle[0]]]
            self.add(
                "dependency cycle: " + " -> ".join(cycle),
                labels[first[cycle[0]]],
                "dependencies",
                self.lines.of(entry, "dependencies"),
            )
        return tuple(built)

    def symbol(self, at: _At, names: dict[str, int]) -> Symbol:
        m = at.container
        self.unknown_keys(at, _SYMBOL_KEYS)
        name = m.get("name")
        if not isinstance(name, str):
            name = self.string(at, "name", required=True)
        context = self.choice(at, "context", CONTEXTS, "generic")
        dispatch = self.choice(at, "dispatch", DISPATCHES, "internal")
        raw_rollback = m.get("rollback")
        rollback = None
        if raw_rollback is not None:
            if isinstance(raw_rollback, dict):
                rollback = self.rollback(
                    _At(at.symbol, "rollback.", raw_rollback), name, context, dispatch
                )
            else:
                self.bad(at, "rollback", f"expected a mapping, got {_describe(raw_rollback)}")
        raw_retry = m.get("retry")
        retry = None
        if raw_retry is not None:
            if isinstance(raw_retry, dict):
                retry = self.retry(_At(at.symbol, "retry.", raw_retry))
            else:
                self.bad(at, "retry", f"expected a mapping, got {_describe(raw_retry)}")
        requires = self.mapping(at, "requires")
        for key, value in requires.items():
            if not isinstance(value, str):
                msg = f"label {key!r} must be a string, got {_describe(value)} (quote it)"
                self.add(msg, at.symbol, "requires", self.lines.of(requires, key))
        resources = self.strings(at, "resources")
        twice = [r for r, n in Counter(resources).items() if n > 1] if len(resources) > 1 else []
        if twice:
            self.bad(at, "resources", "listed more than once: " + ", ".join(map(repr, twice)))
        return Symbol(
            name=name,
            type=self.choice(at, "type", SYMBOL_TYPES, None),
            context=context,
            dispatch=dispatch,
            parameters=self.parameters(at),
            dependencies=self.dependencies(at, name, names),
            priority=self.integer(at, "priority", 0, None),
            timeout=self.integer(at, "timeout", DEFAULT_TIMEOUT_MS, 1, " (milliseconds)"),
            retries=self.integer(at, "retries", None, 0),
            resources=tuple(resources),
            rollback=rollback,
            description=self.string(at, "description"),
            retry=retry,
            deadline=self.integer(at, "deadline", None, 1, " (milliseconds)"),
            requires=requires,
            secrets=self.secrets(at),
            wait_for_worker=self.integer(at, "wait_for_worker", None, 0, " (milliseconds)"),
            heartbeat_timeout=self.integer(at, "heartbeat_timeout", None, 1, " (milliseconds)"),
            checkpoint=self.flag(at, "checkpoint", True),
        )

    def rollback(self, at: _At, owner: str, context: str, dispatch: str) -> RollbackSpec:
        if "dependencies" in at.container:
            self.bad(at, "dependencies", "a rollback has no dependencies of its own")
        self.unknown_keys(at, _ROLLBACK_KEYS | {"dependencies"})
        name = self.string(at, "name") or f"rollback_{owner}"
        why = _name_problem(name)
        if why:
            self.bad(at, "name", why)
        return RollbackSpec(
            name=name,
            type=self.choice(at, "type", SYMBOL_TYPES, "action"),
            # A rollback undoes its symbol's work, so it goes to the same place by default.
            context=self.choice(at, "context", CONTEXTS, context),
            dispatch=self.choice(at, "dispatch", DISPATCHES, dispatch),
            parameters=self.parameters(at),
            timeout=self.integer(at, "timeout", DEFAULT_TIMEOUT_MS, 1, " (milliseconds)"),
            retries=self.integer(at, "retries", None, 0),
            secrets=self.secrets(at),
        )

    def retry(self, at: _At) -> RetryPolicy:
        self.unknown_keys(at, _RETRY_KEYS)
        d = RetryPolicy()
        initial = self.integer(at, "initial_delay", d.initial_delay, 0, " (milliseconds)")
        longest = self.integer(at, "max_delay", d.max_delay, 0, " (milliseconds)")
        if longest < initial:
            self.bad(
                at, "max_delay", f"max_delay ({longest}) is less than initial_delay ({initial})"
            )
        return RetryPolicy(
            initial_delay=initial,
            max_delay=longest,
            backoff_factor=self.number(at, "backoff_factor", d.backoff_factor, 1.0, math.inf),
            jitter=self.number(at, "jitter", d.jitter, 0.0, 1.0),
        )

    def dependencies(self, at: _At, own: str, names: dict[str, int]) -> tuple[str, ...]:
        raw = at.container.get("dependencies")
        if raw is None:
            return ()
        if isinstance(raw, str):
            self.bad(
                at,
                "dependencies",
                f"expected a list of symbol names, got "
                f"{_describe(raw)} (write [{raw}] for a single dependency)",
            )
            return ()
        if not isinstance(raw, (list, tuple)):
            self.bad(at, "dependencies", f"expected a list of symbol names, got {_describe(raw)}")
            return ()
        kept: dict[str, None] = {}  # ordered and O(1): a join may depend on thousands
        for j, dep in enumerate(raw):
            if not isinstance(dep, str):
                message = f"expected a symbol name, got {_describe(dep)}"
            elif dep == own:
                message = "a symbol cannot depend on itself"
            elif dep in kept:
                message = f"dependency {dep!r} is listed twice"
            elif dep not in names:
                message = f"unknown dependency {_clip(dep)!r}{self.suggest(dep, names)}"
            else:
                kept[dep] = None
                continue
            self.add(message, at.symbol, "dependencies", self.lines.of(raw, j))
        return tuple(kept)

    def parameters(self, at: _At) -> dict[str, Any]:
        params = self.mapping(at, "parameters")
        if all(type(v) in _SCALARS and (type(v) is not int or _INT_MIN <= v <= _INT_MAX)
               for v in params.values()):
            return params  # the usual flat parameters: nothing to walk
        found = _not_json(params, at.prefix + "parameters")
        if found is not None:
            path, container, key, message = found
            self.add(
                f"{path}: {message}",
                at.symbol,
                at.prefix + "parameters",
                self.lines.of(container, key) or self.lines.of(at.container, "parameters"),
            )
        return params

    def secrets(self, at: _At) -> dict[str, str]:
        """`secrets: {ENV_NAME: reference}`: only the names, resolved by the worker."""
        refs = self.mapping(at, "secrets")
        for key, value in refs.items():
            if not isinstance(key, str):
                continue  # reported by mapping()
            line = self.lines.of(refs, key)
            why = check_env_name(key)
            if why is not None:
                self.add(why, at.symbol, at.prefix + "secrets", line)
            if not isinstance(value, str) or not REFERENCE_NAME.fullmatch(value):
                got = repr(_clip(value)) if isinstance(value, str) else _describe(value)
                msg = (f"{_clip(key)!r} must name a secret of the worker's [secrets] "
                       f"(letters, digits, '_', '.' and '-'), got {got}")
                self.add(msg, at.symbol, at.prefix + "secrets", line)
        return refs

    # -- typed fields: each reports a wrong value and returns a usable default --------------

    def unknown_keys(self, at: _At, allowed: frozenset[str]) -> None:
        if allowed.issuperset(at.container):
            return
        for key in at.container:
            if not isinstance(key, str):
                msg = f"keys must be strings, got {_describe(key)}"
                self.add(msg, at.symbol, at.prefix[:-1] or None, self.lines.of(at.container))
            elif key not in allowed:
                self.bad(at, _clip(key),
                         f"unknown key {_clip(key)!r}{self.suggest(key, sorted(allowed))}")

    def string(self, at: _At, key: str, *, required: bool = False) -> str:
        value = at.container.get(key)
        if value is None:
            if required:
                self.bad(at, key, "required field is missing")
            return ""
        if not isinstance(value, str):
            self.bad(at, key, f"expected a string, got {_describe(value)}")
            return ""
        if required and not value.strip():
            self.bad(at, key, "must not be empty")
        return value

    def choice(self, at: _At, key: str, choices: tuple[str, ...], default: str | None) -> str:
        value = at.container.get(key)
        if value is None:
            if default is None:
                self.bad(at, key, f"required field is missing: one of {', '.join(choices)}")
            return default or choices[0]
        if value not in choices:
            what = repr(_clip(value)) if isinstance(value, str) else _describe(value)
            hint = self.suggest(value, choices) if isinstance(value, str) else ""
            self.bad(at, key, f"unknown {key} {what}: expected one of {', '.join(choices)}{hint}")
            return default or choices[0]
        return str(value)

    def integer(self, at: _At, key: str, default: Any, least: int | None, unit: str = "") -> Any:
        value = at.container.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.bad(
                at,
                key,
                f"expected an integer{unit}, got {_describe(value)}"
                f"{_duration_hint(value) if unit else ''}",
            )
            return default
        if not _INT_MIN <= value <= _INT_MAX:
            self.bad(at, key, "out of range: more than 64 bits")
            return default
        if least is not None and value < least:
            bound = "greater than 0" if least == 1 else f"{least} or more"
            self.bad(at, key, f"must be {bound}{unit}, got {value}")
        return value

    def flag(self, at: _At, key: str, default: bool) -> bool:
        value = at.container.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.bad(at, key, f"expected true or false, got {_describe(value)}")
            return default
        return value

    def number(self, at: _At, key: str, default: float, least: float, most: float) -> float:
        value = at.container.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.bad(at, key, f"expected a number, got {_describe(value)}")
            return default
        if not (least <= value <= most) or math.isnan(value):
            bound = f"at least {least:g}" if most == math.inf else f"between {least:g} and {most:g}"
            self.bad(at, key, f"must be {bound}, got {value}")
        return float(value)

    def mapping(self, at: _At, key: str) -> dict[str, Any]:
        value = at.container.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.bad(at, key, f"expected a mapping, got {_describe(value)}")
            return {}
        for k in value:
            if not isinstance(k, str):
                self.bad(at, key, f"keys must be strings, got {_describe(k)}")
        return value

    def strings(self, at: _At, key: str) -> list[str]:
        value = at.container.get(key)
        if value is None:
            return []
        if not isinstance(value, (list, tuple)):
            hint = f" (write [{value}] for a single one)" if isinstance(value, str) else ""
            self.bad(at, key, f"expected a list of strings, got {_describe(value)}{hint}")
            return []
        for item in value:
            if not isinstance(item, str) or not item:
                self.bad(at, key, f"expected a list of non-empty strings, got {_describe(item)}")
                return []
        return list(value)

    def suggest(self, word: str, options: Any) -> str:
        if self.suggestions <= 0 or len(word) > 100:  # nothing is that long by mistake
            return ""
        self.suggestions -= 1
        close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
        return f" (did you mean {close[0]!r}?)" if close else ""


def _by_position(entry: dict[Any, Any]) -> Callable[[Problem], int]:
    position = {key: i for i, key in enumerate(entry)}  # a missing field sorts first
    return lambda p: position.get((p.field or "").split(".")[0], -1)


_INT_MIN, _INT_MAX = -(1 << 63), (1 << 63) - 1  # what msgpack peers and SQLite carry
# Parameters cross the wire inside a deploy frame, whose nesting the decoder bounds (64),
# and are hashed and stored whole: both limits leave real parameters plenty of room.
MAX_PARAMETER_DEPTH = 32
MAX_PARAMETER_VALUES = 100_000
_TOO_BIG = (f"expands to more than {MAX_PARAMETER_VALUES:,} values "
            "(YAML aliases repeat what they point to)")


def _not_json(root: dict[str, Any], path: str) -> tuple[str, object, object, str] | None:
    """The first value that JSON and msgpack cannot carry as-is: (path, container, key, why).

    Iterative with a stack, and a shared (aliased) container is walked once, so deep or
    alias-heavy YAML stays linear; a container inside itself is a cycle. What the aliases
    expand to is counted too: a "billion laughs" document is refused, not loaded.
    """
    done: dict[int, int] = {}  # container -> values it holds once expanded
    active = {id(root)}
    # A frame: container, its items, its path, values counted so far.
    stack: list[list[Any]] = [[root, iter(root.items()), path, 1]]
    while stack:
        frame = stack[-1]
        container, children, where = frame[0], frame[1], frame[2]
        for key, child in children:
            if isinstance(child, int) and not _INT_MIN <= child <= _INT_MAX:
                here = f"{where}.{key}" if isinstance(container, dict) else f"{where}[{key}]"
                return here, container, key, "integer out of the 64-bit range (quote it)"
            if child is None or isinstance(child, (str, int, float)):
                frame[3] += 1
                continue
            here = f"{where}.{key}" if isinstance(container, dict) else f"{where}[{key}]"
            if not isinstance(child, (dict, list, tuple)):
                hint = " (quote it to keep it as text)" if hasattr(child, "isoformat") else ""
                why = f"expected JSON-like data, got {_describe(child)}{hint}"
                return here, container, key, why
            if id(child) in active:
                return here, container, key, "a container that contains itself"
            if id(child) in done:
                frame[3] += done[id(child)]
                if frame[3] > MAX_PARAMETER_VALUES:
                    return here, container, key, _TOO_BIG
                continue
            if len(stack) >= MAX_PARAMETER_DEPTH:
                return here, container, key, f"nested deeper than {MAX_PARAMETER_DEPTH} levels"
            if isinstance(child, dict):
                if not all(isinstance(k, str) for k in child):
                    return here, container, key, "mapping keys must be strings"
                items: Iterator[tuple[Any, Any]] = iter(child.items())
            else:
                items = enumerate(child)
            active.add(id(child))
            stack.append([child, items, here, 1])
            break
        else:
            stack.pop()
            active.discard(id(container))
            done[id(container)] = frame[3]
            if stack:
                stack[-1][3] += frame[3]
                if stack[-1][3] > MAX_PARAMETER_VALUES:
                    return where, container, None, _TOO_BIG
    return None


def _clip(text: str, most: int = 80) -> str:
    """A user's value inside a message: a huge one would drown the message."""
    return text if len(text) <= most else f"{text[: most - 20]}... ({len(text):,} characters)"


def _describe(value: object) -> str:
    """How a wrong value is shown: its kind in the user's words, then the value itself."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value if len(value) <= 40 else value[:37] + '...'!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"{type(value).__name__} {str(value)[:40]}"


def _duration_hint(value: object) -> str:
    if not isinstance(value, str):
        return ""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h)?\s*", value)
    if m is None:
        return ""
    scale = {None: 1, "ms": 1, "s": 1000, "m": 60_000, "min": 60_000, "h": 3_600_000}[m[2]]
    return f" (write {round(float(m[1]) * scale)} without quotes or units)"
