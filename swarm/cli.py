"""The `swarm` command line. Exit codes (DESIGN §6): 0 success, 1 the workflow failed or
was rolled back, 2 bad input (manifest, config, usage), 3 dispatcher unreachable or
authentication refused. Expected errors print one clear message, never a traceback.

Positional forms of the original CLI are kept: `start-dispatcher [CONFIG]`,
`start-worker [CONFIG] [NAME]`, `deploy MANIFEST [CONFIG]`, `status [CONFIG]`,
`config [OUTPUT]`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from . import __version__, commands
from .config import DEFAULT_CONFIG_NAME, Config, default_config_text, load_config
from .errors import ConfigError, SwarmError
from .model import Workflow
from .tasks import RunState

EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_UNREACHABLE = 0, 1, 2, 3
RUN_EXIT = {RunState.COMPLETED.value: EXIT_OK}


def _parser(wanted: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; given `wanted`, the command about to run, the options of other
    commands that are costly to define (the simulator's) are left out."""
    ap = argparse.ArgumentParser(prog="swarm", description=(
        "Dispatch workflows of symbols to worker nodes over WebSockets."))
    ap.add_argument("--version", action="version", version=f"swarm {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--log-level", choices=["debug", "verbose", "info", "warning", "warn",
                                                "error"],
                        help="log level of this command (default [logging] level)")
        return sp

    sp = cmd("start-dispatcher", "run a dispatcher until SIGINT/SIGTERM")
    sp.add_argument("config", nargs="?", help="config file (default ./swarm-config.toml)")
    sp.add_argument("--host", help="address to listen on (default [dispatcher] host)")
    sp.add_argument("--port", type=int, help="port (0 picks a free one)")
    sp.add_argument("--db", help="state database path (default [dispatcher] state_db_path)")
    sp.add_argument("--ready-file", help="write the dispatcher URL here once it listens")
    sp.add_argument("--insecure", action="store_true",
                    help="allow listening off loopback without a token (warns)")

    sp = cmd("start-worker", "run a worker node until SIGINT/SIGTERM")
    sp.add_argument("config", nargs="?", help="config file (default ./swarm-config.toml)")
    sp.add_argument("name", nargs="?", help="node name (default [worker] node_name or host)")
    sp.add_argument("--name", dest="name_flag", help="node name (same as NAME)")
    sp.add_argument("--url", help="dispatcher URL (default SWARM_URL or [worker] dispatcher_url)")
    sp.add_argument("--slots", type=int, help="symbols run at once (max_concurrent_tasks)")
    sp.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                    help="import a module first (to register @swarm.handler functions)")

    sp = cmd("deploy", "submit a manifest to the running dispatcher and follow the run")
    sp.add_argument("manifest", nargs="?", help="the workflow (optional with --resume)")
    sp.add_argument("config", nargs="?")
    sp.add_argument("--config", dest="config_flag", help="config file (same as CONFIG)")
    sp.add_argument("--url", help="dispatcher URL (default SWARM_URL or coordinator_endpoint)")
    sp.add_argument("--json", action="store_true", help="print the result as JSON")
    sp.add_argument("--detach", action="store_true", help="print the run id and return")
    sp.add_argument("--new", action="store_true",
                    help="start a new run even if the same manifest is running already")
    sp.add_argument("--resume", metavar="RUN_ID",
                    help="re-run only what did not complete in a failed or cancelled run")

    sp = cmd("rollback", "run the rollbacks of a finished run's completed symbols")
    sp.add_argument("run_id")
    sp.add_argument("config", nargs="?")
    sp.add_argument("--url")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--detach", action="store_true")

    sp = cmd("watch", "follow one run (or every run) live")
    sp.add_argument("run_id", nargs="?")
    sp.add_argument("config", nargs="?")
    sp.add_argument("--url")
    sp.add_argument("--json", action="store_true", help="one JSON object per event")
    sp.add_argument("--since", type=int, metavar="SEQ",
                    help="first the run's events after this seq (0: all), from the journal")

    for name, what in (("pause", "stop new assignments for a run; running symbols finish"),
                       ("resume", "let a paused run go on"),
                       ("cancel", "stop a run: terminate its running backends, end it "
                                  "cancelled")):
        sp = cmd(name, what)
        sp.add_argument("run_id")
        sp.add_argument("config", nargs="?")
        sp.add_argument("--url")
        sp.add_argument("--json", action="store_true")
        if name == "cancel":
            sp.add_argument("--rollback", action="store_true",
                            help="also run the rollbacks of the completed symbols")

    sp = cmd("runs", "list runs with status, progress and times")
    sp.add_argument("config", nargs="?")
    sp.add_argument("--url")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--limit", type=int, default=20)

    sp = cmd("report", "a run's execution result: totals, metrics, timeline")
    sp.add_argument("run_id")
    sp.add_argument("config", nargs="?")
    sp.add_argument("--url")
    sp.add_argument("--json", action="store_true")

    sp = cmd("prune", "remove finished runs older than a duration, with all their records")
    sp.add_argument("config", nargs="?")
    sp.add_argument("--older-than", required=True, metavar="DURATION",
                    help="runs that finished longer ago than this: 30d, 12h, 90m, 1w")
    sp.add_argument("--dry-run", action="store_true", help="count what would go; remove none")
    sp.add_argument("--url")
    sp.add_argument("--db", help="prune this state DB file directly, with no dispatcher "
                                 "running on it (default: through the running dispatcher)")
    sp.add_argument("--json", action="store_true")

    sp = cmd("backup", "write a consistent, checked copy of the state DB while it runs")
    sp.add_argument("file", help="the copy to write (never overwritten); with a dispatcher, "
                                 "a path on its host")
    sp.add_argument("config", nargs="?")
    sp.add_argument("--url")
    sp.add_argument("--db", help="copy this state DB file directly (default: through the "
                                 "running dispatcher)")
    sp.add_argument("--json", action="store_true")

    sp = cmd("status", "show nodes, tasks and runs of the running dispatcher")
    sp.add_argument("config", nargs="?")
    sp.add_argument("--url")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--watch", action="store_true", help="refresh until interrupted")
    sp.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    sp.add_argument("--count", type=int, help="stop after this many refreshes")

    sp = cmd("config", "write the fully commented default config")
    sp.add_argument("output", nargs="?", default=DEFAULT_CONFIG_NAME,
                    help=f"file to write (default ./{DEFAULT_CONFIG_NAME}; - for standard "
                         "output)")
    sp.add_argument("--force", action="store_true", help="overwrite an existing file")

    sp = cmd("help", "show the help of swarm or of one command")
    sp.add_argument("topic", nargs="?", metavar="COMMAND", help="the command to explain")

    sp = cmd("plan", "show the levels, critical path and backends of a manifest; runs nothing")
    sp.add_argument("manifest")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--workers", type=int, metavar="N",
                    help="predict the makespan on N slots (a simulation of the scheduler)")
    sp.add_argument("--db", help="a state DB whose history gives expected durations")

    # The measuring commands' options live with their modules (the simulator, the
    # benchmark), which no other command should import: they are defined only when wanted.
    for name, (module, help) in _MEASURING.items():
        sp = cmd(name, help)
        if wanted in (None, name):
            add_arguments = getattr(importlib.import_module(module, __package__),
                                    f"add_{name}_arguments")
            add_arguments(sp)

    sp = cmd("debug", "tools to look into a state DB")
    tools = sp.add_subparsers(dest="tool", metavar="TOOL", required=True,
                              help="replay: check the scheduler against the journal")
    sp = tools.add_parser("replay", help="rebuild the scheduler from the stimuli kept in a "
                                         "state DB and check it journals what the DB says",
                          description="Rebuild the scheduler from the stimuli kept in a "
                                      "state DB and check that it journals what the DB says; "
                                      "exit 1 at the first divergence.")
    sp.add_argument("db", help="the state database (read only: a dispatcher may run on it)")
    sp.add_argument("run_id", nargs="?", help="compare only this run's journal entries")

    sp = cmd("validate", "check a manifest and report every problem")
    sp.add_argument("manifest")

    sp = cmd("run", "run a manifest on a local swarm (dispatcher + workers on loopback)")
    sp.add_argument("manifest")
    sp.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    sp.add_argument("--slots", type=int, help="slots per worker")
    sp.add_argument("--config", help="config file for the dispatcher and workers")
    sp.add_argument("--db", help="keep the state database here (default: a temporary one)")
    sp.add_argument("--json", action="store_true")
    for sp in sub.choices.values():
        for action in sp._actions:
            if not action.help:  # the arguments most commands share say the same
                action.help = _COMMON_HELP[action.dest]
    return ap


_MEASURING = {
    "simulate": (".simulate", "compare scheduling policies on random workflows with a virtual "
                              "clock"),
    "bench": (".bench", "measure dispatch throughput, latency, CPU and scale on a local swarm "
                        "with a real state DB"),
}
_COMMON_HELP = {
    "config": "config file (default ./swarm-config.toml if present, else built-in defaults)",
    "url": "dispatcher URL (default SWARM_URL, else [dispatcher] coordinator_endpoint)",
    "json": "print JSON for scripts instead of tables",
    "run_id": "the run's id, as deploy and runs print it",
    "manifest": "the workflow manifest (YAML or TOML)",
    "detach": "print the run id and return instead of following the run",
    "limit": "list at most this many runs, newest first (default 20)",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser(_command(argv))
    args = parser.parse_args(argv)
    if args.command is None:  # bare `swarm`, as the original: the help
        return _help(parser, None)
    if args.command == "help":
        return _help(parser, args.topic)
    handler: Callable[[argparse.Namespace], int] = COMMANDS[args.command]
    try:
        return handler(args)
    except SwarmError as e:
        print(f"swarm: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_left()


def _command(argv: Sequence[str]) -> str | None:
    """The command `argv` names, if it names one for sure (the first word not an option;
    `help X` is X); None when unsure, and the parser then defines every option."""
    words = [a for a in argv if not a.startswith("-")]
    if not words or argv[0].startswith("-"):
        return None
    if words[0] == "help":
        return words[1] if len(words) > 1 else "help"
    return words[0]


def _help(parser: argparse.ArgumentParser, topic: str | None) -> int:
    try:
        if topic is None:
            parser.print_help()
            return EXIT_OK
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if topic not in sub.choices:
            print(f"swarm: no command {topic!r}; `swarm help` lists them", file=sys.stderr)
            return EXIT_INPUT
        sub.choices[topic].print_help()
        return EXIT_OK
    except BrokenPipeError:
        return _reader_left()


def _reader_left() -> int:
    """Output piped into `head` that closed early: what was asked for was done, quietly.
    Standard output goes to /dev/null so that the flush at exit does not fail again."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_OK


def _config(path: str | None) -> Config:
    return load_config(path)


def _logging(args: argparse.Namespace, cfg: Config, default: str | None = None) -> None:
    from .config_reader import LOG_LEVELS
    from .logs import setup_logging

    level = args.log_level or default or cfg.logging.level
    setup_logging(LOG_LEVELS.get(level, level),
                  cfg.resolve(cfg.logging.file) if cfg.logging.file else "",
                  console=cfg.logging.console, fmt=cfg.logging.format)


def _run(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


# --- daemons --------------------------------------------------------------------------


def cmd_start_dispatcher(args: argparse.Namespace) -> int:
    from .dispatcher import serve_forever

    cfg = _config(args.config)
    _logging(args, cfg)
    if args.port is not None and not 0 <= args.port <= 65535:
        raise ConfigError(f"--port out of range: {args.port}")
    return _run(serve_forever(cfg, host=args.host, port=args.port, db_path=args.db,
                              ready_file=args.ready_file, insecure=args.insecure))


def cmd_start_worker(args: argparse.Namespace) -> int:
    from .worker import serve_worker

    cfg = _config(args.config)
    _logging(args, cfg)
    if args.slots is not None and args.slots < 1:
        raise ConfigError("--slots must be at least 1")
    for module in args.imports:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"--import {module}: {e}") from None
    return _run(serve_worker(cfg, name=args.name_flag or args.name, url=args.url,
                             slots=args.slots))


# --- offline --------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    text = default_config_text()
    if args.output == "-":
        sys.stdout.write(text)
        return EXIT_OK
    out = Path(args.output)
    if out.exists() and not args.force:
        raise ConfigError(f"{out} exists; use --force to overwrite it")
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write {out}: {e.strerror or e}") from None
    print(f"wrote {out}", file=sys.stderr)
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from .manifest import load_manifest
    from .plan import analyze
    from .state import DEFAULT_DURATION_MS

    wf = load_manifest(args.manifest)
    if args.workers is not None and args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    durations: dict[str, float] = (asyncio.run(_expected(wf, args.db)) if args.db else {
        s.name: DEFAULT_DURATION_MS for s in wf.symbols})
    plan = analyze(wf, durations)
    out: dict[str, object] = {"name": wf.name, "version": wf.version, "source": wf.source,
                              **plan.to_dict()}
    if args.workers:
        from .simulate import predict, result_dict

        out["prediction"] = result_dict(predict(wf, durations, args.workers))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        from .console import console, print_plan

        print_plan(console(), wf.source, wf.name, wf.version, plan,
                   out.get("prediction"))  # type: ignore[arg-type]
    return EXIT_OK


async def _expected(wf: Workflow, db: str) -> dict[str, float]:
    from .state import Store

    if not Path(db).is_file():
        raise ConfigError(f"--db {db}: no such state database")
    store = await Store.open_readonly(db)  # a dispatcher may be running on it
    try:
        return await store.expected_durations(wf.name, {s.name: s.dispatch for s in wf.symbols})
    finally:
        await store.close()


def _bench(args: argparse.Namespace) -> int:
    from .bench import main_bench

    return main_bench(args)


def _simulate(args: argparse.Namespace) -> int:
    from .simulate import main_simulate

    return main_simulate(args)


def cmd_debug(args: argparse.Namespace) -> int:
    from .replay import replay

    out = replay(args.db, args.run_id)
    counts = (f"{out.sessions} sessions, {out.stimuli} stimuli, {out.entries} journal "
              f"entries{' of run ' + args.run_id if args.run_id else ''}")
    if out.skipped:
        counts += f"; {out.skipped} older sessions not replayable (their start is not kept)"
    if out.divergence is None and not out.sessions:
        print(f"nothing to replay: {counts}")
        return EXIT_INPUT
    if out.divergence is not None:
        print(f"diverged: {out.divergence}\n(checked before it: {counts})")
        return EXIT_FAILED
    print(f"matches: {counts}")
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from .manifest import load_manifest

    wf = load_manifest(args.manifest)
    print(f"{wf.source}: ok: {wf.name} {wf.version}, {len(wf.symbols)} symbols")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    _logging(args, _config(args.config), default="warning")
    return commands.cmd_run(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "start-dispatcher": cmd_start_dispatcher,
    "start-worker": cmd_start_worker,
    "deploy": commands.cmd_deploy,
    "rollback": commands.cmd_rollback,
    "watch": commands.cmd_watch,
    "pause": commands.cmd_control,
    "resume": commands.cmd_control,
    "cancel": commands.cmd_control,
    "runs": commands.cmd_runs,
    "report": commands.cmd_report,
    "prune": commands.cmd_prune,
    "backup": commands.cmd_backup,
    "status": commands.cmd_status,
    "run": cmd_run,
    "simulate": _simulate,
    "bench": _bench,
    "config": cmd_config,
    "plan": cmd_plan,
    "validate": cmd_validate,
    "debug": cmd_debug,
}

__all__ = ["main", "COMMANDS"]
