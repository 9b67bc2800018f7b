"""Dashboard figures for issue #17: how soon a big run's page is usable, how long the page's
main thread blocks while the run goes at full speed, and W1 (no-op fan-out) dispatch rates
with and without a dashboard open on the run.

A LocalSwarm (dispatcher in this process, 2 worker processes, 256 slots each, real SQLite
as shipped), as `swarm bench` does, and headless Chromium driven by selenium. Runs with and
without the page alternate, so that drift on a shared machine hits both alike.

    PYTHONPATH=. python3 scripts/dashboard_bench.py [--sizes 10000,100000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

from swarm.bench import fanout
from swarm.dispatcher import tune_gc
from swarm.local import LocalSwarm
from swarm.results import FINAL_RUN_EVENTS

LONGTASKS = """
window.__long = 0;
new PerformanceObserver((list) => { for (const e of list.getEntries())
  window.__long = Math.max(window.__long, e.duration); })
  .observe({type: 'longtask', buffered: true});
"""


def browser() -> Any:
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,800"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"),
                            options=opts)


def open_page(driver: Any, url: str) -> float:
    """Navigate afresh; ms from navigation start to the run view being drawn."""
    driver.get("about:blank")
    driver.get(url)
    WebDriverWait(driver, 120, poll_frequency=0.05).until(
        lambda d: d.execute_script("return document.body.dataset.readyAt"))
    driver.execute_script(LONGTASKS)
    return float(driver.execute_script("return Number(document.body.dataset.readyAt)"))


async def one_run(ls: LocalSwarm, n: int, driver: Any | None, http: str, mode: str
                  ) -> dict[str, float]:
    """One W1 run of `n` symbols. mode "none": no page; "cluster": the cluster view open
    throughout; "run": the run's own page opened as the run starts, and opened again
    once it has ended."""
    client = ls.client
    wf = fanout(n, name=f"dash-bench-{n}")
    if mode == "cluster" and driver is not None:
        await asyncio.to_thread(driver.get, f"{http}/#/")
    elif driver is not None:
        await asyncio.to_thread(driver.get, "about:blank")
    t0 = time.perf_counter()
    run = await client.deploy(wf, new=True)
    page: asyncio.Future[float] | None = None
    if mode == "run" and driver is not None:  # the page opens while the run goes
        page = asyncio.ensure_future(asyncio.to_thread(open_page, driver,
                                                       f"{http}/#/run/{run.run_id}"))
    async with contextlib.aclosing(client.events(run.run_id)) as events:
        async for ev in events:
            if ev.kind in FINAL_RUN_EVENTS:
                assert ev.kind == "run.completed", ev.kind
                break
    out = {"rate": n / (time.perf_counter() - t0)}
    if page is not None and driver is not None:
        out["ready_ms_during_run"] = await page
        out["longest_block_ms"] = float(await asyncio.to_thread(
            driver.execute_script, "return window.__long || 0"))
        out["ready_ms_after"] = await asyncio.to_thread(
            open_page, driver, f"{http}/#/run/{run.run_id}")
    return out


async def main(sizes: list[int], runs: int) -> dict[str, Any]:
    tune_gc()
    results: dict[str, Any] = {}
    med = statistics.median
    with tempfile.TemporaryDirectory() as tmp:
        async with LocalSwarm(workers=2, slots=256, db_path=str(Path(tmp) / "state.db")) as ls:
            http = ls.url.replace("ws://", "http://", 1)
            driver = await asyncio.to_thread(browser)
            try:
                for n in sizes:
                    count = runs if n <= 20_000 else 2
                    await one_run(ls, n, None, http, "none")  # warm-up, and history
                    got: dict[str, list[dict[str, float]]] = {"none": [], "cluster": [],
                                                              "run": []}
                    for i in range(count):
                        # Every other round in reverse: the DB grows with each run, and a
                        # fixed order would charge that growth to the modes that come last.
                        for mode in list(got) if i % 2 == 0 else list(got)[::-1]:
                            got[mode].append(await one_run(ls, n, driver, http, mode))
                            print(f"{n} {mode} {i + 1}/{count}: {got[mode][-1]}",
                                  file=sys.stderr)
                    base = med(o["rate"] for o in got["none"])
                    results[str(n)] = {
                        "runs_each": count,
                        "rate_no_dashboard": base,
                        "rate_cluster_view_open": med(o["rate"] for o in got["cluster"]),
                        "rate_run_page_opened_at_start": med(o["rate"] for o in got["run"]),
                        "page_ready_ms_during_run": med(o["ready_ms_during_run"]
                                                        for o in got["run"]),
                        "page_ready_ms_after_run": med(o["ready_ms_after"] for o in got["run"]),
                        "longest_main_thread_block_ms": max(o["longest_block_ms"]
                                                            for o in got["run"]),
                    }
                    for mode in ("cluster", "run"):
                        r = results[str(n)]
                        key = ("rate_cluster_view_open" if mode == "cluster"
                               else "rate_run_page_opened_at_start")
                        r[f"slowdown_pct_{mode}"] = round(100 * (1 - r[key] / base), 1)
            finally:
                await asyncio.to_thread(driver.quit)
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    print(json.dumps(asyncio.run(main([int(x) for x in a.sizes.split(",")], a.runs)), indent=2))
