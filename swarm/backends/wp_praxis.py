"""Adapters for the original WP Praxis backends (`adapter = "wp_praxis"`, issue #21).

None of the original backends accepts the argv contract of DESIGN §4, so each adapter
speaks the program's own language and reads its answer back into an `Outcome`:

- rust_injector: a one-symbol manifest in wp_injector's format (YAML), then
  `wp_injector inject --manifest FILE --wp-root ROOT [--dry-run]`; success only with its
  "✓ Injection completed successfully!" report. Health check: `wp_injector validate`.
- php_engine: `php swarm/data/wp_praxis_entry.php --engine SCRIPT --wp-load WP_LOAD`, the
  task document on stdin; the entry script loads WordPress and the engine's classes and
  answers with JSON. Health check: the same script with `--check` loads the classes.
- powershell_engine: a one-action manifest (TOML, as symbolic.ps1's own parser reads it),
  then `pwsh -File symbolic.ps1 -ManifestPath FILE -Operation Execute -Context CTX`;
  symbolic.ps1 exits 0 even when an action failed, so its output decides.

Manifests live in a private temp dir (0700, files 0600) removed after the attempt.
An adapter never goes through a shell and runs only what the worker's config names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .process import Invocation, Outcome, run_process

# run_process with the worker's environment and limits already bound: (argv, stdin).
Runner = Callable[[list[str], bytes], Awaitable[Outcome]]

ENTRY_SCRIPT = "wp_praxis_entry.php"
CHECK_TIMEOUT_MS = 5000
_CHECK_CAP = 64 * 1024

# wp_injector handles exactly these symbol kinds and skips any other with a warning
# (exit 0): the adapter must never hand it a kind it would skip.
INJECTOR_KINDS = ("post_type", "taxonomy", "option", "query")
_KIND_BY_PARAMETER = (("post_type", "post_type"), ("taxonomy", "taxonomy"),
                      ("option_name", "option"), ("sql", "query"))
# Our contexts -> the injector's documented ones (it stores but does not act on them).
_INJECTOR_CONTEXT = {"wordpress": "wordpress", "filesystem": "file", "database": "database",
                     "network": "system", "generic": "system"}
_INJECTED = "✓ Injection completed successfully!"
_VALIDATED = "✓ Manifest validation successful!"


def refuse(error: str) -> Outcome:
    """A failure decided before anything ran; running again would not change it."""
    return Outcome(ok=False, output="", error=error, retryable=False)


@contextlib.contextmanager
def private_dir() -> Iterator[Path]:
    """A fresh directory only we can read (mkdtemp makes it 0700), removed on exit."""
    path = Path(tempfile.mkdtemp(prefix="swarm-wp-praxis-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_private(path: Path, text: str) -> Path:
    """Create `path` (0600, never through an existing file or link) holding `text`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def entry_script() -> str:
    """Path of the PHP entry script shipped as package data."""
    return str(resources.files("swarm").joinpath("data", ENTRY_SCRIPT))


async def _check_run(argv: list[str]) -> Outcome:
    return await run_process(argv, timeout_ms=CHECK_TIMEOUT_MS, output_cap=_CHECK_CAP,
                             kill_grace_ms=500)


def _text(out: Outcome) -> str:
    return out.output if isinstance(out.output, str) else str(out.output)


# --- rust_injector -------------------------------------------------------------------------

def injector_kind(symbol_type: str, params: dict[str, Any]) -> str | None:
    """The wp_injector kind for a symbol: named by its parameters, else by its type."""
    if symbol_type == "query":
        return "query"
    for key, kind in _KIND_BY_PARAMETER:
        if key in params:
            return kind
    return "option" if symbol_type == "state" else None


def rust_manifest(inv: Invocation, kind: str, params: dict[str, Any]) -> str:
    """A one-symbol manifest in wp_injector's own format (its serde `Manifest`), as YAML."""
    manifest = {
        "metadata": {"name": f"swarm {inv.symbol}", "version": "1",
                     "description": f"swarm run {inv.run_id} task {inv.task_id} "
                                    f"attempt {inv.attempt}"},
        "symbols": [{"name": inv.symbol, "type": kind,
                     "context": _INJECTOR_CONTEXT.get(inv.context, "system"),
                     "dispatch": "rust_injector", "parameters": params}],
    }
    return yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True)


async def rust_check(binary: str, wp_root: str) -> tuple[str | None, str]:
    """(reason or None, version): `validate` must accept a probe manifest."""
    if wp_root and not os.path.isfile(os.path.join(wp_root, "wp-config.php")):
        return f"wp_root {wp_root!r} has no wp-config.php", ""
    version = await _check_run([binary, "--version"])
    with private_dir() as d:
        probe = write_private(d / "probe.yaml", yaml.safe_dump({"symbols": [{
            "name": "swarm_health_check", "type": "option",
            "parameters": {"option_name": "swarm_probe", "option_value": "1"}}]}))
        argv = [binary, "validate", "--manifest", str(probe)]
        out = await _check_run(argv)
    if not out.ok:
        return f"`{binary} validate --manifest PROBE` failed: {out.error}", ""
    if _VALIDATED not in _text(out):
        return (f"`{binary} validate` exited 0 without {_VALIDATED!r}: "
                "not the WP Praxis injector"), ""
    lines = _text(version).strip().splitlines() if version.ok else []
    return None, lines[0] if lines else "wp_injector"


async def rust_run(binary: str, wp_root: str, dry_run: bool, inv: Invocation,
                   stdin: bytes, runner: Runner) -> Outcome:
    params = dict(inv.parameters)
    root = params.pop("wp_root", None) or wp_root  # adapter controls, not injector data
    dry = params.pop("dry_run", dry_run)
    if not isinstance(root, str) or not root:
        return refuse("no WordPress root: set wp_root in [backends.rust_injector] "
                      "or the symbol's parameters")
    if not isinstance(dry, bool):
        return refuse(f"parameter dry_run must be true or false, got {dry!r}")
    kind = injector_kind(inv.type, params)
    if kind is None:
        return refuse(f"wp_injector runs only {', '.join(INJECTOR_KINDS)} symbols: give "
                      f"symbol {inv.symbol!r} (type {inv.type}) one of the parameters "
                      "post_type, taxonomy, option_name or sql")
    with private_dir() as d:
        try:
            manifest = write_private(d / "manifest.yaml", rust_manifest(inv, kind, params))
        except yaml.YAMLError as e:
            return refuse(f"parameters cannot be written as a manifest: {e}")
        argv = [binary, "inject", "--manifest", str(manifest), "--wp-root", root]
        out = await runner([*argv, "--dry-run"] if dry else argv, stdin)
    return rust_result(out, kind, dry)


def rust_result(out: Outcome, kind: str, dry_run: bool) -> Outcome:
    """wp_injector reports on stdout in text lines; only its success line is a success."""
    if not out.ok:
        return out
    text = _text(out)
    if _INJECTED not in text:
        return _replace(out, ok=False, retryable=False,
                        error=f"wp_injector exited 0 without reporting {_INJECTED!r}")
    fields = dict(re.findall(r"^\s*(ID|Symbols injected|Timestamp):\s*(.*?)\s*$", text, re.M))
    if fields.get("Symbols injected") != "1":
        return _replace(out, ok=False, retryable=False,
                        error=f"wp_injector injected {fields.get('Symbols injected', 'no')} "
                              "symbols instead of 1")
    return _replace(out, output={"injection_id": fields.get("ID", ""), "kind": kind,
                                 "dry_run": dry_run, "timestamp": fields.get("Timestamp", ""),
                                 "report": text})


# --- php_engine ----------------------------------------------------------------------------

def php_argv(php: str, engine: str, wp_load: str, *, check: bool = False) -> list[str]:
    return [php, entry_script(), *(["--check"] if check else []), "--engine", engine,
            "--wp-load", wp_load]


async def php_check(php: str, engine: str, wp_load: str) -> tuple[str | None, str]:
    if not wp_load:
        return "wp_load is empty: the wp_praxis adapter needs WordPress's wp-load.php", ""
    if not os.path.isfile(wp_load):
        return f"wp_load: {wp_load!r} not found", ""
    out = await _check_run(php_argv(php, engine, wp_load, check=True))
    answer = out.output if isinstance(out.output, dict) else {}
    if not out.ok or answer.get("ok") is not True:
        why = answer.get("error") if isinstance(answer.get("error"), str) else out.error
        return f"the WP Praxis engine does not load: {why or 'no answer'}", ""
    return None, f"WP Praxis engine {answer.get('engine_version', '?')}"


def php_result(out: Outcome) -> Outcome:
    """The entry script always answers one JSON object; anything else is a failure."""
    answer = out.output
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        if not out.ok:
            return out
        return _replace(out, ok=False, retryable=False,
                        error="the WP Praxis entry script gave no JSON answer")
    if out.ok and answer["ok"] is not True:
        return _replace(out, ok=False, error=str(answer.get("error", "engine said not ok")))
    return out


# --- powershell_engine ---------------------------------------------------------------------

_PS_CONTEXT = {"generic": "cli"}  # symbolic.ps1's default context; the rest pass as they are
_PS_FAILED = re.compile(r"\[FAILED\]|\] \[Error\] |^WARNING: No actions|Operation completed "
                        r"with errors", re.M)


def ps_context(context: str) -> str:
    return _PS_CONTEXT.get(context, context)


def ps_manifest(inv: Invocation) -> str:
    """One action in the TOML dialect symbolic.ps1 parses: `[actions.NAME]`, then flat
    `key = value` lines (its parser takes no tables, arrays or multi-line values)."""
    action: dict[str, Any] = {"name": inv.symbol, "executor": "powershell",
                              "context": ps_context(inv.context), "type": inv.type}
    for key, value in inv.parameters.items():
        if key in ("name", "context"):  # symbolic.ps1 matches on these: they are ours
            raise ValueError(f"parameter {key!r} is set by swarm for symbolic.ps1")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise ValueError(f"parameter name {key!r} cannot be written for symbolic.ps1")
        if isinstance(value, dict | list) or value is None:
            raise ValueError(f"parameter {key!r}: symbolic.ps1 reads only flat values")
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if "\n" in text or "\r" in text:
            raise ValueError(f"parameter {key!r}: symbolic.ps1 reads one line per value")
        action[key] = text
    lines = [f"# swarm run {inv.run_id}, task {inv.task_id}, attempt {inv.attempt}",
             f'name = "{inv.symbol}"', "", f"[actions.{inv.symbol}]"]
    lines += [f'{k} = "{v}"' for k, v in action.items()]
    return "\n".join(lines) + "\n"


def ps_check(script: str) -> str | None:
    """symbolic.ps1 cannot be asked anything without running an operation, so its
    parameters are read instead: a script without -ManifestPath/-Operation is not it."""
    try:
        text = Path(script).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        return f"cannot read script_path: {e}"
    for needed in ("$ManifestPath", "$Operation", "'Execute'"):
        if needed.lower() not in text.lower():
            return f"script has no {needed}: not the WP Praxis symbolic.ps1"
    return None


async def ps_run(pwsh: str, script: str, inv: Invocation, stdin: bytes,
                 runner: Runner) -> Outcome:
    try:
        text = ps_manifest(inv)
    except ValueError as e:
        return refuse(str(e))
    with private_dir() as d:
        manifest = write_private(d / "manifest.toml", text)
        # Never -Operation Interactive (its default): it prompts, and a worker has no user.
        out = await runner([pwsh, "-NoProfile", "-NonInteractive", "-File", script,
                            "-ManifestPath", str(manifest), "-Operation", "Execute",
                            "-Context", ps_context(inv.context)], stdin)
    return ps_result(out, inv.symbol)


def ps_result(out: Outcome, symbol: str) -> Outcome:
    """symbolic.ps1 exits 0 when an action failed: its printed report decides."""
    if not out.ok:
        return out
    text = _text(out) + "\n" + out.stderr
    failed = _PS_FAILED.search(text)
    if failed:
        line = text[text.rfind("\n", 0, failed.start()) + 1:].split("\n", 1)[0].strip()
        return _replace(out, ok=False, error=f"symbolic.ps1 reported a failure: {line[:500]}")
    if not re.search(rf"\[\d+/\d+\] {re.escape(symbol)} - Success", text):
        return _replace(out, ok=False, retryable=False,
                        error=f"symbolic.ps1 did not report action {symbol!r} as a success")
    return _replace(out, output={"action": symbol, "report": _text(out)})


def _replace(out: Outcome, **changes: Any) -> Outcome:
    return dataclasses.replace(out, **changes)
