"""Secrets stay secret: references resolved only on the worker, values only in the
backend's environment; private state DB files; secret-looking names kept out of argv,
logs and reports."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets as stdlib_secrets
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from e2e_support import Cluster, env, ndjson, swarm_argv, wait_for, write_manifest

import swarm
from swarm.backends import Invocation
from swarm.backends.process import build_argv
from swarm.config import parse_config
from swarm.errors import ConfigError, ManifestError
from swarm.manifest import parse_manifest
from swarm.secrets import (
    REDACTED,
    SecretError,
    argv_parameters,
    inherited_environment,
    looks_secret,
    redact,
    redact_text,
    resolve,
    scrub,
)
from swarm.state import Store

pytestmark = [pytest.mark.timeout(120)]

# A backend that proves what it saw without saying it: hashes of the secrets it found in
# its environment, and whether the secret-looking parameter came on stdin. Then it holds
# (so the test can read every process's argv) and finally echoes the values on stdout
# and stderr, as a careless backend would: the worker must scrub them.
BACKEND = r'''#!{python}
import hashlib, json, os, sys, time
if sys.argv[1:] == ["--version"]:
    print("secret-probe 1.0")
    sys.exit(0)
doc = json.load(sys.stdin)
params = doc["parameters"]
argv_params = json.loads(sys.argv[sys.argv.index("--params") + 1])
digest = lambda name: hashlib.sha256(os.environ.get(name, "").encode()).hexdigest()
with open(params["out"] + ".tmp", "w") as f:
    json.dump({{"DB_PASSWORD": digest("DB_PASSWORD"), "API_TOKEN": digest("API_TOKEN"),
               "stdin_password": params.get("password"),
               "argv_has_password": "password" in argv_params,
               "argv_site": argv_params.get("site"),
               "worker_env_source_visible": "E2E_API_TOKEN_SOURCE" in os.environ,
               "swarm_token_visible": "SWARM_TOKEN" in os.environ}}, f)
os.rename(params["out"] + ".tmp", params["out"])
deadline = time.monotonic() + 60
while not os.path.exists(params["gate"]) and time.monotonic() < deadline:
    time.sleep(0.02)
print("db is " + os.environ["DB_PASSWORD"] + ", api is " + os.environ["API_TOKEN"],
      file=sys.stderr)
print(json.dumps({{"echo": os.environ["DB_PASSWORD"], "api_key": params["password"]}}))
'''


def _probe_backend(folder: Path) -> Path:
    script = folder / "probe-backend"
    script.write_text(BACKEND.format(python=sys.executable))
    script.chmod(0o755)
    return script


def _all_cmdlines() -> dict[int, bytes]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found[int(entry.name)] = (entry / "cmdline").read_bytes()
            except OSError:  # gone meanwhile, or not ours to read
                continue
    return found


@pytest.mark.e2e
def test_a_secret_appears_nowhere_but_in_the_backends_environment(tmp_path: Path) -> None:
    db_value = "db-" + stdlib_secrets.token_hex(16)
    api_value = "api-" + stdlib_secrets.token_hex(16)
    plain_password = "plain-" + stdlib_secrets.token_hex(16)  # a parameter, not a secret
    secret_file = tmp_path / "db-password"
    secret_file.write_text(db_value + "\n")  # as `echo ... > file` writes it
    secret_file.chmod(0o600)
    script = _probe_backend(tmp_path)
    out, gate = tmp_path / "probe.json", tmp_path / "gate"
    manifest = write_manifest(tmp_path, f"""
        name: secret-demo
        version: "1"
        symbols:
          - name: use_db
            type: action
            dispatch: rust_injector
            retries: 0
            parameters: {{out: "{out}", gate: "{gate}", password: "{plain_password}",
                         site: example}}
            secrets: {{DB_PASSWORD: prod_db_password, API_TOKEN: api_token}}
        """)
    cl = Cluster(tmp_path)
    worker_cfg = cl.write_config("worker.toml", f"""
[backends.rust_injector]
binary_path = "{script}"

[secrets]
prod_db_password = "file:{secret_file}"
api_token = "env:E2E_API_TOKEN_SOURCE"
""")
    old_umask = os.umask(0)  # the dispatcher inherits it: its files must be 0600 anyway
    try:
        cl.start_dispatcher()
    finally:
        os.umask(old_umask)
    try:
        # SWARM_TOKEN: the cluster's credential, which no backend needs either.
        cl.start_worker("w1", worker_cfg, extra_env={"E2E_API_TOKEN_SOURCE": api_value,
                                                     "SWARM_TOKEN": "cluster-credential"})
        events_file = tmp_path / "events.ndjson"
        with open(events_file, "wb") as sink:
            deploy = subprocess.Popen(
                swarm_argv("deploy", str(manifest), str(cl.config_path), "--url", cl.url,
                           "--json"), stdout=sink, stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL, cwd=tmp_path, env=env())
            cl.procs["deploy"] = deploy  # ended by cl.close() whatever happens
            wait_for(out.exists, what="the backend to start")
            # While it runs: no process's argv holds a secret or the password parameter.
            cmdlines = _all_cmdlines()
            probes = [pid for pid, cmd in cmdlines.items() if str(script).encode() in cmd
                      and b"--params" in cmd]
            assert probes, "the backend's process was not found"
            for pid, cmd in cmdlines.items():
                for value in (db_value, api_value, plain_password):
                    assert value.encode() not in cmd, f"pid {pid}'s argv holds a secret"
            environ = Path(f"/proc/{probes[0]}/environ").read_bytes().split(b"\0")
            assert f"DB_PASSWORD={db_value}".encode() in environ  # where it belongs
            assert f"API_TOKEN={api_value}".encode() in environ
            gate.touch()
            _, err = deploy.communicate(timeout=60)
        assert deploy.returncode == 0, err.decode()

        seen = json.loads(out.read_text())
        assert seen["DB_PASSWORD"] == hashlib.sha256(db_value.encode()).hexdigest()
        assert seen["API_TOKEN"] == hashlib.sha256(api_value.encode()).hexdigest()
        assert seen["stdin_password"] == plain_password  # on stdin, not in argv
        assert not seen["argv_has_password"] and seen["argv_site"] == "example"
        assert not seen["worker_env_source_visible"] and not seen["swarm_token_visible"]

        stream = ndjson(subprocess.CompletedProcess([], 0, events_file.read_text(), ""))
        summary = stream[-1]["summary"]
        output = next(t for t in summary["tasks"] if t["symbol"] == "use_db")["result"]
        assert output == {"echo": "[secret DB_PASSWORD]", "api_key": REDACTED}
        run_id = summary["run_id"]
        report = cl.cli("report", run_id, str(cl.config_path), "--url", cl.url, "--json")
        assert report.returncode == 0, report.stderr

        db_files = [cl.db, Path(f"{cl.db}-wal"), Path(f"{cl.db}-shm")]
        assert all(p.exists() for p in db_files)
        for p in db_files:
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        places = {str(p): p.read_bytes() for p in db_files}
        places["dispatcher log"] = cl.log("dispatcher").encode()
        places["worker log"] = cl.log("w1").encode()
        places["--json event stream"] = events_file.read_bytes()
        places["swarm report --json"] = report.stdout.encode()
        # The places searched do hold this run and this worker's story.
        assert b"secret-demo" in places[str(cl.db)] + places[f"{cl.db}-wal"]
        assert b"worker w1: connected" in places["worker log"]
        assert b"use_db" in places["--json event stream"] + places["swarm report --json"]
        for where, data in places.items():
            for value in (db_value, api_value):
                assert value.encode() not in data, f"a secret is in the {where}"
        for where in ("--json event stream", "swarm report --json"):
            assert plain_password.encode() not in places[where], where

        # An existing DB that others may read: used, with a warning.
        assert cl.stop("dispatcher") == 0
        cl.db.chmod(0o644)
        cl.start_dispatcher()
        wait_for(lambda: "accessible to other users" in cl.log("dispatcher"),
                 what="the warning about the DB's mode")
        assert stat.S_IMODE(cl.db.stat().st_mode) == 0o644  # the operator's file, untouched
    finally:
        cl.close()


@pytest.mark.e2e
def test_a_secret_the_worker_lacks_fails_its_symbol_not_the_worker(tmp_path: Path) -> None:
    unreadable = tmp_path / "no-such-dir" / "secret"
    manifest = write_manifest(tmp_path, """
        name: missing-secrets
        version: "1"
        on_failure: continue
        symbols:
          - {name: unknown_name, type: action, parameters: {handler: noop}, retries: 3,
             secrets: {DB_PASSWORD: never_configured}}
          - {name: unreadable_file, type: action, parameters: {handler: noop}, retries: 3,
             secrets: {DB_PASSWORD: from_file}}
          - {name: unset_env, type: action, parameters: {handler: noop}, retries: 3,
             secrets: {API_TOKEN: from_env}}
          - {name: fine, type: action, parameters: {handler: noop}}
        """)
    cl = Cluster(tmp_path)
    worker_cfg = cl.write_config("worker.toml", f"""
[secrets]
from_file = "file:{unreadable}"
from_env = "env:E2E_SURELY_UNSET_VARIABLE"
""")
    try:
        cl.start_dispatcher()
        worker = cl.start_worker("w1", worker_cfg)
        cp = cl.deploy(manifest)
        assert cp.returncode == 1, cp.stderr
        tasks = cl.tasks()
        assert tasks["fine"]["state"] == "completed"
        expected = {
            "unknown_name": "secret 'never_configured' (for DB_PASSWORD) is not defined in "
                            "this worker's [secrets]",
            "unreadable_file": f"secret 'from_file' (for DB_PASSWORD): cannot read "
                               f"{unreadable}: No such file or directory",
            "unset_env": "secret 'from_env' (for API_TOKEN): environment variable "
                         "E2E_SURELY_UNSET_VARIABLE is not set on this worker",
        }
        for name, error in expected.items():
            assert tasks[name]["state"] == "failed", name
            assert tasks[name]["attempts"] == 1, f"{name}: retried a failure that cannot heal"
            assert tasks[name]["error"] == error
        assert worker.poll() is None  # the worker lives on
        assert cl.node_connected("w1")
    finally:
        cl.close()


async def test_an_internal_handler_reads_its_secrets_from_inv_env(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    monkeypatch.setenv("E2E_INTERNAL_SECRET", "internal-" + "x" * 12)

    @swarm.handler("secret-reader")
    async def reader(params: dict[str, Any], inv: Invocation) -> dict[str, Any]:
        value = inv.env.get("SERVICE_TOKEN", "")
        return {"sha": hashlib.sha256(value.encode()).hexdigest(),
                "in_os_environ": "SERVICE_TOKEN" in os.environ, "echo": value}

    cfg = parse_config('[secrets]\nsvc = "env:E2E_INTERNAL_SECRET"\n'
                       '[retry]\ninitial_delay = 50\njitter = 0.0\n')
    wf = swarm.Workflow(name="internal-secret", version="1", symbols=(
        swarm.Symbol(name="read", type="query", parameters={"handler": "secret-reader"},
                     secrets={"SERVICE_TOKEN": "svc"}),))
    async with swarm.LocalSwarm(cfg, workers=1, processes=False,
                                db_path=str(tmp_path / "s.db")) as ls:
        result = await (await ls.client.deploy(wf)).wait()
    assert result.ok
    output = result.symbol("read").output
    assert output == {"sha": hashlib.sha256(b"internal-xxxxxxxxxxxx").hexdigest(),
                      "in_os_environ": False, "echo": "[secret SERVICE_TOKEN]"}


# --- the parts, without processes -------------------------------------------------------


@pytest.mark.parametrize(("name", "secret"), [
    ("password", True), ("db_password", True), ("dbPassword", True), ("API_TOKEN", True),
    ("api_key", True), ("apiKey", True), ("private_key", True), ("key", True),
    ("client_secret", True), ("pwd", True), ("credentials", True),
    ("meta_key", False), ("cache_key", False), ("keyword", False), ("monkey", False),
    ("site", False), ("operation", False),
])
def test_names_that_look_secret(name: str, secret: bool) -> None:
    assert looks_secret(name) is secret


def test_argv_leaves_out_secret_looking_parameters_but_stdin_has_them() -> None:
    inv = Invocation(run_id="r", task_id="r/s", symbol="s", type="action", context="generic",
                     dispatch="rust_injector", attempt=1, timeout_ms=1000,
                     parameters={"site": "x", "db_password": "p", "meta_key": "k"},
                     env={"DB_PASSWORD": "value"})
    argv = build_argv("rust_injector", "/bin/inj", "", inv)
    assert json.loads(argv[argv.index("--params") + 1]) == {"site": "x", "meta_key": "k"}
    assert inv.document()["parameters"]["db_password"] == "p"
    assert "value" not in json.dumps(inv.document()) and "value" not in repr(inv)
    assert inv.environment()["DB_PASSWORD"] == "value"
    assert argv_parameters({"a": 1}) == {"a": 1}


def test_resolve_reads_files_and_variables_and_names_what_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text("hunter22\n")
    monkeypatch.setenv("E2E_TOK", "tok-value")
    table = {"db": "file:pw", "tok": "env:E2E_TOK", "empty": "env:E2E_EMPTY"}
    assert resolve({"DB_PASSWORD": "db", "TOKEN": "tok"}, table, str(tmp_path)) == {
        "DB_PASSWORD": "hunter22", "TOKEN": "tok-value"}
    monkeypatch.setenv("E2E_EMPTY", "")
    with pytest.raises(SecretError, match=r"secret 'empty' \(for X\): the value is empty"):
        resolve({"X": "empty"}, table, str(tmp_path))
    with pytest.raises(SecretError, match="is reserved"):
        resolve({"LD_PRELOAD": "db"}, table, str(tmp_path))  # a frame not from our manifest
    assert inherited_environment(table).get("E2E_TOK") is None


def test_scrub_and_redact_hide_values() -> None:
    env = {"DB_PASSWORD": "hunter22"}
    assert scrub({"a": ["x hunter22 y"], "hunter22": 1}, env) == {
        "a": ["x [secret DB_PASSWORD] y"], "[secret DB_PASSWORD]": 1}
    data = {"rows": [{"name": "a", "token": "t1"}], "count": 1}
    assert redact(data) == {"rows": [{"name": "a", "token": REDACTED}], "count": 1}
    assert redact({"count": 1}) == {"count": 1}
    line = 'calling with {"password": "p4ss", "site": "x"} api_key=abc123 meta_key=m'
    assert redact_text(line) == (f'calling with {{"password": "{REDACTED}", "site": "x"}} '
                                 f"api_key={REDACTED} meta_key=m")


def test_log_lines_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    from swarm.logs import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    for fmt in ("text", "json"):
        setup_logging("info", fmt=fmt)
        try:
            logging.getLogger("swarm.test").info("connecting with password=%s", "opensesame")
        finally:
            for h in root.handlers:
                h.close()
            root.handlers[:], root.level = saved
        err = capsys.readouterr().err
        assert f"password={REDACTED}" in err and "opensesame" not in err, fmt


def test_manifest_secrets_must_map_env_names_to_references() -> None:
    text = textwrap.dedent("""
        name: m
        version: "1"
        symbols:
          - name: a
            type: action
            secrets: {DB_PASSWORD: prod.db, PATH: x, 1BAD: y, LIST: [1], SPACE: "a b"}
            rollback: {secrets: {SWARM_RUN_ID: z}}
          - name: b
            type: action
            secrets: [DB_PASSWORD]
        """)
    with pytest.raises(ManifestError) as e:
        parse_manifest(text, "wf.yaml", "yaml")
    got = [(p.symbol, p.field, p.line, p.message.split(":")[0]) for p in e.value.problems]
    assert got == [
        ("a", "secrets", 7, "'PATH' is reserved"),
        ("a", "secrets", 7, "'1BAD' is not an environment variable name (letters, digits and "
                            "'_', not starting with a digit)"),
        ("a", "secrets", 7, "'LIST' must name a secret of the worker's [secrets] (letters, "
                            "digits, '_', '.' and '-'), got a list"),
        ("a", "secrets", 7, "'SPACE' must name a secret of the worker's [secrets] (letters, "
                            "digits, '_', '.' and '-'), got 'a b'"),
        ("a", "rollback.secrets", 8, "'SWARM_RUN_ID' is reserved"),
        ("b", "secrets", 11, "expected a mapping, got a list"),
    ]
    ok = parse_manifest(textwrap.dedent("""
        name: m
        version: "1"
        symbols:
          - name: a
            type: action
            secrets: {DB_PASSWORD: prod.db}
            rollback: {secrets: {TOKEN: z}}
        """), "wf.yaml", "yaml")
    assert ok.symbols[0].secrets == {"DB_PASSWORD": "prod.db"}
    assert ok.symbols[0].rollback is not None and ok.symbols[0].rollback.secrets == {
        "TOKEN": "z"}
    assert "secrets" in ok.to_dict()["symbols"][0]


def test_config_secrets_are_file_or_env_references() -> None:
    cfg = parse_config('[secrets]\ndb = "file:/etc/swarm/db"\napi = "env:API"\n')
    assert cfg.secrets == {"db": "file:/etc/swarm/db", "api": "env:API"}
    for bad, message in (('db = "hunter2"', 'must be "file:PATH" or "env:NAME"'),
                         ('db = "env:"', "needs a variable name"),
                         ('db = "env:A B"', "is not an environment variable name"),
                         ("db = 3", "secrets.db: must be a string")):
        with pytest.raises(ConfigError, match=message):
            parse_config(f"[secrets]\n{bad}\n")


async def test_a_new_state_db_is_private_whatever_the_umask(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state.db"
    old = os.umask(0)
    try:
        store = await Store.open(path)
    finally:
        os.umask(old)
    try:
        for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    finally:
        await store.close()
    path.chmod(0o640)
    with caplog.at_level(logging.WARNING, logger="swarm.state"):
        store = await Store.open(path)
        await store.close()
    assert any("accessible to other users" in r.getMessage() and "0640" in r.getMessage()
               for r in caplog.records)
