"""The wp_praxis adapters against stand-ins that enforce the real programs' grammars
(tests/bin/fake-wp-injector, tests/bin/fake-pwsh-wp-praxis, the engine class library and
fake WordPress under tests/fixtures/wp_praxis), and the rules against silent successes."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from backend_support import REPO, backends_config, find_php, python_script

from swarm.backends import Backends, Invocation
from swarm.backends.process import telling_line
from swarm.config import parse_config
from swarm.errors import ConfigError

pytestmark = pytest.mark.timeout(60)

FIXTURES = REPO / "tests" / "fixtures" / "wp_praxis"
FAKE_INJECTOR = REPO / "tests" / "bin" / "fake-wp-injector"
FAKE_PWSH_WP = REPO / "tests" / "bin" / "fake-pwsh-wp-praxis"
ENGINE = FIXTURES / "engine" / "php" / "symbolic-engine.php"
SYMBOLIC_PS1 = FIXTURES / "SymbolicEngine" / "core" / "symbolic.ps1"


def wordpress(tmp_path: Path) -> Path:
    """A private copy of the fake WordPress root (the injector writes under it)."""
    root = tmp_path / "wordpress"
    shutil.copytree(FIXTURES / "wordpress", root)
    return root


def inv(symbol: str = "s", type: str = "action", context: str = "wordpress",
        dispatch: str = "rust_injector", **params: Any) -> Invocation:
    return Invocation(run_id="r1", task_id="t1", symbol=symbol, type=type, context=context,
                      dispatch=dispatch, parameters=params, attempt=1, timeout_ms=20_000)


def configured(tmp_path: Path, **sections: dict[str, Any]) -> Backends:
    """Backends from a real config file: only the named [backends.*] are enabled."""
    lines = ["[worker.capabilities]"]
    lines += [f"{n} = {str(n in sections).lower()}"
              for n in ("rust_injector", "php_engine", "powershell_engine")]
    for name, keys in sections.items():
        lines.append(f"[backends.{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    path = tmp_path / "swarm-config.toml"
    path.write_text("\n".join(lines) + "\n")
    return Backends.from_config(parse_config(path.read_text(), str(path), str(tmp_path)))


def calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# --- rust_injector -------------------------------------------------------------------------

def rust(tmp_path: Path, **keys: Any) -> Backends:
    return configured(tmp_path, rust_injector={
        "binary_path": str(FAKE_INJECTOR), "adapter": "wp_praxis", **keys})


async def test_rust_adapter_injects_one_symbol_manifest_with_the_real_grammar(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = wordpress(tmp_path)
    log = tmp_path / "injector.log"
    monkeypatch.setenv("FAKE_WP_INJECTOR_LOG", str(log))
    b = rust(tmp_path, wp_root=str(root))
    assert (await b.check())["rust_injector"] is None
    assert b.versions["rust_injector"] == "wp_injector 0.1.0"
    out = await b.run(inv("tagline", type="state", option_name="blogdescription",
                          option_value="Run by swarm"))
    assert out.ok, out.error
    assert out.output["kind"] == "option" and out.output["injection_id"].startswith("inj_")
    assert json.loads((root / "wp-content" / "fake-db.json").read_text()) == {
        "blogdescription": "Run by swarm"}
    check_version, check_validate, injected = calls(log)
    assert check_version["argv"][1:] == ["--version"]
    assert check_validate["argv"][1:3] == ["validate", "--manifest"]
    argv = injected["argv"]
    assert argv[1:3] == ["inject", "--manifest"] and argv[4:] == ["--wp-root", str(root)]
    # Private while it lived, gone after the attempt.
    assert injected["file_mode"] == 0o600 and injected["dir_mode"] == 0o700
    assert not Path(argv[3]).exists() and not Path(argv[3]).parent.exists()
    assert "type: option" in injected["text"] and "name: tagline" in injected["text"]


async def test_rust_adapter_takes_wp_root_and_dry_run_from_the_symbol(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = wordpress(tmp_path)
    log = tmp_path / "injector.log"
    monkeypatch.setenv("FAKE_WP_INJECTOR_LOG", str(log))
    b = rust(tmp_path)  # no wp_root in the config
    await b.check()
    out = await b.run(inv("cpt", post_type="book", wp_root=str(root), dry_run=True))
    assert out.ok, out.error
    assert out.output["dry_run"] is True and out.output["kind"] == "post_type"
    assert calls(log)[-1]["argv"][-3:] == ["--wp-root", str(root), "--dry-run"]
    assert "wp_root" not in calls(log)[-1]["text"]  # adapter controls stay out of the manifest
    assert not (root / "wp-content" / "fake-db.json").exists()
    missing = await b.run(inv("cpt", post_type="book"))
    assert not missing.ok and not missing.retryable and "wp_root" in missing.error


async def test_rust_adapter_refuses_a_symbol_the_injector_would_silently_skip(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "injector.log"
    monkeypatch.setenv("FAKE_WP_INJECTOR_LOG", str(log))
    b = rust(tmp_path, wp_root=str(wordpress(tmp_path)))
    await b.check()
    before = len(calls(log))
    out = await b.run(inv("hello", type="action", message="hi"))
    assert not out.ok and not out.retryable
    assert "post_type, taxonomy, option_name or sql" in out.error
    assert len(calls(log)) == before  # nothing ran


async def test_rust_adapter_reports_the_injectors_error_line(tmp_path: Path) -> None:
    b = rust(tmp_path, wp_root=str(wordpress(tmp_path)))
    await b.check()
    out = await b.run(inv("tagline", option_name="blogdescription"))  # no option_value
    assert not out.ok and out.exit_code == 1 and out.retryable
    assert out.error == "exit code 1: Error: Injection failed: option_value parameter required"


async def test_rust_adapter_health_check_needs_validate_and_wp_config(tmp_path: Path) -> None:
    reasons = await rust(tmp_path, wp_root=str(tmp_path)).check()
    assert "has no wp-config.php" in str(reasons["rust_injector"])
    impostor = python_script(tmp_path / "impostor", "import sys\nprint('impostor 1.0')\n")
    reasons = await configured(tmp_path, rust_injector={
        "binary_path": str(impostor), "adapter": "wp_praxis"}).check()
    assert "not the WP Praxis injector" in str(reasons["rust_injector"])


async def test_original_injector_is_not_advertised_under_the_argv_contract(
        tmp_path: Path) -> None:
    reasons = await configured(tmp_path, rust_injector={
        "binary_path": str(FAKE_INJECTOR)}).check()
    assert 'set adapter = "wp_praxis"' in str(reasons["rust_injector"])


# --- php_engine ----------------------------------------------------------------------------

def php(tmp_path: Path, **keys: Any) -> Backends:
    return configured(tmp_path, php_engine={
        "php_binary": str(find_php()), "script_path": str(ENGINE), "adapter": "wp_praxis",
        "wp_load": str(FIXTURES / "wordpress" / "wp-load.php"), **keys})


async def test_php_adapter_runs_symbols_in_wordpress_through_the_engine(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wp_log = tmp_path / "wp.log"
    monkeypatch.setenv("FAKE_WP_LOG", str(wp_log))
    b = php(tmp_path)
    assert (await b.check())["php_engine"] is None
    assert b.versions["php_engine"] == "WP Praxis engine 0.1.0"
    out = await b.run(inv("init", dispatch="php_engine"))
    assert out.ok, out.error
    assert out.output["status"] == "completed" and out.output["dispatch"] == "wordpress"
    query = await b.run(inv("site_title", type="query", context="generic",
                            dispatch="php_engine", args=["my site"]))
    assert query.ok, query.error
    assert query.output["result"] == "MY SITE"
    assert (query.output["engine_type"], query.output["engine_context"]) == ("filter", "cli")
    assert query.output["printed"] == "a plugin that prints\n"
    assert calls(wp_log) == [{"kind": "action", "hook": "wp_praxis_action_init"},
                             {"kind": "filter", "hook": "wp_praxis_filter_site_title"}]


async def test_php_adapter_fails_on_failed_state_throwable_and_vocabulary(
        tmp_path: Path) -> None:
    b = php(tmp_path)
    await b.check()
    failed = await b.run(inv("break_site", dispatch="php_engine", why="database gone"))
    assert not failed.ok and failed.exit_code == 1 and failed.retryable
    assert "symbol failed in the engine: the site refused: database gone" in failed.error
    fatal = await b.run(inv("fatal", dispatch="php_engine"))
    assert not fatal.ok and "undefined_function_for_a_fatal_error" in fatal.error
    unknown = await b.run(inv("x", type="hook", dispatch="php_engine"))
    assert not unknown.ok and not unknown.retryable
    assert "no engine vocabulary for type hook" in unknown.error


async def test_php_adapter_health_check_refuses_what_is_not_the_engine(tmp_path: Path) -> None:
    reasons = await php(tmp_path, script_path=str(REPO / "examples/backends/php/engine.php")
                        ).check()
    assert "the WP Praxis engine does not load" in str(reasons["php_engine"])
    reasons = await php(tmp_path, wp_load="").check()
    assert "wp_load is empty" in str(reasons["php_engine"])


async def test_silent_php_library_is_refused_at_health_check(tmp_path: Path) -> None:
    reasons = await configured(tmp_path, php_engine={
        "php_binary": str(find_php()), "script_path": str(ENGINE)}).check()
    assert "printed nothing" in str(reasons["php_engine"])
    assert 'set adapter = "wp_praxis"' in str(reasons["php_engine"])


# --- powershell_engine ---------------------------------------------------------------------

def pwsh_wp(tmp_path: Path, **keys: Any) -> Backends:
    return configured(tmp_path, powershell_engine={
        "pwsh_binary": str(FAKE_PWSH_WP), "script_path": str(SYMBOLIC_PS1),
        "adapter": "wp_praxis", **keys})


async def test_powershell_adapter_with_standin_pwsh_executes_a_manifest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "pwsh.log"
    monkeypatch.setenv("FAKE_PWSH_LOG", str(log))
    b = pwsh_wp(tmp_path)
    assert (await b.check())["powershell_engine"] is None
    out = await b.run(inv("clear_cache", context="generic", dispatch="powershell_engine",
                          script="Clear-Cache -All", verbose=True))
    assert out.ok, out.error
    assert out.output["action"] == "clear_cache"
    argv = calls(log)[-1]["argv"]
    assert argv[1:5] == ["-NoProfile", "-NonInteractive", "-File", str(SYMBOLIC_PS1)]
    assert argv[5] == "-ManifestPath" and argv[6].endswith(".toml")
    assert argv[7:] == ["-Operation", "Execute", "-Context", "cli"]
    assert not Path(argv[6]).exists()


async def test_powershell_adapter_with_standin_pwsh_fails_when_the_report_says_so(
        tmp_path: Path) -> None:
    b = pwsh_wp(tmp_path)
    await b.check()
    out = await b.run(inv("deploy", dispatch="powershell_engine", script="throw 'no disk'"))
    assert not out.ok and out.exit_code == 0  # symbolic.ps1 itself exits 0
    assert out.error == "symbolic.ps1 reported a failure: [FAILED] deploy - no disk"
    wrong = await b.run(inv("deploy", dispatch="powershell_engine", executor="cobol"))
    assert not wrong.ok and "Unknown executor type: cobol" in wrong.error
    nested = await b.run(inv("deploy", dispatch="powershell_engine", opts={"a": 1}))
    assert not nested.ok and not nested.retryable and "flat values" in nested.error


async def test_symbolic_ps1_is_refused_under_the_argv_contract_with_standin_pwsh(
        tmp_path: Path) -> None:
    reasons = await configured(tmp_path, powershell_engine={
        "pwsh_binary": str(FAKE_PWSH_WP), "script_path": str(SYMBOLIC_PS1)}).check()
    assert "no -SymbolName parameter" in str(reasons["powershell_engine"])
    reasons = await pwsh_wp(tmp_path, script_path=str(REPO / "examples/backends/powershell/"
                                                       "engine.ps1")).check()
    assert "not the WP Praxis symbolic.ps1" in str(reasons["powershell_engine"])


# --- no silent successes, fail fast --------------------------------------------------------

USAGE_ERROR = """\
import json, sys
if sys.argv[1:] == ["--version"]:
    print("tool 1.0"); sys.exit(0)
sys.stderr.write("error: unexpected argument '--symbol' found\\n\\nUsage: tool <COMMAND>\\n"
                 "\\nFor more information, try '--help'.\\n")
sys.exit(json.loads(sys.argv[-1]).get("code", 2))
"""


async def test_exit_2_is_not_retried_and_names_the_error_line(tmp_path: Path) -> None:
    tool = python_script(tmp_path / "tool", USAGE_ERROR)
    b = Backends.from_config(backends_config(rust=tool))
    await b.check()
    out = await b.run(inv())
    assert not out.ok and out.exit_code == 2 and not out.retryable
    assert out.error == ("exit code 2: error: unexpected argument '--symbol' found "
                         "(exit code 2 is a usage error: not retried)")


async def test_fail_fast_exit_codes_come_from_the_backends_config(tmp_path: Path) -> None:
    tool = python_script(tmp_path / "tool", USAGE_ERROR)
    b = configured(tmp_path, rust_injector={"binary_path": str(tool),
                                            "fail_fast_exit_codes": [64]})
    await b.check()
    assert (await b.run(inv())).retryable  # 2 is no longer listed
    refused = await b.run(inv(code=64))
    assert refused.exit_code == 64 and not refused.retryable


async def test_require_output_makes_an_empty_exit_0_a_failure(tmp_path: Path) -> None:
    quiet = python_script(tmp_path / "quiet", "import sys\n"
                          "print('quiet 1.0') if '--version' in sys.argv else None\n")
    lax = configured(tmp_path, rust_injector={"binary_path": str(quiet)})
    await lax.check()
    assert (await lax.run(inv())).ok
    strict = configured(tmp_path, rust_injector={"binary_path": str(quiet),
                                                 "require_output": True})
    await strict.check()
    out = await strict.run(inv())
    assert not out.ok and not out.retryable and out.error == "backend produced no result"


def test_the_telling_stderr_line_is_the_first_error_line_else_the_last() -> None:
    assert telling_line("[INFO] start\nerror: bad flag\nUsage: x\nmore help\n") == \
        "error: bad flag"
    assert telling_line("Error: Injection failed\n") == "Error: Injection failed"
    assert telling_line("one\ntwo\n\n") == "two"
    assert telling_line("") == ""


def test_adapter_keys_are_checked_with_file_and_key_named() -> None:
    with pytest.raises(ConfigError, match=r"w\.toml:2: backends\.php_engine\.adapter: must be"):
        parse_config('[backends.php_engine]\nadapter = "wp-praxis"\n', "w.toml")
    with pytest.raises(ConfigError,
                       match=r"w\.toml:2: backends\.powershell_engine\.fail_fast_exit_codes"):
        parse_config("[backends.powershell_engine]\nfail_fast_exit_codes = [0]\n", "w.toml")
    with pytest.raises(ConfigError, match=r"backends\.rust_injector\.wp_load: unknown key in "
                                          r"\[backends\.rust_injector\]"):
        parse_config('[backends.rust_injector]\nwp_load = "x"\n', "w.toml")
    cfg = parse_config("")
    assert dataclasses.astuple(cfg.backends.rust_injector)[3:] == ("swarm", "", False, False, [2])


def test_example_configs_show_the_adapters_and_load() -> None:
    from swarm.config import load_config

    cfg = load_config(REPO / "examples" / "wp-praxis-config.toml")
    b = cfg.backends
    assert (b.rust_injector.adapter, b.php_engine.adapter, b.powershell_engine.adapter) == (
        "wp_praxis", "wp_praxis", "wp_praxis")
    assert b.php_engine.wp_load.endswith("wp-load.php") and b.rust_injector.wp_root
    shipped = (REPO / "swarm" / "data" / "swarm-config.toml").read_text()
    assert (REPO / "configs" / "swarm-config.toml").read_text() == shipped
    assert shipped.count('adapter = "swarm"') == 3
