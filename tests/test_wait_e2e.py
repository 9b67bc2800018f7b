"""Issue #13 items 5 and 7 with real processes on 127.0.0.1: a symbol that no connected
worker can run is shown waiting, with the reason, everywhere a run is followed (and fails
with it once its `wait_for_worker` runs out); `swarm rollback` is a phase of its own that
never rewrites the run's outcome, and says so when there is nothing to undo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from backend_support import PS_ENGINE, fake_pwsh_path
from e2e_support import (
    Cluster,
    free_port,
    ndjson,
    result_json,
    swarm_argv,
    wait_for,
    write_manifest,
)

import swarm
from swarm.manifest import workflow_from_dict

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

NO_PWSH = "[worker.capabilities]\npowershell_engine = false\nphp_engine = false\n"
REASON = "no connected worker has backend powershell_engine"


def _pwsh_config(cluster: Cluster) -> Path:
    return cluster.write_config("pwsh.toml", f"""
[worker.capabilities]
php_engine = false
[backends.powershell_engine]
pwsh_binary = "{fake_pwsh_path()}"
script_path = "{PS_ENGINE}"
""")


def _lines(cluster: Cluster, key: str) -> list[str]:
    return cluster.log(key).splitlines()


def _events(cluster: Cluster, key: str) -> list[dict[str, Any]]:
    """The JSON lines a `--json` follower wrote so far (its log holds stdout)."""
    out = []
    for line in _lines(cluster, key):
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def _until_listening(cluster: Cluster, folder: Path, keys: tuple[str, ...]) -> None:
    """Deploy a marker run until every follower in `keys` has shown one: they listen."""
    marker = write_manifest(folder, """
        name: marker
        version: "1"
        symbols: [{name: mark, type: action, parameters: {handler: noop}}]
    """, "marker.yaml")
    for _ in range(20):
        run_id = cluster.detach(marker, "--new")
        try:
            wait_for(lambda r=run_id: all(r in cluster.log(k) for k in keys), timeout=2,
                     what="the followers to show the marker run")
            return
        except AssertionError:
            continue
    raise AssertionError(f"{keys} never listened")


MANIFEST = """
    name: needs-pwsh
    version: "1"
    symbols:
      - {name: hi, type: action, parameters: {handler: noop}}
      - {name: audit, type: query, dispatch: powershell_engine, parameters: {check: x}}
"""


def test_a_symbol_waiting_for_a_missing_backend_is_shown_with_the_reason_until_one_joins(
        cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_dispatcher()
    # The whole cluster's events, in plain lines (not a terminal) and as JSON; they are
    # listening once they show the worker that joins after them.
    cluster._spawn("watch", swarm_argv("watch", "--url", cluster.url))
    cluster._spawn("watch-json", swarm_argv("watch", "--url", cluster.url, "--json"))
    cluster.start_worker("py", cluster.write_config("py.toml", NO_PWSH))
    _until_listening(cluster, tmp_path, ("watch", "watch-json"))
    deploy = cluster._spawn("deploy", swarm_argv(
        "deploy", str(write_manifest(tmp_path, MANIFEST)), str(cluster.config_path),
        "--url", cluster.url))
    waiting = wait_for(lambda: [e for e in _events(cluster, "watch-json")
                                if e["event"] == "symbol.waiting"], what="symbol.waiting")
    assert waiting[0]["symbol"] == "audit" and waiting[0]["data"] == {"reason": REASON}
    run_id = waiting[0]["run_id"]
    for key, prefix in (("watch", f"{run_id} symbol.waiting"), ("deploy", "symbol.waiting")):
        line = wait_for(lambda k=key: [x for x in _lines(cluster, k) if "symbol.waiting" in x],
                        what=f"{key} to show the wait in plain lines")[0]
        assert prefix in line and line.endswith(f"audit {REASON}"), line
    status = json.loads(cluster.cli("status", "--url", cluster.url, "--json").stdout)
    (x,) = status["waiting_for_capability"]
    assert (x["symbol"], x["reason"], x["due"]) == ("audit", REASON, None)
    assert REASON in cluster.cli("status", "--url", cluster.url).stdout
    assert cluster.tasks(run_id)["audit"]["state"] == "ready"
    # The default: it waits for as long as it takes. A worker that can run it joins.
    cluster.start_worker("pwsh", _pwsh_config(cluster), extra_env={
        "FAKE_PWSH_LOG": str(cluster.root / "pwsh.log")})
    assert deploy.wait(60) == 0, cluster.log("deploy")
    kinds = [e["event"] for e in _events(cluster, "watch-json") if e.get("symbol") == "audit"]
    assert kinds.count("symbol.waiting") == 1
    assert kinds.index("symbol.waiting") < kinds.index("symbol.unblocked") < kinds.index(
        "symbol.completed")
    assert "completed: 2 symbols" in cluster.log("deploy")


async def test_the_python_api_updates_say_which_symbols_wait_and_why(
        cluster: Cluster) -> None:
    cluster.start_dispatcher()
    cluster.start_worker("py", cluster.write_config("py.toml", NO_PWSH))
    workflow = workflow_from_dict(yaml_doc(MANIFEST))
    seen: list[tuple[tuple[str, str], ...]] = []
    async with swarm.Client(cluster.url) as c:
        run = await c.deploy(workflow)
        async for update in run.watch():
            seen.append(update.waiting)
            if update.waiting and "pwsh" not in cluster.procs:
                assert (await c.status())["waiting_for_capability"][0]["reason"] == REASON
                cluster.start_worker("pwsh", _pwsh_config(cluster), wait=False, extra_env={
                    "FAKE_PWSH_LOG": str(cluster.root / "pwsh.log")})
        result = await run.wait()
    assert (("audit", REASON),) in seen and seen[-1] == ()
    assert result.status == "completed" and result.symbol("audit").state == "completed"


def yaml_doc(text: str) -> Any:
    import textwrap

    import yaml

    return yaml.safe_load(textwrap.dedent(text))


def test_wait_for_worker_fails_the_symbol_with_the_reason_and_on_failure_applies(
        cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_dispatcher()
    cluster.start_worker("py", cluster.write_config("py.toml", NO_PWSH))
    m = write_manifest(tmp_path, """
        name: impatient
        version: "1"
        on_failure: continue
        wait_for_worker: 600000
        symbols:
          - {name: hi, type: action, parameters: {handler: noop}}
          - {name: audit, type: query, dispatch: powershell_engine, wait_for_worker: 300}
          - {name: report, type: action, dependencies: [audit], parameters: {handler: noop}}
    """)
    cp = cluster.deploy(m)
    assert cp.returncode == 1, cp.stdout + cp.stderr
    events = ndjson(cp)
    (w,) = [e for e in events if e.get("event") == "symbol.waiting"]
    assert w["symbol"] == "audit" and w["data"]["reason"] == REASON
    assert w["data"]["wait_for_worker"] == 300  # the symbol's own value wins
    (f,) = [e for e in events if e.get("event") == "symbol.failed"]
    assert f["symbol"] == "audit" and f["data"]["error"].startswith(REASON)
    assert f["ts"] - w["ts"] == pytest.approx(0.3, abs=0.25)
    run = result_json(cp)
    states = {t["symbol"]: (t["state"], t["attempts"]) for t in run["tasks"]}
    assert states == {"hi": ("completed", 1), "audit": ("failed", 0),
                      "report": ("skipped", 0)}
    assert run["status"] == "failed"
    plain = cluster.cli("report", run["run_id"], "--url", cluster.url)
    assert plain.returncode == 0 and "symbol.waiting" in plain.stdout


def test_a_wait_for_worker_due_time_survives_a_dispatcher_restart(
        cluster: Cluster, tmp_path: Path) -> None:
    port = free_port()
    cluster.start_dispatcher(port=port)
    cluster.start_worker("py", cluster.write_config("py.toml", NO_PWSH))
    m = write_manifest(tmp_path, """
        name: restarts
        version: "1"
        wait_for_worker: 7000
        symbols:
          - {name: audit, type: query, dispatch: powershell_engine}
    """)
    run_id = cluster.detach(m)

    def due() -> float | None:
        return cluster.tasks(run_id).get("audit", {}).get("due_at")

    first = wait_for(due, what="the wait's due time to be stored")
    assert cluster.stop("dispatcher") == 0
    cluster.start_dispatcher(port=port)
    failed = wait_for(lambda: cluster.query(
        "SELECT ts, data FROM events WHERE run_id = ? AND kind = 'symbol.failed'", (run_id,)),
        timeout=30, what="the symbol to fail at its due time")
    waits = cluster.query("SELECT data FROM events WHERE run_id = ? AND kind = "
                          "'symbol.waiting' ORDER BY seq", (run_id,))
    # Once before the restart, once after the workers' grace: the same due time both times.
    assert [json.loads(x["data"])["due"] for x in waits] == [first, first]
    assert failed[0]["ts"] == pytest.approx(first, abs=1.0)
    assert json.loads(failed[0]["data"])["error"].startswith(REASON)
    assert cluster.run_status(run_id) == "rolled_back"  # on_failure: rollback (nothing to do)
