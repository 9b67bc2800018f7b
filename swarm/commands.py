"""The CLI commands that talk to a dispatcher: thin users of `swarm.client.Client` (and of
`LocalSwarm` for `swarm run`). Humans get rich output; `--json` gets one JSON object per
line: the run's events as they happen, then `{"summary": ...}`, and nothing else."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Coroutine
from typing import Any

from . import interrupt
from .client import Client
from .config import Config, load_config
from .errors import ConfigError, ConnectionFailed, InputError
from .model import Workflow
from .protocol import Event, to_dict
from .results import ended_tasks
from .tasks import RunState
from .tls import client_context

EXIT_OK, EXIT_FAILED = 0, 1


def _run(coro: Coroutine[Any, Any, int]) -> int:
    return interrupt.run(coro)  # a second Ctrl-C stops at once


def _client(args: argparse.Namespace, cfg: Config, name: str) -> Client:
    url = args.url or cfg.client_url
    return Client(url, token=cfg.security.token, name=name, ssl=client_context(cfg, url))


def exit_code(run: dict[str, Any]) -> int:
    return EXIT_OK if run["status"] == RunState.COMPLETED else EXIT_FAILED


def event_json(ev: Event) -> dict[str, Any]:
    d = to_dict(ev)
    d["event"] = d.pop("t") and d.pop("kind")
    return d


async def follow(c: Client, run_id: str, as_json: bool, *, total: int | None = None,
                 since: int | None = None) -> dict[str, Any]:
    """Follow a run to its end, live for humans or as NDJSON; print its result. With
    `since`, the run's events after that seq first."""
    try:
        if as_json:
            def line(ev: Event) -> None:
                if ev.run_id == run_id:
                    print(json.dumps(event_json(ev), default=str), flush=True)

            run = await c.follow(run_id, line, since=since)
            print(json.dumps({"summary": run}, default=str), flush=True)
            return run
        from .console import Follower, console, print_run

        ended: list[str] = []
        if total is None:
            tasks = [t for t in (await c.run(run_id))["tasks"] if t["kind"] == "main"]
            total = len(tasks)
            ended = ended_tasks(tasks)
        out = console()
        with Follower(out, run_id, total, ended) as f:
            run = await c.follow(run_id, f.on_event, since=since)
        print_run(out, run)
        return run
    except ConnectionFailed as e:
        raise type(e)(f"{e}; run {run_id} goes on: `swarm watch {run_id}` follows it "
                      "again") from None


def cmd_deploy(args: argparse.Namespace) -> int:
    from .manifest import load_manifest

    cfg = load_config(args.config_flag or args.config)
    if args.manifest is None and args.resume is None:
        raise InputError("deploy needs a MANIFEST (or --resume RUN_ID)")
    # Validated here first: a bad manifest is never half-sent.
    workflow = load_manifest(args.manifest) if args.manifest else None

    async def go() -> int:
        async with _client(args, cfg, "swarm-deploy") as c:
            sub = await c.submit(workflow, follow=not args.detach, new=args.new,
                                 resume=args.resume)
            run_id = str(sub["run_id"])
            if args.detach:
                print(json.dumps(sub) if args.json else run_id)
                return EXIT_OK
            if not args.json:
                what = (f"attached to run {run_id}, which runs the same manifest already "
                        "(--new starts another)" if sub.get("attached") else f"run {run_id}")
                if args.resume:
                    what += f", resuming {args.resume} ({sub.get('reused', 0)} symbols done)"
                print(what, file=sys.stderr)
            total = len(workflow.symbols) if workflow and not sub.get("attached") else None
            return exit_code(await follow(c, run_id, args.json, total=total))

    return _run(go())


def cmd_rollback(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)

    async def go() -> int:
        async with _client(args, cfg, "swarm-rollback") as c:
            handle = await c.rollback(args.run_id, follow=not args.detach)
            if handle.nothing_to_undo:  # an answer, not a failure: nothing changed
                print(json.dumps({"run_id": args.run_id, "nothing_to_undo": True,
                                  "message": handle.message}) if args.json else handle.message)
                return EXIT_OK
            if args.detach:
                print(args.run_id)
                return EXIT_OK
            run = await follow(c, args.run_id, args.json)
            # The run keeps its own status; the rollback's outcome is its own.
            return EXIT_OK if run.get("rollback_status") == RunState.ROLLED_BACK else EXIT_FAILED

    return _run(go())


def cmd_control(args: argparse.Namespace) -> int:
    """pause / resume / cancel RUN_ID."""
    cfg = load_config(args.config)

    async def go() -> int:
        async with _client(args, cfg, f"swarm-{args.command}") as c:
            extra = {"rollback": args.rollback} if args.command == "cancel" else {}
            data = await c.request(args.command, run_id=args.run_id, **extra)
            print(json.dumps(data) if args.json else f"run {args.run_id}: {data['done']}")
        return EXIT_OK

    return _run(go())


def cmd_watch(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)

    if args.since is not None and (args.run_id is None or args.since < 0):
        raise InputError(f"--since {args.since}: needs a RUN_ID and a seq of 0 or more")

    async def go() -> int:
        async with _client(args, cfg, "swarm-watch") as c:
            if args.run_id is not None:
                if args.since is None:
                    await c.subscribe(args.run_id)
                return exit_code(await follow(c, args.run_id, args.json, since=args.since))
            await c.subscribe(None)
            from .console import event_line

            async for ev in c.events():  # the whole cluster, until interrupted
                if args.json:
                    print(json.dumps(event_json(ev), default=str), flush=True)
                elif (line := event_line(ev, every=True, with_run=True)) is not None:
                    print(line, flush=True)
            return EXIT_OK

    return _run(go())


def cmd_status(args: argparse.Namespace) -> int:
    from .console import console, print_status

    cfg = load_config(args.config)
    out = console()

    async def go() -> int:
        async with _client(args, cfg, "swarm-status") as c:
            if not args.watch:
                s = await c.status()
                if args.json:
                    print(json.dumps(s, indent=2, default=str))
                else:
                    print_status(out, s)
                return EXIT_OK
            shown = 0
            while args.count is None or shown < args.count:
                s = await c.status()
                if args.json:
                    print(json.dumps(s, default=str), flush=True)
                else:
                    if out.is_terminal:
                        out.clear()
                    print_status(out, s)
                shown += 1
                if args.count is None or shown < args.count:
                    await asyncio.sleep(args.interval)
            return EXIT_OK

    return _run(go())


def cmd_runs(args: argparse.Namespace) -> int:
    from .console import console, print_runs

    cfg = load_config(args.config)

    async def go() -> int:
        async with _client(args, cfg, "swarm-runs") as c:
            runs = await c.runs(args.limit)
        if args.json:
            print(json.dumps(runs, indent=2, default=str))
        else:
            print_runs(console(), runs, time.time())
        return EXIT_OK

    return _run(go())


def cmd_report(args: argparse.Namespace) -> int:
    from .console import console, print_report

    cfg = load_config(args.config)

    async def go() -> int:
        async with _client(args, cfg, "swarm-report") as c:
            rep = await c.report(args.run_id)
        if args.json:
            print(json.dumps(rep, indent=2, default=str))
        else:
            print_report(console(), rep)
        return EXIT_OK

    return _run(go())


def cmd_run(args: argparse.Namespace) -> int:
    from .dispatcher import tune_gc
    from .local import LocalSwarm
    from .manifest import load_manifest

    cfg = load_config(args.config)
    workflow = load_manifest(args.manifest)
    if args.workers < 1:
        raise ConfigError("--workers must be at least 1")

    async def go() -> int:
        tune_gc()  # this process hosts the dispatcher
        async with LocalSwarm(cfg, workers=args.workers, slots=args.slots,
                              db_path=args.db) as ls:
            c = ls.client
            check_routable(workflow, (await c.status())["nodes"])
            run = await c.deploy(workflow)
            if not args.json:
                print(f"run {run.run_id}: {workflow.name} {workflow.version}, "
                      f"{len(workflow.symbols)} symbols on {args.workers} local workers",
                      file=sys.stderr)
            return exit_code(await follow(c, run.run_id, args.json,
                                          total=len(workflow.symbols)))

    return _run(go())


def check_routable(workflow: Workflow, nodes: list[dict[str, Any]]) -> None:
    """Refuse a run that would wait forever: every backend it needs must be advertised."""
    have = {cap for n in nodes for cap in n["capabilities"]}
    missing: dict[str, list[str]] = {}
    for s in workflow.symbols:
        for name, dispatch in ((s.name, s.dispatch),
                               *(((s.rollback.name, s.rollback.dispatch),) if s.rollback else ())):
            if dispatch not in have:
                missing.setdefault(dispatch, []).append(name)
    if missing:
        lines = [f"no local worker can run dispatch '{d}' (symbols: {', '.join(names)})"
                 for d, names in missing.items()]
        raise InputError("; ".join(lines) + f". The workers advertise: {', '.join(sorted(have))}"
                         ". Configure the backend under [backends] and pass --config; "
                         "`swarm start-worker --log-level info` says why one is not advertised.")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


async def _open_and_close(db: str) -> None:
    import os

    from .state import Store

    if not os.path.isfile(db):
        raise InputError(f"{db}: no such state database")
    store = await Store.open(db)
    await store.close()


def cmd_prune(args: argparse.Namespace) -> int:
    from .maintenance import parse_duration, prune

    older = parse_duration(args.older_than, "--older-than")  # bad input fails here, exit 2
    cfg = load_config(args.config)
    if args.db:
        if not args.dry_run:  # upgraded first if need be (with a backup beside it)
            asyncio.run(_open_and_close(args.db))
        result = prune(args.db, older, dry_run=args.dry_run).to_dict()
    else:
        async def go() -> dict[str, Any]:
            async with _client(args, cfg, "swarm-prune") as c:
                return await c.prune(args.older_than, dry_run=args.dry_run)

        result = asyncio.run(go())
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    before = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(result["cutoff"]))
    rows = ", ".join(f"{n} {t}" for t, n in sorted(result["rows"].items()) if t != "runs")
    if result["dry_run"]:
        print(f"would remove {result['runs']} runs finished before {before}"
              + (f" ({rows})" if rows else ""))
    else:
        print(f"removed {result['runs']} runs finished before {before}"
              + (f" ({rows})" if rows else "")
              + f"; {_size(result['freed_bytes'])} given back ({_size(result['bytes_before'])}"
              f" -> {_size(result['bytes_after'])}) in {result['seconds']:.1f} s")
    return EXIT_OK


def cmd_backup(args: argparse.Namespace) -> int:
    import os

    from .maintenance import backup

    cfg = load_config(args.config)
    dest = os.path.abspath(args.file)
    if os.path.exists(dest):
        raise InputError(f"{dest}: exists already; a backup never overwrites a file")
    if args.db:
        result = backup(args.db, dest).to_dict()
    else:
        async def go() -> dict[str, Any]:
            async with _client(args, cfg, "swarm-backup") as c:
                return await c.backup(dest)

        result = asyncio.run(go())
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"wrote {result['path']}: {_size(result['bytes'])}, integrity {result['integrity']}"
              f", schema {result['schema_version']}, {result['runs']} runs "
              f"({result['active_runs']} active) in {result['seconds']:.1f} s")
    return EXIT_OK
