"""The backends a worker runs symbols with (DESIGN §4), behind one small facade.

    backends = Backends.from_config(config)
    reasons = await backends.check()      # name -> None if usable, else why not
    backends.available                    # what this worker may advertise
    outcome = await backends.run(invocation)

Only what the worker's own config names is ever executed: a manifest picks a dispatch
and passes parameters, never a command line. `run()` turns every backend failure into
an `Outcome`; only cancellation propagates (after the backend's process group is gone).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass

from ..config import Config, PhpEngineConfig, PowerShellEngineConfig, RustInjectorConfig
from ..model import DISPATCHES
from ..secrets import inherited_environment
from . import contain, wp_praxis
from .contain import Containment
from .internal import (
    HandlerFailure,
    handler,
    load_entry_points,
    register,
    registered,
    run_internal,
)
from .process import Invocation, Outcome, build_argv, run_process

__all__ = [
    "Backends",
    "Containment",
    "HandlerFailure",
    "Invocation",
    "Outcome",
    "handler",
    "load_entry_points",
    "register",
    "registered",
]

log = logging.getLogger("swarm.backends")

CHECK_TIMEOUT_MS = 5000  # bound on each health check (`--version` and the like)

_plugins_loaded = False


def _load_plugins_once() -> None:
    """Entry-point handlers are loaded by the first check() that finds `internal` usable."""
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        names = load_entry_points()
        if names:
            log.info("internal handlers from entry points: %s", ", ".join(names))


@dataclass(frozen=True, slots=True)
class _Target:
    """A subprocess backend as configured: what to run, with which script and limits."""

    name: str
    enabled: bool
    command: str  # binary_path / php_binary / pwsh_binary as written in the config
    command_key: str
    script: str | None  # script_path, None for the rust injector
    version_flag: str  # the health check: COMMAND FLAG must exit 0
    timeout: int
    settings: RustInjectorConfig | PhpEngineConfig | PowerShellEngineConfig


@dataclass(frozen=True, slots=True)
class _Ready:
    command: str  # absolute path
    script: str  # absolute path, "" for the rust injector
    timeout: int


class Backends:
    """The backends of one worker: health checks and execution of single attempts."""

    def __init__(self, config: Config) -> None:
        self._config = config
        rust = config.backends.rust_injector
        php = config.backends.php_engine
        ps = config.backends.powershell_engine
        self._targets = {
            "rust_injector": _Target(
                "rust_injector", rust.enabled, rust.binary_path, "binary_path", None,
                "--version", rust.timeout, rust,
            ),
            "php_engine": _Target(
                "php_engine", php.enabled, php.php_binary, "php_binary", php.script_path,
                "--version", php.timeout, php,
            ),
            "powershell_engine": _Target(
                "powershell_engine", ps.enabled, ps.pwsh_binary, "pwsh_binary", ps.script_path,
                "-Version", ps.timeout, ps,
            ),
        }
        self._ready: dict[str, _Ready] = {}
        self._reasons: dict[str, str | None] = {}
        self._versions: dict[str, str] = {}
        self._containers: contain.Containers | None = None

    @classmethod
    def from_config(cls, config: Config) -> Backends:
        return cls(config)

    @property
    def available(self) -> tuple[str, ...]:
        """Backends that passed the last `check()`, in DISPATCHES order."""
        return tuple(n for n in DISPATCHES if n in self._reasons and self._reasons[n] is None)

    @property
    def versions(self) -> dict[str, str]:
        """First line of each usable subprocess backend's version output."""
        return dict(self._versions)

    def contain(self, mode: str | None = None) -> Containment:
        """From now on, nothing an attempt starts outlives it, nor this process (once per
        process; `close()` ends it). `mode` "subreaper" forces the fallback."""
        if self._containers is None:
            self._containers = contain.start(mode)
        return self._containers.info

    def close(self) -> None:
        """Kill what attempts left behind and stop the watchdog of `contain()`."""
        if self._containers is not None:
            self._containers.close()
            self._containers = None

    async def check(self) -> dict[str, str | None]:
        """Health-check every backend: name -> None if usable, else the reason it is not.

        The first check that finds `internal` usable also loads the `swarm.handlers`
        entry points."""
        names = [n for n in DISPATCHES if n != "internal"]
        results = await asyncio.gather(*(self._check(self._targets[n]) for n in names))
        reasons: dict[str, str | None] = {}
        self._ready.clear()
        self._versions.clear()
        for name, (reason, ready, version) in zip(names, results, strict=True):
            reasons[name] = reason
            if ready is not None:
                self._ready[name] = ready
                self._versions[name] = version
        reasons["internal"] = (
            "disabled in [worker.capabilities]"
            if self._config.worker.capabilities.get("internal", True) is False
            else None
        )
        self._reasons = {n: reasons[n] for n in DISPATCHES}
        if reasons["internal"] is None:
            _load_plugins_once()
        for name, reason in self._reasons.items():
            log.debug("backend %s: %s", name, reason or f"usable {self._versions.get(name, '')}")
        return dict(self._reasons)

    async def _check(self, t: _Target) -> tuple[str | None, _Ready | None, str]:
        section = f"[backends.{t.name}]"
        if not t.enabled:
            return f"disabled in {section}", None, ""
        if self._config.worker.capabilities.get(t.name) is not True:
            return "not enabled in [worker.capabilities]", None, ""
        command, problem = self._find_command(t.command)
        if problem:
            return f"{section} {t.command_key}: {problem}", None, ""
        script = ""
        if t.script is not None:
            script = self._config.resolve(t.script)
            if not script:
                return f"{section} script_path is empty", None, ""
            if not os.path.isfile(script):
                return f"{section} script_path: script file {script!r} not found", None, ""
        ready = _Ready(command, script, t.timeout)
        if t.settings.adapter == "wp_praxis":
            reason, version = await self._check_wp_praxis(t, command, script)
            return (f"{section} {reason}", None, "") if reason else (None, ready, version)
        argv = [command, t.version_flag]
        out = await _check_run(argv)
        if not out.ok:
            return f"`{' '.join(argv)}` failed: {out.error}", None, ""
        text = _first_line(out)
        reason = await _prove_engine(t.name, command, script, text)
        if reason:
            return f"{section} {reason}", None, ""
        return None, ready, text

    async def _check_wp_praxis(self, t: _Target, command: str, script: str
                               ) -> tuple[str | None, str]:
        s = t.settings
        if isinstance(s, RustInjectorConfig):
            return await wp_praxis.rust_check(command, self._config.resolve(s.wp_root))
        if isinstance(s, PhpEngineConfig):
            return await wp_praxis.php_check(command, script, self._config.resolve(s.wp_load))
        out = await _check_run([command, t.version_flag])
        if not out.ok:
            return f"`{command} {t.version_flag}` failed: {out.error}", ""
        return wp_praxis.ps_check(script), _first_line(out)

    def _find_command(self, command: str) -> tuple[str, str]:
        """(absolute path, "") or ("", why it cannot be run)."""
        if not command:
            return "", "no command configured"
        if os.sep not in command and not (os.altsep and os.altsep in command):
            found = shutil.which(command)
            return (found, "") if found else ("", f"{command!r} not found on PATH")
        path = self._config.resolve(command)
        if not os.path.isfile(path):
            return "", f"{path!r} not found"
        if not os.access(path, os.X_OK):
            return "", f"{path!r} is not executable"
        return path, ""

    async def run(self, inv: Invocation) -> Outcome:
        """Run one attempt. Never raises for a failing backend; cancellation stops the
        backend's process group (SIGTERM, SIGKILL after `kill_grace`) and propagates."""
        if inv.dispatch not in DISPATCHES:
            return _refused(f"unknown dispatch {inv.dispatch!r}")
        if inv.dispatch not in self.available:
            reason = self._reasons.get(inv.dispatch) or "health check has not run"
            return _refused(f"backend {inv.dispatch} is not available on this worker: {reason}")
        if inv.dispatch == "internal":
            return await run_internal(inv, inv.timeout_ms)
        ready = self._ready[inv.dispatch]
        settings = self._targets[inv.dispatch].settings
        try:
            document = json.dumps(inv.document()).encode()
            argv = build_argv(inv.dispatch, ready.command, ready.script, inv)
        except (TypeError, ValueError) as e:
            return _refused(f"parameters are not JSON: {e}")
        b = self._config.backends

        async def runner(argv: list[str], stdin: bytes) -> Outcome:
            try:  # each process an attempt starts is contained (see contain.py)
                cage = self._containers.cage() if self._containers is not None else None
            except OSError as e:
                return Outcome(ok=False, output="",
                               error=f"cannot create the attempt's cgroup: {e}")
            try:
                return await run_process(
                    argv,
                    stdin=stdin,
                    env={**inherited_environment(self._config.secrets), **inv.environment(),
                         **(cage.environment() if cage else {})},
                    timeout_ms=effective_timeout(inv.timeout_ms, ready.timeout),
                    output_cap=b.output_cap,
                    kill_grace_ms=b.kill_grace,
                    cage=cage,
                    reports=inv.reports,
                )
            finally:
                if cage is not None:
                    cage.release()

        if settings.adapter == "wp_praxis":
            outcome = await self._run_wp_praxis(settings, ready, inv, document, runner)
        else:
            outcome = await runner(argv, document)
        return judge(outcome, settings.require_output, settings.fail_fast_exit_codes)

    async def _run_wp_praxis(
        self,
        s: RustInjectorConfig | PhpEngineConfig | PowerShellEngineConfig,
        ready: _Ready,
        inv: Invocation,
        document: bytes,
        runner: wp_praxis.Runner,
    ) -> Outcome:
        if isinstance(s, RustInjectorConfig):
            return await wp_praxis.rust_run(ready.command, self._config.resolve(s.wp_root),
                                            s.dry_run, inv, document, runner)
        if isinstance(s, PhpEngineConfig):
            argv = wp_praxis.php_argv(ready.command, ready.script,
                                      self._config.resolve(s.wp_load))
            return wp_praxis.php_result(await runner(argv, document))
        return await wp_praxis.ps_run(ready.command, ready.script, inv, document, runner)


def judge(out: Outcome, require_output: bool, fail_fast_exit_codes: list[int]) -> Outcome:
    """The per-backend rules of issue #21 on top of exit-code semantics: an exit code in
    `fail_fast_exit_codes` (a usage error) fails at once; with `require_output`, an exit 0
    that printed nothing is a failure, never a silent success."""
    if out.ok:
        if require_output and out.output == "":
            return dataclasses.replace(out, ok=False, retryable=False,
                                       error="backend produced no result")
        return out
    if out.exit_code in fail_fast_exit_codes and not out.timed_out and out.retryable:
        return dataclasses.replace(
            out, retryable=False,
            error=f"{out.error} (exit code {out.exit_code} is a usage error: not retried)")
    return out


async def _check_run(argv: list[str]) -> Outcome:
    return await run_process(
        argv, timeout_ms=CHECK_TIMEOUT_MS, output_cap=64 * 1024, kill_grace_ms=500
    )


def _first_line(out: Outcome) -> str:
    text = out.output if isinstance(out.output, str) else json.dumps(out.output)
    return text.splitlines()[0].strip() if text.strip() else ""


async def _prove_engine(name: str, command: str, script: str, version: str) -> str | None:
    """Why the configured program is not an engine of the argv contract, or None.

    A file that exists is not yet an engine: the original WP Praxis PHP engine is a class
    library that prints nothing and exits 0 for any argv, and would "complete" every
    symbol without running anything."""
    if name == "rust_injector":
        if version.startswith("wp_injector"):
            return ("is the original WP Praxis injector, which rejects the argv contract "
                    '(--symbol ...): set adapter = "wp_praxis"')
        return None
    if name == "php_engine":
        out = await _check_run([command, script, "--version"])
        if not out.ok:
            return f"`php {script} --version` failed: {out.error}"
        if out.output == "":
            return (f"`php {script} --version` printed nothing: not an engine of the argv "
                    "contract (for the WP Praxis symbolic-engine.php, a class library, set "
                    'adapter = "wp_praxis")')
        return None
    try:
        with open(script, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        return f"cannot read script_path: {e}"
    if "symbolname" not in text.lower():
        return ("script has no -SymbolName parameter: not an engine of the argv contract "
                '(for the WP Praxis symbolic.ps1 set adapter = "wp_praxis")')
    return None


def _refused(error: str) -> Outcome:
    return Outcome(ok=False, output="", error=error, retryable=False)


def effective_timeout(symbol_ms: int, backend_ms: int) -> int:
    """The smaller of two limits, where a limit <= 0 means none; 0 if neither limits."""
    limits = [t for t in (symbol_ms, backend_ms) if t > 0]
    return min(limits) if limits else 0
