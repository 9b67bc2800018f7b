"""Reading a config file the way manifests are read: every problem at once, each with
the file, its line and `section.key`, with "did you mean" hints.

It also carries the original WP Praxis swarm's names over to ours, so that the
original's files load unchanged (the documented `swarm-config.toml` and the one its
repository ships): `[worker.capabilities]` `rust`/`php`/`powershell`, a
`max_concurrent_tasks` there, log levels `warn`/`verbose`, and `[security]`
`enable_auth`/`api_key`/`allowed_hosts`/`max_message_size`. A key of the original that
swarm has no use for is accepted with one warning that names it and says why.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, fields
from typing import Any, TypeVar

T = TypeVar("T")

# Sections that are free maps of one value type, by their dotted name: a new one is a line.
FREE_MAPS: dict[str, type] = {"worker.capabilities": bool, "worker.labels": str,
                              "secrets": str}

# The original's backend names under [worker.capabilities] -> ours.
ORIGINAL_CAPABILITIES = {"rust": "rust_injector", "php": "php_engine",
                         "powershell": "powershell_engine"}
# The original's log levels -> Python's.
LOG_LEVELS = {"debug": "debug", "verbose": "debug", "info": "info", "warning": "warning",
              "warn": "warning", "error": "error"}
# Keys of the original swarm has no use for: why, for the warning.
UNUSED_KEYS = {
    "dispatcher.manifest_path": "swarm's dispatcher starts no workflow on its own; "
                                "`swarm deploy MANIFEST` submits one",
    "dispatcher.workflow_name": "a run takes its name from its manifest's `name`",
}
_HIDDEN = frozenset({"path", "base_dir", "warnings"})  # Config fields no file may set

_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?")
_KEY = re.compile(r"^\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')"
                  r"(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*=")


def _dotted(raw: str) -> str:
    return ".".join(part.strip().strip("\"'") for part in raw.split("."))


def key_lines(text: str) -> dict[str, int]:
    """`section.key` (and `section`) -> the 1-based line that sets it. A plain line scan:
    good for the tables and `key = value` lines configs are made of; multi-line values
    only lose the lines of their continuation."""
    out: dict[str, int] = {}
    table = ""
    for n, line in enumerate(text.splitlines(), 1):
        if m := _HEADER.match(line):
            table = _dotted(m.group(1))
            out.setdefault(table, n)
        elif m := _KEY.match(line):
            key = _dotted(m.group(1))
            out.setdefault(f"{table}.{key}" if table else key, n)
    return out


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    key: str  # section.key
    message: str
    line: int | None = None

    def render(self, file: str) -> str:
        where = f"{file}:{self.line}" if self.line is not None else file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


def _hint(key: str, known: list[str]) -> str:
    near = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean '{near[0]}'?)" if near else ""


class Reader:
    """Turns parsed TOML into config dataclasses, collecting problems and warnings."""

    def __init__(self, text: str) -> None:
        self.lines = key_lines(text)
        self.problems: list[ConfigProblem] = []
        self.warnings: list[ConfigProblem] = []
        self.auth_without_key = False  # enable_auth = true with no key: checked with the env

    def line(self, key: str) -> int | None:
        while key:  # the key's own line, else its table's header
            if key in self.lines:
                return self.lines[key]
            key = key.rpartition(".")[0]
        return None

    def problem(self, key: str, message: str) -> None:
        self.problems.append(ConfigProblem(key, message, self.line(key)))

    def warn(self, key: str, message: str) -> None:
        self.warnings.append(ConfigProblem(key, message, self.line(key)))

    # --- building ---------------------------------------------------------------------

    def build(self, cls: type[T], data: Any, where: str) -> T:
        """An instance of `cls` from a table; a bad key or value is a problem and keeps
        its default, so that every other problem is found as well."""
        if not isinstance(data, dict):
            self.problem(where, f"must be a table, got {_kind(data)}")
            return cls()
        known = {f.name: f for f in fields(cls)  # type: ignore[arg-type]
                 if not (where == "" and f.name in _HIDDEN)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            at = f"{where}.{key}" if where else key
            f = known.get(key)
            if f is None:
                what = f"unknown key in [{where}]" if where else "unknown section"
                self.problem(at, f"{what}{_hint(key, list(known))}")
                continue
            converted = self._convert(f, value, at)
            if converted is not _BAD:
                kwargs[key] = converted
        return cls(**kwargs)

    def _convert(self, f: dataclasses.Field[Any], value: Any, at: str) -> Any:
        default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else f.default)
        if dataclasses.is_dataclass(default):
            return self.build(type(default), value, at)
        if at in FREE_MAPS:
            return self._free_map(at, value, FREE_MAPS[at], default)
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                self.problem(at, f"must be a list of strings, got {_kind(value)}")
                return _BAD
            return tuple(value)
        expected = type(default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not expected:
            self.problem(at, f"must be {_TYPE_NAMES.get(expected, expected.__name__)}, "
                             f"got {_kind(value)} {_short(value)}")
            return _BAD
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            self.problem(at, f"must not be negative, got {value}")
            return _BAD
        return value

    def _free_map(self, at: str, value: Any, vtype: type, default: Any) -> Any:
        if not isinstance(value, dict):
            self.problem(at, f"must be a table of {_TYPE_NAMES[vtype]} values, got {_kind(value)}")
            return _BAD
        good = {}
        for k, v in value.items():
            if type(v) is not vtype:
                self.problem(f"{at}.{k}", f"must be {_TYPE_NAMES[vtype]}, got {_kind(v)} "
                                          f"{_short(v)}")
            else:
                good[k] = v
        return {**default, **good}  # unnamed keys keep their defaults

    # --- the original's names ---------------------------------------------------------

    def translate(self, data: dict[str, Any]) -> dict[str, Any]:
        """The original's keys rewritten onto ours (a new dict; `data` is untouched)."""
        data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
        worker = data.get("worker")
        if isinstance(worker, dict) and isinstance(worker.get("capabilities"), dict):
            worker = data["worker"] = dict(worker)
            worker["capabilities"] = self._capabilities(worker, dict(worker["capabilities"]))
        logging = data.get("logging")
        if isinstance(logging, dict) and isinstance(logging.get("level"), str):
            level = logging["level"]
            if level.lower() in LOG_LEVELS:
                logging["level"] = LOG_LEVELS[level.lower()]
        dispatcher = data.get("dispatcher")
        if isinstance(dispatcher, dict):
            for key in [k for k in dispatcher if f"dispatcher.{k}" in UNUSED_KEYS]:
                self.warn(f"dispatcher.{key}", "accepted but not used: "
                                               + UNUSED_KEYS[f"dispatcher.{key}"])
                del dispatcher[key]
        security = data.get("security")
        if isinstance(security, dict):
            self._security(data, security)
        return data

    def _capabilities(self, worker: dict[str, Any], caps: dict[str, Any]) -> dict[str, Any]:
        at = "worker.capabilities"
        if "max_concurrent_tasks" in caps:
            # The original's repository file sets the slots here too.
            slots = caps.pop("max_concurrent_tasks")
            own = worker.get("max_concurrent_tasks")
            if own is None:
                worker["max_concurrent_tasks"] = slots
            elif own != slots:
                self.warn(f"{at}.max_concurrent_tasks",
                          f"ignored: [worker] max_concurrent_tasks = {own!r} is used")
        for old, new in ORIGINAL_CAPABILITIES.items():
            if old not in caps:
                continue
            value = caps.pop(old)
            if not isinstance(value, bool):
                self.problem(f"{at}.{old}", f"must be true or false, got {_kind(value)} "
                                            f"{_short(value)}")
                continue
            if new in caps and caps[new] != value:
                self.problem(f"{at}.{old}", f"means '{new}', which is set to {caps[new]!r} "
                                            "here as well: keep one of the two")
                continue
            caps[new] = value
        from .model import DISPATCHES

        names = [*DISPATCHES, *ORIGINAL_CAPABILITIES]
        for key in [k for k in caps if k not in DISPATCHES]:
            self.problem(f"{at}.{key}", f"unknown backend; known: {', '.join(names)}"
                                        f"{_hint(key, names)}")
            del caps[key]
        return caps

    def _security(self, data: dict[str, Any], sec: dict[str, Any]) -> None:
        at = "security"
        size = sec.pop("max_message_size", None)
        if size is not None:
            dispatcher = data.get("dispatcher")
            if not isinstance(dispatcher, dict):
                dispatcher = data["dispatcher"] = {} if dispatcher is None else dispatcher
            if isinstance(dispatcher, dict):
                if "max_frame_size" in dispatcher and dispatcher["max_frame_size"] != size:
                    self.problem(f"{at}.max_message_size",
                                 "is the frame limit, which [dispatcher] max_frame_size sets "
                                 "to another value: keep one of the two")
                else:
                    dispatcher["max_frame_size"] = size
        if "enable_auth" not in sec and "api_key" not in sec:
            return
        enable, key = sec.pop("enable_auth", None), sec.pop("api_key", None)
        if enable is not None and not isinstance(enable, bool):
            self.problem(f"{at}.enable_auth", f"must be true or false, got {_kind(enable)}")
            return
        if key is not None and not isinstance(key, str):
            self.problem(f"{at}.api_key", f"must be a string, got {_kind(key)}")
            return
        token = sec.get("token", "")
        if enable is False:
            if key:
                self.warn(f"{at}.api_key", "accepted but not used: enable_auth is false, so "
                                           "connections are not authenticated")
            if token:
                self.problem(f"{at}.enable_auth", "is false, but [security] token is set: "
                                                  "remove one of the two")
            return
        if key and token and key != token:
            self.problem(f"{at}.api_key", "differs from [security] token: keep one")
        elif key:
            sec["token"] = key
        elif enable and not token:
            self.auth_without_key = True


class _Bad:
    pass


_BAD: Any = _Bad()
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    text = repr(value)
    return f"({text[:40]}...)" if len(text) > 40 else f"({text})"
