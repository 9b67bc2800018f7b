"""Only our own get in: tokens, TLS (wss://) with a private CA, mutual TLS, connection
limits, and where a dispatcher may listen. Certificates are made by `openssl` here."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from e2e_support import REPO, Cluster, result_json, wait_for

from swarm.config import parse_config
from swarm.errors import ConfigError
from swarm.tls import check_listen, is_loopback

pytestmark = [pytest.mark.timeout(120)]


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private CA, a server certificate for 127.0.0.1 and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make test certificates")
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "2", "-subj", "/CN=swarm test CA", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"),
                      ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                f"{name}.csr", "-subj", f"/CN=swarm {name}", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
                f"{name}.ext", cwd=d)
    return d


def tls_cluster(root: Path, pki: Path, mutual: bool = False) -> Cluster:
    return Cluster(root, f"""
[security]
token = "s3cret"
tls_cert = "{pki / 'server.pem'}"
tls_key = "{pki / 'server.key'}"
tls_ca = "{pki / 'ca.pem'}"
tls_client_cert = "{pki / 'client.pem'}"
tls_client_key = "{pki / 'client.key'}"
tls_require_client_cert = {'true' if mutual else 'false'}
""")


def test_a_workflow_runs_over_wss_and_clients_verify_the_server(tmp_path: Path,
                                                                pki: Path) -> None:
    cl = tls_cluster(tmp_path, pki)
    try:
        url = cl.start_dispatcher()
        assert url.startswith("wss://127.0.0.1:")
        cl.start_worker("w1")
        cp = cl.deploy(REPO / "examples" / "hello.yaml")
        assert cp.returncode == 0, cp.stderr
        assert result_json(cp)["status"] == "completed"
        # Without the private CA the server cannot be verified: refused, exit 3.
        bare = cl.write_config("bare.toml", '[security]\ntoken = "s3cret"\n')
        cp = cl.cli("status", str(bare), "--url", url)
        assert cp.returncode == 3 and "certificate verify failed" in cp.stderr
    finally:
        cl.close()


def test_mutual_tls_refuses_a_peer_without_a_client_certificate(tmp_path: Path,
                                                                pki: Path) -> None:
    cl = tls_cluster(tmp_path, pki, mutual=True)
    try:
        url = cl.start_dispatcher()
        cl.start_worker("w1")
        ok = cl.cli("status", str(cl.config_path), "--url", url, "--json")
        assert ok.returncode == 0 and json.loads(ok.stdout)["nodes"][0]["name"] == "w1"
        no_cert = cl.write_config("nocert.toml", f'[security]\ntoken = "s3cret"\n'
                                                 f'tls_ca = "{pki / "ca.pem"}"\n')
        cp = cl.cli("status", str(no_cert), "--url", url)
        assert cp.returncode == 3 and "Traceback" not in cp.stderr
    finally:
        cl.close()


def test_a_worker_with_a_wrong_token_is_refused_and_backs_off(tmp_path: Path) -> None:
    cl = Cluster(tmp_path, '\n[security]\ntoken = "right"\n')
    try:
        cl.start_dispatcher()
        cl.start_worker("intruder", wait=False, extra_env={"SWARM_TOKEN": "wrong"})
        line = wait_for(lambda: re.search(r"authentication failed; retrying in ([\d.]+) s",
                                          cl.log("intruder")), what="the refusal")
        assert float(line.group(1)) >= 0.75  # waits, rather than spinning
        assert "authentication failed" in cl.log("dispatcher")
        assert not cl.query("SELECT 1 FROM nodes")  # it never joined
    finally:
        cl.close()


def test_connections_beyond_the_limit_are_refused(tmp_path: Path) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    cl = Cluster(tmp_path, "\n[dispatcher]\nmax_connections = 2\n")
    try:
        cl.start_dispatcher()
        cl.start_worker("w1")
        with connect(cl.url) as held:
            held.recv(timeout=5)  # the challenge: this one is served
            with connect(cl.url) as extra:
                with pytest.raises(ConnectionClosed) as e:
                    extra.recv(timeout=5)
                assert e.value.rcvd is not None and e.value.rcvd.code == 1013
    finally:
        cl.close()


def test_listening_off_loopback_needs_a_token_or_insecure() -> None:
    bare = parse_config("")
    with pytest.raises(ConfigError, match="refusing to listen on 0.0.0.0 without a token"):
        check_listen("0.0.0.0", bare, insecure=False)
    check_listen("0.0.0.0", bare, insecure=True)  # allowed, with a warning
    check_listen("0.0.0.0", parse_config('[security]\ntoken = "t"\n'), insecure=False)
    for host in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"):
        assert is_loopback(host)
        check_listen(host, bare, insecure=False)
    assert not is_loopback("10.0.0.1") and not is_loopback("dispatcher.example")


def test_start_dispatcher_refuses_a_public_address_without_a_token(tmp_path: Path) -> None:
    cp = Cluster(tmp_path).cli("start-dispatcher", "--host", "0.0.0.0", "--port", "0",
                               "--db", str(tmp_path / "s.db"))
    assert cp.returncode == 2 and "refusing to listen on 0.0.0.0" in cp.stderr
    assert "--insecure" in cp.stderr and "Traceback" not in cp.stderr
