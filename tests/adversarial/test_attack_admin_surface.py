"""Attack: reach the coordinator's admin surface from the hospitals' network.

Flower 1.42 serves the Fleet API (hospitals), the Control API (run submission, node
registration: unauthenticated in its open-source build) and the Runtime/ServerAppIo API on one
port. The attacker holds everything a hospital or a network peer has (``ca.pem``, the address)
and tries to submit a run or register a node key through the hospital-facing address. Then, as
a local insider who registered a key behind the coordinator's back on the loopback admin port,
tries to stay hidden: ``status`` must show the node and ``register`` must remove it.

Real processes: ``medfed coordinator start`` on 0.0.0.0 (the gate and Flower's SuperLink app),
``flwr`` CLI, psutil on the real SuperLink process.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import psutil
import pytest
from helpers import wait_for

from privacy.pki import make_node_key, node_public_openssh
from server.daemon import GATE_MODULE, flwr_cli_home
from server.superlink_gate import READY_LINE
from simulations.bench.deploy import LoopbackConsortium

pytestmark = pytest.mark.slow

ADMIN_PATHS = ("/v1/control/register-node", "/v1/control/start-run", "/v1/control/list-nodes",
               "/v1/runtime/get-nodes", "/docs", "/openapi.json")


def _medfed(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medfed_cli.main", *args],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, COLUMNS="250"))


@pytest.fixture
def coordinator(tmp_path):
    from faults.harness import tiny_study

    lc = LoopbackConsortium(tmp_path, tiny_study(), host="0.0.0.0")
    proc = lc.start_coordinator()
    wait_for(lambda: READY_LINE in lc.log("coordinator").read_text(errors="replace")
             or proc.poll() is not None, "the coordinator's SuperLink serving",
             log=lc.log("coordinator"))
    assert proc.poll() is None, lc.log("coordinator").read_text()[-3000:]
    yield lc, proc
    lc.stop_all()


def test_only_the_fleet_api_faces_hospitals(coordinator, tmp_path):
    lc, proc = coordinator
    gate = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                if GATE_MODULE in p.cmdline())
    listening = {(c.laddr.ip, c.laddr.port) for c in gate.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN}
    # One socket faces the network (the Fleet API); every other one is on loopback.
    assert ("0.0.0.0", lc.port) in listening
    assert ("127.0.0.1", lc.admin_port) in listening
    assert all(ip == "127.0.0.1" for ip, port in listening if port != lc.port), listening

    # Through the hospital-facing port, with the consortium's CA, no admin path answers.
    context = ssl.create_default_context(cafile=str(lc.folder / "ca" / "ca.pem"))
    for path in ADMIN_PATHS:
        request = urllib.request.Request(f"https://localhost:{lc.port}{path}", data=b"{}",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, context=context, timeout=30)
        assert refused.value.code == 404, path

    # The flwr CLI pointed at the public port (what a stranger would run) registers nothing.
    key = tmp_path / "stranger.pub"
    key.write_bytes(node_public_openssh(make_node_key().public_key(), "stranger"))
    home = tmp_path / "stranger-flwr"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "c"\n[superlink.c]\naddress = "127.0.0.1:{lc.port}"\n'
        f'root-certificates = "{lc.folder / "ca" / "ca.pem"}"\n')
    flwr = os.path.join(os.path.dirname(sys.executable), "flwr")
    done = subprocess.run([flwr, "supernode", "register", str(key), "c"],
                          env=dict(os.environ, FLWR_HOME=str(home)), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0 and "registered" not in done.stdout.replace("unregistered", "")

    # A key registered behind the coordinator's back (a local insider on the admin port):
    # status shows it, register removes it.
    env = dict(os.environ, FLWR_HOME=str(flwr_cli_home(lc.folder)))
    done = subprocess.run([flwr, "supernode", "register", str(key), "consortium"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    status = _medfed("coordinator", "status", str(lc.folder))
    assert status.returncode == 0 and "(not enrolled)" in status.stdout, status.stdout
    register = _medfed("coordinator", "register", str(lc.folder))
    assert register.returncode == 0 and "unregistered unknown node" in register.stdout
    status = _medfed("coordinator", "status", str(lc.folder))
    assert "(not enrolled)" not in status.stdout
    assert _medfed("coordinator", "register", str(lc.folder)).stdout.strip() == \
        "the SuperLink's registry matches the enrolment list"
