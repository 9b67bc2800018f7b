"""The cost of a checkpoint (issue #14): median commit-to-ack latency of a 10 KiB
checkpoint, as the symbol sees it.

A LocalSwarm as `swarm bench` runs it (dispatcher in this process, real SQLite with
synchronous=FULL, the default). Two measures:

- in-process worker: a handler times each `await ctx.checkpoint(data)`, from the call to
  the acknowledgement that it is committed;
- worker process: the built-in `steps` drill with 10 KiB of padding and no work between
  steps, so that the time between two committed checkpoints (journal timestamps) is one
  whole round trip: report, commit, acknowledgement, next report.

    PYTHONPATH=. python3 scripts/checkpoint_bench.py [--checkpoints 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import time
from typing import Any

import swarm
from swarm.manifest import workflow_from_dict

SIZE = 10 * 1024
_latencies: list[float] = []


@swarm.handler("checkpoint_bench")
async def _bench(params: dict[str, Any], ctx: Any) -> None:
    data: dict[str, Any] = {"i": 0, "pad": ""}
    data["pad"] = "x" * (SIZE - len(json.dumps(data)) - 4)
    for i in range(params["n"]):
        data["i"] = i
        t0 = time.perf_counter()
        kept = await ctx.checkpoint(data)
        _latencies.append(time.perf_counter() - t0)
        assert kept


def _summary(what: str, seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    return (f"{what}: {len(ms)} checkpoints of 10 KiB: median {statistics.median(ms):.2f} ms, "
            f"p90 {ms[int(len(ms) * 0.9)]:.2f} ms, min {ms[0]:.2f} ms, max {ms[-1]:.2f} ms")


def _one(handler: dict[str, Any]) -> dict[str, Any]:
    return {"name": "ck", "version": "1",
            "symbols": [{"name": "a", "type": "action", "parameters": handler}]}


async def main(n: int) -> None:
    async with swarm.LocalSwarm(workers=1, processes=False) as ls:
        run = await ls.client.deploy(workflow_from_dict(_one({"handler": "checkpoint_bench",
                                                              "n": n})))
        assert (await run.wait()).ok
    print(_summary("in-process worker, await ctx.checkpoint", _latencies[10:]))
    async with swarm.LocalSwarm(workers=1) as ls:
        pad = SIZE - len('{"step":000,"pad":""}')
        run = await ls.client.deploy(workflow_from_dict(_one(
            {"handler": "steps", "steps": n, "ms": 0, "pad": pad})))
        assert (await run.wait()).ok
        assert ls.db_path is not None
        con = sqlite3.connect(ls.db_path)
        ts = [r[0] for r in con.execute(
            "SELECT ts FROM events WHERE kind = 'symbol.checkpointed' ORDER BY seq")]
        con.close()
    print(_summary("worker process, steps drill (one round trip per step)",
                   [b - a for a, b in zip(ts[10:], ts[11:], strict=False)]))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=int, default=300)
    asyncio.run(main(ap.parse_args().checkpoints))
