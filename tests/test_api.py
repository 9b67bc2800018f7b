"""The Python API, used the way a script would use it: only names `swarm` exports."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

import swarm

REPO = Path(__file__).resolve().parent.parent
HELLO = REPO / "examples" / "hello.yaml"

pytestmark = [pytest.mark.timeout(120)]


def quick(token: str = "") -> swarm.Config:
    cfg = swarm.Config()
    return dataclasses.replace(
        cfg, retry=swarm.RetryPolicy(initial_delay=50, max_delay=100, jitter=0.0),
        security=dataclasses.replace(cfg.security, token=token))


async def test_deploy_a_manifest_and_wait_for_its_result() -> None:
    async with swarm.LocalSwarm(quick(), workers=2) as ls:
        run = await ls.client.deploy(HELLO)
        result = await run.wait()
    assert isinstance(result, swarm.RunResult) and result.ok and result.done
    assert result.symbol("greet").output == {"message": "hello, swarm"}
    assert {s.node for s in result.symbols} <= {"local-1", "local-2"}
    assert all(s.attempts == 1 and s.state == "completed" for s in result.symbols)


async def test_watch_yields_progress_until_the_run_ends() -> None:
    async with swarm.LocalSwarm(quick(), workers=1, processes=False) as ls:
        run = await ls.client.deploy(HELLO)
        updates = [u async for u in run.watch()]
    assert all(isinstance(u, swarm.RunUpdate) for u in updates)
    assert updates[-1].done and updates[-1].status == "completed"
    assert updates[-1].completed == updates[-1].total == 5
    percentages = [u.percentage for u in updates]
    assert percentages == sorted(percentages) and percentages[-1] == 100.0
    assert any(u.running for u in updates)
    assert updates[-1].recent[-1].kind == "run.completed"


async def test_a_workflow_built_in_code_runs_a_handler_registered_with_the_decorator() -> None:
    calls: list[dict[str, object]] = []

    @swarm.handler("api-test-double")
    async def double(params: dict[str, int]) -> dict[str, int]:
        calls.append(params)
        return {"twice": params["n"] * 2}

    wf = swarm.Workflow(name="code", version="1", symbols=(
        swarm.Symbol(name="a", type="transform",
                     parameters={"handler": "api-test-double", "n": 21}),
        swarm.Symbol(name="b", type="action", dependencies=("a",),
                     parameters={"handler": "noop"}),
    ))
    async with swarm.LocalSwarm(quick(), workers=1, processes=False) as ls:
        result = await (await ls.client.deploy(wf)).wait()
    assert result.ok and result.symbol("a").output == {"twice": 42}
    assert calls == [{"handler": "api-test-double", "n": 21}]


async def test_cancel_ends_a_run_cancelled() -> None:
    wf = swarm.Workflow(name="long", version="1", symbols=(
        swarm.Symbol(name="slow", type="action", parameters={"handler": "delay", "ms": 30_000}),
        swarm.Symbol(name="after", type="action", dependencies=("slow",)),
    ))
    async with swarm.LocalSwarm(quick(), workers=1) as ls:
        run = await ls.client.deploy(wf)
        cancelled = False
        async for update in run.watch():
            if update.running and not cancelled:
                await run.cancel()
                cancelled = True
        result = await run.wait()
        report = await ls.client.report(run.run_id)
    assert result.status == "cancelled" and not result.ok
    assert result.symbol("slow").state == result.symbol("after").state == "cancelled"
    assert report["totals"] == {"cancelled": 2}


async def test_dispatcher_and_worker_as_context_managers(tmp_path: Path) -> None:
    cfg = quick()
    cfg = dataclasses.replace(cfg, dispatcher=dataclasses.replace(
        cfg.dispatcher, websocket_port=0, state_db_path=str(tmp_path / "state.db")))
    async with (swarm.Dispatcher(cfg) as d, swarm.Worker(cfg, name="inproc", url=d.url),
                swarm.Client(d.url) as c):
        result = await (await c.deploy(HELLO)).wait()
        status = await c.status()
    assert result.ok and status["nodes"][0]["name"] == "inproc"
    assert (tmp_path / "state.db").exists()


async def test_an_unreachable_dispatcher_raises_dispatcher_unreachable() -> None:
    with pytest.raises(swarm.DispatcherUnreachable, match="cannot reach the dispatcher"):
        async with swarm.Client("ws://127.0.0.1:9"):
            pass


async def test_a_wrong_token_raises_authentication_failed() -> None:
    async with swarm.LocalSwarm(quick(token="right"), workers=1) as ls:
        assert (await ls.client.status())["nodes"]
        with pytest.raises(swarm.AuthenticationFailed, match="authentication failed"):
            async with swarm.Client(ls.url, token="wrong"):
                pass
        with pytest.raises(swarm.AuthenticationFailed, match="requires a token"):
            async with swarm.Client(ls.url):
                pass


async def test_a_bad_manifest_raises_the_same_problems_as_the_cli(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text('name: bad\nversion: "1"\nsymbols:\n  - {name: a, type: nope, timeout: 0}\n')
    with pytest.raises(swarm.ManifestError) as caught:
        swarm.load_manifest(bad)
    assert {p.field for p in caught.value.problems} == {"type", "timeout"}
    cli = subprocess.run([sys.executable, "-m", "swarm", "validate", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2 and cli.stderr.strip() == f"swarm: {caught.value}"
    async with swarm.LocalSwarm(quick(), workers=1, processes=False) as ls:
        with pytest.raises(swarm.ManifestError):
            await ls.client.deploy(bad)
        with pytest.raises(swarm.RequestRefused, match="no run"):
            await ls.client.report("run-that-does-not-exist")


def test_every_public_name_is_exported_and_typed() -> None:
    for name in swarm.__all__:
        assert getattr(swarm, name) is not None, name
    assert (Path(swarm.__file__).parent / "py.typed").exists()


def test_the_readme_python_example_runs(tmp_path: Path) -> None:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Using swarm from Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    script = tmp_path / "example.py"
    script.write_text(code.group(1))
    cp = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        timeout=100, cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr
    assert "completed hello, swarm" in cp.stdout and "100% completed" in cp.stdout


async def test_a_run_larger_than_one_frame_deploys_and_reports() -> None:
    # 10,000 symbols: the deploy and the run's record are both well over 1 MiB.
    wf = swarm.Workflow(name="big", version="1", symbols=tuple(
        swarm.Symbol(name=f"s{i:05d}", type="action", parameters={"handler": "noop"})
        for i in range(10_000)))
    async with swarm.LocalSwarm(quick(), workers=1, slots=64, processes=False) as ls:
        result = await (await ls.client.deploy(wf)).wait()
    assert result.ok and len(result.symbols) == 10_000
