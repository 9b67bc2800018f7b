"""Workers on their own "hosts": network namespaces the test makes itself, each joined to
the dispatcher's bridge by a veth pair on a private subnet that exists only inside this
test. Cutting one worker's link is a real network partition, not a closed socket."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import Cluster, free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=20)


class Hosts:
    """A bridge with an address for the dispatcher, and one namespace per worker host."""

    def __init__(self, tag: str, subnet: str) -> None:
        self.tag = tag
        self.subnet = subnet  # e.g. "10.213.57": addresses .1 (bridge), .11, .12 ...
        self.bridge = f"swbr{tag}"
        self.namespaces: list[str] = []
        self.host_links: list[str] = []

    @property
    def dispatcher_address(self) -> str:
        return f"{self.subnet}.1"

    def up(self, hosts: int) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.dispatcher_address}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i in range(1, hosts + 1):
            ns, host_end, ns_end = f"swns{self.tag}{i}", f"swv{self.tag}{i}", f"swp{self.tag}{i}"
            ip("netns", "add", ns)
            self.namespaces.append(ns)
            ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            self.host_links.append(host_end)
            ip("link", "set", ns_end, "netns", ns)
            ip("link", "set", host_end, "master", self.bridge)
            ip("link", "set", host_end, "up")
            ip("-n", ns, "addr", "add", f"{self.subnet}.{10 + i}/24", "dev", ns_end)
            ip("-n", ns, "link", "set", ns_end, "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def exec_prefix(self, i: int) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.namespaces[i - 1])

    def link(self, i: int, state: str) -> None:
        ip("link", "set", self.host_links[i - 1], state)

    def down(self) -> None:
        for ns in self.namespaces:  # deleting a namespace deletes its veth pair too
            ip("netns", "del", ns, check=False)
        for link in self.host_links:
            ip("link", "del", link, check=False)
        ip("link", "del", self.bridge, check=False)


def _can_make_namespaces() -> str | None:
    if shutil.which("ip") is None:
        return "iproute2 is not installed (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"swprobe{os.getpid() % 100000}"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"this machine does not allow network namespaces: {made.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    reason = _can_make_namespaces()
    if reason:
        pytest.skip(reason)
    tag = f"{os.getpid() % 1000}"
    h = Hosts(tag, f"10.213.{os.getpid() % 250 + 1}")
    try:
        h.up(2)
        yield h
    finally:
        h.down()


def test_a_partitioned_worker_is_declared_dead_and_its_late_result_dropped(
        hosts: Hosts, tmp_path: Path) -> None:
    token = "partition-test-token"
    cluster = Cluster(tmp_path, f'\n[security]\ntoken = "{token}"\n')
    cluster.config_path.write_text(cluster.config_path.read_text().replace(
        "heartbeat_timeout = 3000", "heartbeat_timeout = 1500"))
    try:
        cluster.start_dispatcher(port=free_port(), host=hosts.dispatcher_address)
        assert cluster.url.startswith(f"ws://{hosts.dispatcher_address}:")
        cluster.start_worker("host1", slots=1, prefix=hosts.exec_prefix(1))
        m = tmp_path / "wf.yaml"
        m.write_text('name: partition\nversion: "1"\nsymbols:\n'
                     "  - {name: work, type: action, parameters: {handler: delay, ms: 2500}}\n")
        run_id = cluster.detach(m)
        wait_for(lambda: cluster.tasks(run_id)["work"]["state"] == "running", what="work to run")
        first = cluster.tasks(run_id)["work"]["token"]
        cluster.start_worker("host2", slots=1, prefix=hosts.exec_prefix(2))
        cut = time.time()
        hosts.link(1, "down")
        lost = wait_for(lambda: cluster.query(
            "SELECT ts FROM events WHERE kind = 'node.lost' AND node = 'host1'"), timeout=30,
            what="the dispatcher to declare host1 dead")
        assert lost[0]["ts"] - cut < 1.5 + 1.0  # heartbeat_timeout, plus one check interval
        wait_for(lambda: cluster.tasks(run_id)["work"]["state"] == "completed", timeout=30,
                 what="host2 to finish the work")
        assert cluster.tasks(run_id)["work"]["node"] == "host2"
        hosts.link(1, "up")
        wait_for(lambda: cluster.query(
            "SELECT 1 FROM events WHERE kind = 'result.dropped' AND"
            " json_extract(data, '$.token') = ?", (first,)), timeout=90,
            what="host1 to reconnect and its stale result to be dropped")
        wait_for(lambda: cluster.query(  # a new session next to the lost one
            "SELECT 1 FROM nodes WHERE name = 'host1' AND status = 'connected'"), timeout=60,
            what="host1 to reconnect")
        done = cluster.query("SELECT data FROM events WHERE run_id = ? AND "
                             "kind = 'symbol.completed'", (run_id,))
        assert len(done) == 1 and json.loads(done[0]["data"])["output"] == {"slept_ms": 2500}
        outcomes = [r["outcome"] for r in cluster.query(
            "SELECT outcome FROM attempts WHERE run_id = ? ORDER BY id", (run_id,))]
        assert outcomes == ["lost", "ok"]
    finally:
        cluster.close()
