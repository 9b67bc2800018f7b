"""Secrets: references resolved only on the worker, and redaction of what looks secret.

A symbol names secrets by reference (`secrets: {DB_PASSWORD: prod_db_password}`); the
worker's own `[secrets]` table says where each value lives (`"file:/etc/swarm/db"` or
`"env:NAME"`). Only the worker ever reads a value, right before an attempt, and hands it
to the backend in the environment (`Invocation.env`). The dispatcher, the state DB, the
event journal, reports and argv only ever hold the reference names.

Second line of defence, for values that reach swarm some other way:

- `looks_secret(name)`: parameter names such as `password`, `api_key`, `authToken`;
- `redact(value)`: a copy of JSON-like data with the values under such names masked,
  used for outputs shown in event streams and reports;
- `redact_text(text)`: the same for log lines (`password=...`, `"token": "..."`), and
  every value registered with `mask()` (the worker registers what it resolves);
- `scrub(value, secrets)`: a backend's output, stderr and error with resolved values
  replaced by `[secret NAME]`, before the worker sends them anywhere.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from .errors import SwarmError

REDACTED = "[redacted]"
MAX_SECRET_BYTES = 64 * 1024  # a secret is a password or a key, not a file to ship

# Names the manifest may give a secret in the backend's environment. `SWARM_*` are ours;
# `LD_*`, `DYLD_*`, PATH and the interpreter hooks would let a manifest change which code
# the backend runs (a manifest chooses parameters, never a command line: DESIGN §4).
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
REFERENCE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_RESERVED_PREFIXES = ("SWARM_", "LD_", "DYLD_")
_RESERVED_NAMES = frozenset({"PATH", "IFS", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP",
                             "PERL5LIB", "PERL5OPT", "RUBYOPT", "NODE_OPTIONS", "BASH_ENV",
                             "ENV", "PHPRC", "PHP_INI_SCAN_DIR", "PSModulePath"})
SOURCES = ("file:", "env:")


class SecretError(SwarmError):
    """A secret the worker cannot provide. The message names the secret, never a value."""


# --- names ------------------------------------------------------------------------------

# Words that mark a credential anywhere in a name (`dbPassword`, `x_auth_token`), and the
# words before `key` that make it one: `meta_key` (WordPress), `cache_key` or `sort_key`
# are everyday parameters that must keep reaching backends, `api_key` is not.
_SECRET_WORDS = ("password", "passwd", "passphrase", "secret", "token", "credential",
                 "apikey", "privatekey")
_KEY_OWNERS = frozenset({"api", "private", "access", "secret", "signing", "encryption",
                         "ssh", "auth", "master", "client", "license", "session"})
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SPLIT = re.compile(r"[^a-z0-9]+")


def looks_secret(name: str) -> bool:
    """Whether a parameter (or output field) called `name` probably holds a credential."""
    words = [w for w in _SPLIT.split(_CAMEL.sub("_", name).lower()) if w]
    joined = "".join(words)
    if any(w in joined for w in _SECRET_WORDS):
        return True
    for i, w in enumerate(words):
        if w in ("key", "keys", "pwd") and (len(words) == 1 or i and words[i - 1] in _KEY_OWNERS):
            return True
    return False


def check_env_name(name: str) -> str | None:
    """Why `name` cannot carry a secret into a backend's environment, or None."""
    if not ENV_NAME.fullmatch(name):
        return (f"{name!r} is not an environment variable name "
                "(letters, digits and '_', not starting with a digit)")
    if name.startswith(_RESERVED_PREFIXES) or name in _RESERVED_NAMES:
        return f"{name!r} is reserved: it would change how the backend runs, not what it knows"
    return None


def check_source(source: str) -> str | None:
    """Why a `[secrets]` value is not `file:PATH` or `env:NAME`, or None."""
    kind, sep, rest = source.partition(":")
    if not sep or f"{kind}:" not in SOURCES:
        return f"must be \"file:PATH\" or \"env:NAME\", got {source[:40]!r}"
    if not rest:
        return f"{kind}: needs a {'path' if kind == 'file' else 'variable name'} after it"
    if kind == "env" and not ENV_NAME.fullmatch(rest):
        return f"{rest!r} is not an environment variable name"
    return None


# --- resolving (worker only) --------------------------------------------------------------


def resolve(wanted: Mapping[str, str], table: Mapping[str, str],
            base_dir: str = ".") -> dict[str, str]:
    """The environment a symbol's secrets make: env name -> value.

    `wanted` is the symbol's `secrets` (env name -> reference), `table` the worker's
    `[secrets]` (reference -> source); a relative `file:` path is relative to `base_dir`.
    Values are read at every attempt, so a rotated secret is picked up without a restart.
    Raises SecretError naming the first secret that cannot be had.
    """
    env: dict[str, str] = {}
    for env_name, ref in wanted.items():
        why = check_env_name(env_name)
        if why is not None:  # the manifest was checked, but frames come from the wire
            raise SecretError(f"secret {ref!r}: {why}")
        source = table.get(ref)
        if source is None:
            raise SecretError(f"secret {ref!r} (for {env_name}) is not defined in this "
                              "worker's [secrets]")
        env[env_name] = _read(ref, env_name, source, base_dir)
    return env


def _read(ref: str, env_name: str, source: str, base_dir: str) -> str:
    what = f"secret {ref!r} (for {env_name})"
    kind, _, rest = source.partition(":")
    if kind == "env":
        value = os.environ.get(rest)
        if value is None:
            raise SecretError(f"{what}: environment variable {rest} is not set on this worker")
    elif kind == "file":
        path = os.path.join(base_dir, os.path.expanduser(rest))
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_SECRET_BYTES + 1)
        except OSError as e:
            raise SecretError(f"{what}: cannot read {path}: {e.strerror or e}") from None
        if len(data) > MAX_SECRET_BYTES:
            raise SecretError(f"{what}: {path} is larger than {MAX_SECRET_BYTES} bytes")
        try:
            value = data.decode("utf-8")
        except UnicodeDecodeError:
            raise SecretError(f"{what}: {path} is not UTF-8 text") from None
        # `echo pw > file` adds a newline nobody means to be part of the password.
        value = value.removesuffix("\n").removesuffix("\r")
    else:
        raise SecretError(f"{what}: unknown source kind {kind!r} (use file: or env:)")
    if not value:
        raise SecretError(f"{what}: the value is empty")
    if "\0" in value:
        raise SecretError(f"{what}: the value contains a NUL byte, which no environment "
                          "variable can hold")
    mask(value)
    return value


def inherited_environment(table: Mapping[str, str]) -> dict[str, str]:
    """The worker's environment as every backend inherits it: without the variables its
    `[secrets]` read (`env:NAME`), which only the symbols naming them may see, and
    without SWARM_TOKEN, the cluster's own credential."""
    hidden = {src[4:] for src in table.values() if src.startswith("env:")}
    hidden.add("SWARM_TOKEN")
    return {k: v for k, v in os.environ.items() if k not in hidden}


# --- redaction ----------------------------------------------------------------------------


def redact(value: Any) -> Any:
    """JSON-like data with the values under secret-looking keys replaced by REDACTED.
    Returns `value` itself when nothing needed masking (no copy on the common path)."""
    if isinstance(value, dict):
        out: dict[Any, Any] | None = None
        for k, v in value.items():
            new = REDACTED if isinstance(k, str) and looks_secret(k) and v not in (None, "") \
                else redact(v)
            if new is not v and out is None:
                out = dict(value)
            if out is not None:
                out[k] = new
        return value if out is None else out
    if isinstance(value, list):
        items = [redact(v) for v in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    return value


def redact_output(data: dict[str, Any]) -> dict[str, Any]:
    """An event's data with its `output` redacted; `data` itself if nothing changes."""
    output = data.get("output")
    if type(output) is not dict and type(output) is not list:  # most outputs: nothing to do
        return data
    masked = redact(output)
    return data if masked is output else {**data, "output": masked}


def argv_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """The parameters put in a backend's argv (`--params JSON`): everything but the
    top-level parameters whose names look secret. argv is readable by every local user
    (`ps`, /proc/*/cmdline); such parameters reach the backend in the stdin document."""
    if not any(looks_secret(k) for k in parameters):
        return parameters
    return {k: v for k, v in parameters.items() if not looks_secret(k)}


_masked: set[str] = set()  # values resolved by this process: never printed in its logs


def mask(value: str) -> None:
    """Keep `value` out of this process's logs from now on (see `RedactingFormatter`)."""
    if len(value) >= 4:  # shorter ones would mask innocent text everywhere
        _masked.add(value)


def scrub(value: Any, secrets: Mapping[str, str]) -> Any:
    """`value` with every occurrence of a resolved secret replaced by `[secret NAME]`."""
    if not secrets:
        return value
    if isinstance(value, str):
        for name, secret in secrets.items():
            if secret and secret in value:
                value = value.replace(secret, f"[secret {name}]")
        return value
    if isinstance(value, dict):
        return {scrub(k, secrets): scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, secrets) for v in value]
    return value


# name = value, name: value, "name": "value" -- the forms logs quote parameters in.
_PAIR = re.compile(r"""(?P<name>["']?(?P<bare>[A-Za-z_][\w.-]*)["']?\s*[:=]\s*)"""
                   r"""(?P<value>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^\s,;&}\]]+)""")


def redact_text(text: str) -> str:
    """A log line with secret-looking `name=value` pairs and masked values hidden."""
    for value in _masked:
        if value in text:
            text = text.replace(value, REDACTED)

    def sub(m: re.Match[str]) -> str:
        if not looks_secret(m["bare"]):
            return m[0]
        v = m["value"]
        quote = v[0] if v[0] in "\"'" else ""
        return f"{m['name']}{quote}{REDACTED}{quote}"

    return _PAIR.sub(sub, text) if any(w in text.lower() for w in _HINTS) else text


_HINTS = ("pass", "secret", "token", "key", "credential", "pwd")  # a cheap pre-check


class RedactingFormatter(logging.Formatter):
    """A formatter whose lines went through `redact_text` (tracebacks included)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))
