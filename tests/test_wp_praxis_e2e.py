"""End to end through the wp_praxis adapters: a real dispatcher and worker processes on
127.0.0.1, the backends being stand-ins that enforce the original programs' grammars."""

from __future__ import annotations

import json
import shutil

import pytest
from backend_support import find_php, python_script
from e2e_support import REPO, Cluster, result_json, write_manifest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

FIXTURES = REPO / "tests" / "fixtures" / "wp_praxis"
ENGINE = FIXTURES / "engine" / "php" / "symbolic-engine.php"


def q(value: object) -> str:
    return json.dumps(str(value))


def test_a_workflow_runs_through_all_three_wp_praxis_adapters(cluster: Cluster) -> None:
    root = cluster.root / "wordpress"
    shutil.copytree(FIXTURES / "wordpress", root)
    wp_log = cluster.root / "fake-wp-hooks.log"  # not wp.log: the worker logs there
    cluster.start_dispatcher()
    config = cluster.write_config("wp.toml", f"""
[backends.rust_injector]
binary_path = {q(REPO / "tests" / "bin" / "fake-wp-injector")}
adapter = "wp_praxis"
wp_root = {q(root)}

[backends.php_engine]
php_binary = {q(find_php())}
script_path = {q(ENGINE)}
adapter = "wp_praxis"
wp_load = {q(root / "wp-load.php")}

[backends.powershell_engine]
pwsh_binary = {q(REPO / "tests" / "bin" / "fake-pwsh-wp-praxis")}
script_path = {q(FIXTURES / "SymbolicEngine" / "core" / "symbolic.ps1")}
adapter = "wp_praxis"
""")
    cluster.start_worker("wp", config, extra_env={"FAKE_WP_LOG": str(wp_log)})
    manifest = write_manifest(cluster.root, """\
        name: wp-praxis-adapters
        version: "1.0.0"
        symbols:
          - name: tagline
            type: state
            dispatch: rust_injector
            parameters: {option_name: blogdescription, option_value: Run by swarm}
          - name: init
            type: action
            context: wordpress
            dispatch: php_engine
            dependencies: [tagline]
          - name: clear_cache
            type: action
            dispatch: powershell_engine
            parameters: {script: Clear-Cache -All}
            dependencies: [init]
        """)
    cp = cluster.deploy(manifest)
    assert cp.returncode == 0, cp.stdout + cp.stderr + cluster.log("wp")
    tasks = cluster.tasks(result_json(cp)["run_id"])
    assert {s: t["state"] for s, t in tasks.items()} == dict.fromkeys(
        ("tagline", "init", "clear_cache"), "completed")
    assert json.loads(tasks["tagline"]["result"])["kind"] == "option"
    assert json.loads(tasks["init"]["result"])["status"] == "completed"
    assert json.loads(tasks["clear_cache"]["result"])["action"] == "clear_cache"
    assert json.loads((root / "wp-content" / "fake-db.json").read_text()) == {
        "blogdescription": "Run by swarm"}
    assert json.loads(wp_log.read_text()) == {"kind": "action", "hook": "wp_praxis_action_init"}


USAGE_ERROR = """\
import os, sys
if sys.argv[1:] == ["--version"]:
    print("tool 1.0"); sys.exit(0)
with open(os.environ["TOOL_LOG"], "a") as f:
    f.write("called\\n")
sys.stderr.write("error: unexpected argument '--symbol' found\\n\\nUsage: tool <COMMAND>\\n")
sys.exit(2)
"""


def test_exit_2_is_tried_once_and_a_silent_library_is_not_advertised(
        cluster: Cluster) -> None:
    tool = python_script(cluster.root / "tool", USAGE_ERROR)
    tool_log = cluster.root / "tool.log"
    cluster.start_dispatcher()
    config = cluster.write_config("w.toml", f"""
[backends.rust_injector]
binary_path = {q(tool)}

[backends.php_engine]
php_binary = {q(find_php())}
script_path = {q(ENGINE)}

[backends.powershell_engine]
enabled = false
""")
    cluster.start_worker("w", config, extra_env={"TOOL_LOG": str(tool_log)})
    manifest = write_manifest(cluster.root, """\
        name: usage-error
        version: "1.0.0"
        symbols:
          - name: inject
            type: action
            dispatch: rust_injector
            retries: 3
        """)
    cp = cluster.deploy(manifest)
    assert cp.returncode == 1, cp.stdout + cp.stderr
    run_id = result_json(cp)["run_id"]
    task = cluster.tasks(run_id)["inject"]
    assert task["state"] == "failed" and task["attempts"] == 1
    assert "unexpected argument '--symbol'" in task["error"]
    assert "not retried" in task["error"]
    assert tool_log.read_text() == "called\n"
    assert len(cluster.query("SELECT * FROM attempts WHERE run_id = ?", (run_id,))) == 1
    assert "backend php_engine: not advertised" in cluster.log("w")
    assert "printed nothing" in cluster.log("w")
