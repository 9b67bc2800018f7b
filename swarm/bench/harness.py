"""The `swarm bench` harness: the workloads, the helper processes and the report.

Imported only by `swarm bench` (see `swarm.bench` for the workloads measured and the
command's options); nothing in the product imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..client import Client
from ..config import load_config
from ..dispatcher import tune_gc
from ..errors import SwarmError
from ..journal import FINAL_RUN_EVENTS, Kind
from ..local import LocalSwarm
from ..model import Symbol, Workflow
from . import SIZES, Sizes
from .peers import PEERS

RUN_TIMEOUT = 600.0  # seconds one run may take before the benchmark gives up
ROOT = str(Path(__file__).resolve().parents[2])  # the checkout, for helper processes


class BenchError(SwarmError):
    """A workload could not be measured (a run failed, a helper did not start)."""


@dataclass(slots=True)
class Row:
    """One figure: its samples, unit and target (`(">=", x)` or `("<=", x)`)."""

    key: str
    label: str
    unit: str
    samples: list[float]
    target: tuple[str, float] | None = None
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def to_dict(self) -> dict[str, Any]:
        met = None
        if self.target is not None:
            op, value = self.target
            met = self.median >= value if op == ">=" else self.median <= value
        return {"label": self.label, "unit": self.unit, "median": self.median,
                "min": min(self.samples), "max": max(self.samples), "samples": self.samples,
                "target": f"{self.target[0]} {self.target[1]:g}" if self.target else None,
                "met": met, **({"note": self.note} if self.note else {})}


@dataclass(slots=True)
class Bench:
    runs: int
    sizes: Sizes
    tmp: Path
    rows: dict[str, Row] = field(default_factory=dict)

    def add(self, row: Row) -> float:
        self.rows[row.key] = row
        _say(f"{row.label}: {_fmt(row.median)} {row.unit}")
        return row.median


def _say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


# --- workflows --------------------------------------------------------------------------


def _noop(name: str, deps: tuple[str, ...] = ()) -> Symbol:
    return Symbol(name=name, type="action", parameters={"handler": "noop"}, dependencies=deps)


def fanout(n: int, name: str = "bench-w1") -> Workflow:
    return Workflow(name=name, version="1", symbols=tuple(_noop(f"t{i}") for i in range(n)))


def dag(layers: int, width: int, seed: int = 42, parents: int = 3) -> Workflow:
    """`layers` x `width` no-op tasks, each with `parents` random ones of the layer before."""
    rng = random.Random(seed)
    symbols: list[Symbol] = []
    previous: list[str] = []
    for layer in range(layers):
        names = [f"l{layer}.t{i}" for i in range(width)]
        symbols += [_noop(n, tuple(rng.sample(previous, min(parents, len(previous)))))
                    for n in names]
        previous = names
    return Workflow(name="bench-w2", version="1", symbols=tuple(symbols))


# --- measuring --------------------------------------------------------------------------


async def timed_run(client: Client, wf: Workflow) -> float:
    """Seconds from submit to the run's final event; raises unless it completed."""
    async with asyncio.timeout(RUN_TIMEOUT):
        t0 = time.perf_counter()
        run = await client.deploy(wf, new=True)
        final = ""
        async with contextlib.aclosing(client.events(run.run_id)) as events:
            async for ev in events:
                if ev.kind in FINAL_RUN_EVENTS:
                    final = ev.kind
                    break
        elapsed = time.perf_counter() - t0
    if final != Kind.RUN_COMPLETED:
        raise BenchError(f"{wf.name}: run {run.run_id} ended {final or 'without an end'}")
    return elapsed


async def rates(bench: Bench, client: Client, wf: Workflow, what: str,
                warm: bool = True) -> list[float]:
    """Tasks/s of `--runs` runs of `wf`, after one warm-up run unless `warm` is false."""
    if warm:
        await timed_run(client, wf)
    out = []
    for i in range(bench.runs):
        out.append(len(wf.symbols) / await timed_run(client, wf))
        _say(f"{what} run {i + 1}/{bench.runs}: {_fmt(out[-1])} tasks/s")
    return out


def cpu_seconds(pids: list[int]) -> float:
    """CPU (user + system, all threads) of this process and of `pids`."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    total = ru.ru_utime + ru.ru_stime
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read().rsplit(")", 1)[1].split()
        total += (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def raw_spawn_rate(argv: list[str], n: int, parallel: int = 2) -> float:
    """Processes per second one Python process starts and reaps, `parallel` at a time."""

    async def spawner(count: int) -> None:
        for _ in range(count):
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
            await proc.wait()

    t0 = time.perf_counter()
    await asyncio.gather(*(spawner(n // parallel + (i < n % parallel)) for i in range(parallel)))
    return n / (time.perf_counter() - t0)


# --- W1-W4 and the W1 scale runs, on one local swarm -----------------------------------------


async def w1(bench: Bench, client: Client, pids: list[int]) -> None:
    wf = fanout(bench.sizes.w1)
    await timed_run(client, wf)  # the warm-up stays outside the CPU window
    cpu0 = cpu_seconds(pids)
    got = await rates(bench, client, wf, "W1", warm=False)
    per_task = (cpu_seconds(pids) - cpu0) / (bench.runs * len(wf.symbols))
    bench.add(Row("W1", f"W1 fan-out, {len(wf.symbols):,} no-op tasks", "tasks/s", got,
                  (">=", 5000)))
    bench.add(Row("CPU", "CPU per W1 task: this process (dispatcher + client) + workers",
                  "ms", [per_task * 1000], ("<=", 0.3), "one figure over the measured runs"))


async def w2(bench: Bench, client: Client) -> None:
    s = bench.sizes
    got = await rates(bench, client, dag(s.w2_layers, s.w2_width), "W2")
    bench.add(Row("W2", f"W2 DAG, {s.w2_layers} layers x {s.w2_width}, 3 parents each",
                  "tasks/s", got, (">=", 3000)))


async def w3(bench: Bench, client: Client, binary: str) -> None:
    n = bench.sizes.w3
    wf = Workflow(name="bench-w3", version="1", symbols=tuple(
        Symbol(name=f"p{i}", type="action", dispatch="rust_injector") for i in range(n)))
    # What the backend runs (DESIGN §4 argv), without its pipes, session and dispatcher.
    argv = [binary, "--symbol", "p0", "--type", "action", "--context", "generic",
            "--params", "{}"]
    await timed_run(client, wf)
    await raw_spawn_rate(argv, n)
    got, raw = [], []
    for i in range(bench.runs):  # interleaved, so that both see the same machine
        raw.append(await raw_spawn_rate(argv, n))
        got.append(n / await timed_run(client, wf))
        _say(f"W3 run {i + 1}/{bench.runs}: {_fmt(got[-1])} tasks/s, raw {_fmt(raw[-1])}/s")
    direct = await raw_spawn_rate(["/bin/true"], n)
    bench.add(Row("W3", f"W3 {n:,} subprocess tasks (rust_injector: exec /bin/true)",
                  "tasks/s", got))
    bench.add(Row("W3_raw", "W3 raw: one Python process spawning the same, 2 at a time",
                  "spawns/s", raw, note=f"/bin/true without the script: {direct:,.0f}/s"))
    bench.add(Row("W3_ratio", "W3 / raw spawn rate, per run", "%",
                  [100 * g / r for g, r in zip(got, raw, strict=True)], (">=", 90)))


async def w4(bench: Bench, client: Client, db: str) -> None:
    wf = Workflow(name="bench-w4", version="1", symbols=(_noop("alone"),))
    n = bench.sizes.w4
    # Each deploy reads past durations: the history in the state DB matters.
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        history = con.execute("SELECT COUNT(*) FROM attempts").fetchone()[0]
    for _ in range(max(10, n // 10)):
        await timed_run(client, wf)
    medians, p99s = [], []
    for i in range(bench.runs):
        ms = sorted([1000 * await timed_run(client, wf) for _ in range(n)])
        medians.append(statistics.median(ms))
        p99s.append(ms[round(0.99 * (len(ms) - 1))])
        _say(f"W4 run {i + 1}/{bench.runs}: median {medians[-1]:.2f} ms, "
             f"p99 {p99s[-1]:.2f} ms")
    bench.add(Row("W4", f"W4 latency, 1 task, submit to result ({n} in a row)", "ms",
                  medians, ("<=", 1.5), f"the state DB held {history:,} attempts before W4"))
    bench.add(Row("W4_p99", "W4 latency p99", "ms", p99s))


async def w5_rates(bench: Bench, client: Client, ls: LocalSwarm) -> None:
    """W1 at growing sizes, and with simulated workers. Every run adds to the history each
    deploy reads, so each comparison is with the figure measured just before it."""
    *smaller, mid, big = bench.sizes.scale
    by_size: dict[int, float] = {}

    async def at(n: int, warm: bool) -> None:
        got = await rates(bench, client, fanout(n), f"W5 W1@{n:,}", warm)
        by_size[n] = bench.add(Row(f"W5_w1_{n}", f"W5 W1 at {n:,} tasks", "tasks/s", got))

    for n in (*smaller, mid):
        await at(n, warm=True)
    sims = bench.sizes.simulated
    with simulated_workers(ls.url, sims):
        await wait_nodes(ls, ls.workers + sims)
        got = await rates(bench, client, fanout(mid), f"W5 W1 + {sims} simulated workers")
    await wait_nodes(ls, ls.workers)
    sim = bench.add(Row("W5_sim", f"W5 W1 ({mid:,}) with {sims:,} simulated workers",
                        "tasks/s", got))
    bench.add(Row("W5_sim_ratio", "W5 W1 with simulated workers / without", "%",
                  [100 * sim / by_size[mid]], (">=", 80)))
    await at(big, warm=False)  # warm from the smaller sizes
    bench.add(Row("W5_flat", f"W5 W1 rate at {big:,} / at {mid:,}", "%",
                  [100 * by_size[big] / by_size[mid]], (">=", 80)))


async def wait_nodes(ls: LocalSwarm, count: int, timeout: float = 120.0) -> None:
    assert ls.dispatcher is not None and ls.dispatcher.core is not None
    deadline = time.monotonic() + timeout
    while (n := len(ls.dispatcher.core.snapshot()["nodes"])) != count:
        if time.monotonic() > deadline:
            raise BenchError(f"{n} workers connected, expected {count}, after {timeout:.0f} s")
        await asyncio.sleep(0.2)


# --- helper processes ---------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SWARM_URL"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return env


def _end(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process this benchmark started: SIGTERM, SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def simulated_workers(url: str, n: int, seconds: float = 900.0
                      ) -> Iterator[subprocess.Popen[bytes]]:
    """A helper process holding `n` simulated worker connections for the `with` block."""
    code = "import sys; from swarm.bench.harness import simulate_workers as s; s(*sys.argv[1:])"
    proc = subprocess.Popen([sys.executable, "-c", code, url, str(n), str(seconds)],
                            env=_env(), stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        _end(proc)


def simulate_workers(url: str, n: str, seconds: str) -> None:
    """The helper's body: `n` workers that say hello (with a backend no workload uses, so
    they take no work) and heartbeat every second, for at most `seconds` or until SIGTERM."""
    from websockets.asyncio.client import ClientConnection, connect

    from .. import protocol as p

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        beat, gate = p.encode(p.Heartbeat(free=1)), asyncio.Semaphore(50)
        conns: list[ClientConnection] = []

        async def one(i: int) -> None:
            async with gate:
                ws = await connect(url, compression=None, ping_interval=None, open_timeout=30)
                conns.append(ws)
                await asyncio.wait_for(ws.recv(), 30)  # the challenge (no token here)
                await ws.send(p.encode(p.Hello(role="worker", name=f"sim-{i}", slots=1,
                                               capabilities=("powershell_engine",))))
                await asyncio.wait_for(ws.recv(), 30)  # the welcome
            await asyncio.sleep(random.random())  # spread the beats over the second
            while not stop.is_set():
                await ws.send(beat)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

        tasks = [loop.create_task(one(i)) for i in range(int(n))]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), float(seconds))
        stop.set()
        await asyncio.wait(tasks, timeout=10)
        await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)

    asyncio.run(main())


# --- W5 in processes of their own: manifests, a dispatcher's memory ----------------------------


def write_manifests(folder: Path, n: int, width: int = 100, seed: int = 42) -> list[Path]:
    """One layered DAG (3 parents from the layer before) as YAML and as TOML."""
    rng = random.Random(seed)
    yaml, toml = ["name: bench-w5", 'version: "1"', "symbols:"], ['name = "bench-w5"',
                                                                  'version = "1"']
    for i in range(n):
        first = i - i % width
        deps = [f"s{j}" for j in rng.sample(range(first - width, first), 3)] if first else []
        yaml += [f"  - name: s{i}", "    type: action", "    context: generic",
                 "    dispatch: internal", f"    parameters: {{handler: noop, index: {i}}}",
                 f"    dependencies: [{', '.join(deps)}]", "    timeout: 30000"]
        toml += ["", "[[symbols]]", f'name = "s{i}"', 'type = "action"', 'context = "generic"',
                 'dispatch = "internal"', f"dependencies = {json.dumps(deps)}",
                 "timeout = 30000", "[symbols.parameters]", 'handler = "noop"', f"index = {i}"]
    paths = [folder / "w5.yaml", folder / "w5.toml"]
    for path, lines in zip(paths, (yaml, toml), strict=True):
        path.write_text("\n".join(lines) + "\n")
    return paths


_LOAD = """
import json, sys, time
from swarm.manifest import load_manifest
from swarm.plan import analyze
t0 = time.perf_counter()
wf = load_manifest(sys.argv[1])
analyze(wf)
seconds = time.perf_counter() - t0
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_kib": hwm, "symbols": len(wf.symbols)}))
"""


def w5_manifests(bench: Bench) -> None:
    n = bench.sizes.manifest
    for path in write_manifests(bench.tmp, n):
        fmt, seconds, mib = path.suffix[1:], [], []
        for _ in range(bench.runs):
            out = subprocess.run([sys.executable, "-c", _LOAD, str(path)], env=_env(),
                                 capture_output=True, text=True, timeout=300, check=False)
            if out.returncode != 0 or json.loads(out.stdout or "{}").get("symbols") != n:
                raise BenchError(f"loading {path} failed: {out.stderr.strip()[-500:]}")
            seconds.append(json.loads(out.stdout)["seconds"])
            mib.append(json.loads(out.stdout)["peak_kib"] / 1024)
        size = path.stat().st_size / (1 << 20)
        bench.add(Row(f"W5_{fmt}_s", f"W5 load+validate+plan {n:,}-symbol {fmt.upper()} "
                      f"({size:.1f} MiB)", "s", seconds, ("<=", 5)))
        bench.add(Row(f"W5_{fmt}_rss", f"W5 peak RSS of that process ({fmt.upper()})", "MiB",
                      mib, ("<=", 512)))


async def w5_memory(bench: Bench, config_path: str) -> None:
    """RSS growth of a dispatcher process holding one n-symbol run, no worker connected."""
    n, ready = bench.sizes.manifest, bench.tmp / "dispatcher.url"
    proc = subprocess.Popen(
        [sys.executable, "-m", "swarm", "start-dispatcher", config_path, "--host", "127.0.0.1",
         "--port", "0", "--db", str(bench.tmp / "queued.db"), "--ready-file", str(ready),
         "--log-level", "warning"], env=_env(), stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (ready.exists() and ready.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError("the W5 dispatcher did not start")
            await asyncio.sleep(0.05)
        wf = fanout(n, "bench-w5-queued")
        async with Client(ready.read_text().strip()) as client:
            await asyncio.sleep(0.5)
            before = rss_kib(proc.pid)
            await client.submit(wf, follow=False)  # answered once the run is committed
            await asyncio.sleep(1.0)
            after = rss_kib(proc.pid)
    finally:
        _end(proc)
    bench.add(Row("W5_memory", f"W5 dispatcher RSS growth per queued symbol ({n:,} queued)",
                  "bytes", [(after - before) * 1024 / n]))


# --- the command --------------------------------------------------------------------------


def write_config(folder: Path, slots: int, binary: str) -> str:
    """The shipped defaults (WAL, synchronous = FULL) but for sizes; the workers read it."""
    path = folder / "bench-config.toml"
    path.write_text(f"""\
[dispatcher]
max_connections = 4096
[coordinator]
max_workers = 4096
[worker]
max_concurrent_tasks = {slots}
[worker.capabilities]
php_engine = false
powershell_engine = false
[backends.rust_injector]
binary_path = "{binary}"
""")
    return str(path)


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Measure the selected workloads; the report `--json` prints."""
    only, started = set(args.only), time.perf_counter()
    info: dict[str, Any] = {"workers": args.workers, "slots": args.slots, "runs": args.runs,
                            "scale": args.scale, "db": args.db or "(temporary)"}
    with tempfile.TemporaryDirectory(prefix="swarm-bench-") as tmp:
        bench = Bench(args.runs, SIZES[args.scale], Path(tmp))
        binary = bench.tmp / "fake-injector"
        binary.write_text("#!/bin/sh\nexec /bin/true\n")
        binary.chmod(0o755)
        config_path = write_config(bench.tmp, args.slots, str(binary))
        config = load_config(config_path)
        info["synchronous"] = config.dispatcher.synchronous
        db = args.db or str(bench.tmp / "state.db")
        async with LocalSwarm(config, workers=args.workers, slots=args.slots,
                              db_path=db) as ls, \
                Client(ls.url, name="bench") as client:
            if "W1" in only:
                await w1(bench, client, [proc.pid for proc in ls.procs])
            if "W2" in only:
                await w2(bench, client)
            if "W3" in only:
                await w3(bench, client, str(binary))
            if "W4" in only:
                await w4(bench, client, db)
            if "W5" in only:
                await w5_rates(bench, client, ls)
        with contextlib.closing(sqlite3.connect(db)) as con:
            info["journal_mode"] = con.execute("PRAGMA journal_mode").fetchone()[0]
        if "W5" in only:
            w5_manifests(bench)
            await w5_memory(bench, config_path)
    info.update(elapsed_s=round(time.perf_counter() - started, 1), cpus=os.cpu_count(),
                python=sys.version.split()[0])
    return {"config": info, "results": {k: r.to_dict() for k, r in bench.rows.items()},
            "peers": {name: dict(zip(("W1", "W2", "W3", "W4", "CPU"), v, strict=True))
                      for name, v in PEERS.items()}}


def main_bench(args: argparse.Namespace) -> int:
    """`swarm bench`: measure, then print a table (or one JSON object). Targets are shown,
    not enforced: the exit code is 0 whenever every workload could be measured."""
    tune_gc()  # the dispatcher runs in this process: set up as `swarm start-dispatcher` does
    report = asyncio.run(run_bench(args))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


def print_table(report: dict[str, Any]) -> None:
    from rich import box
    from rich.table import Table

    from ..console import console

    out, c = console(), report["config"]
    table = Table(box=box.SIMPLE if out.is_terminal else box.ASCII2, title=(
        f"swarm bench: {c['workers']} workers x {c['slots']} slots, median of {c['runs']} "
        f"after a warm-up, SQLite {c['journal_mode']} synchronous={c['synchronous']} "
        f"({c['elapsed_s']:.0f} s)"))
    for name in ("figure", "median", "min-max", "unit", "target", "met?"):
        table.add_column(name, justify="left" if name in ("figure", "unit") else "right")
    for r in report["results"].values():
        spread = "-" if len(r["samples"]) < 2 else f"{_fmt(r['min'])}-{_fmt(r['max'])}"
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: ""}[r["met"]]
        table.add_row(r["label"], _fmt(r["median"]), spread, r["unit"], r["target"] or "", met)
    out.print(table)
    for r in report["results"].values():
        if r.get("note"):
            out.print(f"{r['label']}: {r['note']}")
    out.print("Peers (same machine, 2 workers; W1/W2/W3 tasks/s, W4, CPU per task): " + "; ".join(
        f"{name} {w1:,}/{w2:,}/{w3:,}, {w4} ms, {cpu} ms" for name, (w1, w2, w3, w4, cpu)
        in PEERS.items()))
