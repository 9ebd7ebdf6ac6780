"""An attacker tries to take an enrolled hospital's node over, on real processes on loopback.

The coordinator's SuperLink takes a node back at once when its SuperNode restarts
(``core.flower_compat.recover_restarted_nodes``): activating a node it still counts online
pushes the previous process off. Only the holder of the node's private key may do that. Here
the attacker holds everything the coordinator sees - the node's public key and id, the CA
certificate, the run's messages and metadata, and the signed headers of a request the
hospital sent - and a key of its own: a fresh one, or a fellow hospital's enrolled one. While
a real study runs (TLS, node authentication, two hospitals, every round needs both), it tries:

- a SuperNode with a freshly made key (``flower-supernode``, the real binary);
- activating with the victim's public key and a signature its own key made;
- activating, pulling the victim's messages and deactivating its node, signed by a fellow
  hospital's enrolled key;
- replaying the victim's own signed headers (valid for 300 s in Flower) to activate as it and
  to pull its messages.

Asserted: every attempt is refused (the SuperNode exits, each request answers 401), nothing
is handed to the attacker, the node is never taken over or activated again, and the victim's
reply is in the aggregate of every round, those after the attack included.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from base64 import b64encode
from pathlib import Path

import httpx
import pandas as pd
import pytest
import tomli_w
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from faults.harness import consortium, tiny_study
from flwr.common.constant import TIMESTAMP_HEADER
from flwr.proto.fleet_pb2 import (  # pylint: disable=E0611
    ActivateNodeRequest,
    DeactivateNodeRequest,
    PullMessagesRequest,
)
from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest  # pylint: disable=E0611
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
from flwr.supercore.date import now
from flwr.supercore.interceptors.http.utils import add_headers
from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message
from flwr.supernode.fleet_http_client import FleetHttpClient
from helpers import wait_for

from client.audit import read_audit_log
from client.daemon import supernode_command
from client.site_folder import CONFIG_FILE as HOSPITAL_CONFIG
from client.site_folder import init_site_folder, load_hospital_config
from server.consortium import load_enrolments
from simulations.bench.deploy import LoopbackConsortium
from simulations.processes import free_port

pytestmark = pytest.mark.slow

ROUNDS = 3


class Signer:
    """Flower's node-authentication headers: ``public_key`` claimed, the timestamp signed by
    ``signing_key`` (the two differ in a forgery); every request's headers are kept."""

    def __init__(self, public_key: ec.EllipticCurvePublicKey,
                 signing_key: ec.EllipticCurvePrivateKey) -> None:
        self.public = b64encode(public_key_to_bytes(public_key)).decode("ascii")
        self.signing_key = signing_key
        self.sent: list[dict[str, str]] = []

    def intercept(self, context, call_next):  # noqa: ANN001, ANN201 (Flower's protocol)
        timestamp = now().isoformat()
        signature = sign_message(self.signing_key, timestamp.encode("ascii"))
        headers = {FLEET_HTTP_PUBLIC_KEY_HEADER: self.public, TIMESTAMP_HEADER: timestamp,
                   FLEET_HTTP_SIGNATURE_HEADER: b64encode(signature).decode("ascii")}
        self.sent.append(headers)
        add_headers(context.request, headers)
        return call_next(context)


class Replayer:
    """Sends the same recorded headers with every request (a replay)."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers

    def intercept(self, context, call_next):  # noqa: ANN001, ANN201
        add_headers(context.request, dict(self.headers))
        return call_next(context)


def _private_key(site: Path) -> ec.EllipticCurvePrivateKey:
    return serialization.load_ssh_private_key((site / "node.key").read_bytes(), password=None)


def _client(lc: LoopbackConsortium, interceptor) -> FleetHttpClient:  # noqa: ANN001
    return FleetHttpClient.from_server_address(
        f"localhost:{lc.port}", insecure=False,
        root_certificates=(lc.folder / "ca" / "ca.pem").read_bytes(), interceptors=[interceptor])


def _refused(call) -> bool:  # noqa: ANN001
    """True if ``call()`` is answered 401 (Flower's node authentication refusing it)."""
    try:
        call()
    except httpx.HTTPStatusError as exc:
        return exc.response.status_code == 401
    return False


def _trained(lc: LoopbackConsortium) -> dict[int, set[str]]:
    """Per round, the enrolled names of the hospitals whose reply is in the aggregate."""
    metrics = pd.read_csv(lc.run_dir / "metrics.csv", dtype={"hospital": str, "error": str})
    rows = metrics[(metrics.hospital != "global") & metrics.num_examples.notna()
                   & metrics.error.isna()]
    index = {e.node_id: e.name for e in load_enrolments(lc.folder)}
    return {int(r): {index.get(x, x) for x in h} for r, h in rows.groupby("round")["hospital"]}


def _replied(lc: LoopbackConsortium, k: int) -> set[int]:
    """Rounds of the training replies hospital ``k``'s audit log records."""
    path = lc.sites[k] / "egress-audit.jsonl"
    return {e["round"] for e in read_audit_log(path) if not e["error"]} if path.exists() \
        else set()


def test_an_attacker_without_the_private_key_cannot_take_a_node_over(tmp_path):
    with consortium(tmp_path / "c", tiny_study(hospitals=2, rounds=ROUNDS,
                                               min_hospitals=2)) as lc:
        _attack(lc, tmp_path)


def _attack(lc: LoopbackConsortium, tmp_path: Path) -> None:
    victim_site, fellow_site = lc.sites
    victim = _private_key(victim_site).public_key()
    victim_pk = public_key_to_bytes(victim)
    fellow = _private_key(fellow_site)
    for k in range(2):  # they retry until the coordinator serves
        lc.start_hospital(k)
    coordinator = lc.start_coordinator()
    # The victim is online and has trained round 1: its node is active, counted online.
    wait_for(lambda: 1 in _replied(lc, 0), "hospital-0's round-1 reply", alive=coordinator,
             log=lc.log("coordinator"))
    node_id = int(next(e.node_id for e in load_enrolments(lc.folder) if e.name == "hospital-0"))

    # 1. A SuperNode with a fresh key (the real binary): refused, it exits.
    stranger = tmp_path / "stranger"
    init_site_folder(stranger, "hospital-0", superlink=f"localhost:{lc.port}")
    (stranger / "ca.pem").write_bytes((lc.folder / "ca" / "ca.pem").read_bytes())
    hospital = load_hospital_config(stranger).__dict__ | {"runtime_port": free_port()}
    (stranger / HOSPITAL_CONFIG).write_text(tomli_w.dumps({"hospital": hospital}))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    with open(tmp_path / "stranger.log", "w") as out:
        proc = subprocess.Popen(supernode_command(stranger), stdout=out, env=env,
                                stderr=subprocess.STDOUT, start_new_session=True)
    assert proc.wait(timeout=300) != 0
    assert "Failed to activate SuperNode" in (tmp_path / "stranger.log").read_text()

    activate = ActivateNodeRequest(public_key=victim_pk, heartbeat_interval=30)
    as_victim = Node(node_id=node_id)
    # 2. The victim's public key, a signature by a fresh key of the attacker's.
    forged = _client(lc, Signer(victim, ec.generate_private_key(ec.SECP384R1())))
    assert _refused(lambda: forged.ActivateNode(activate))
    assert _refused(lambda: forged.PullMessages(PullMessagesRequest(node=as_victim)))
    # 3. A fellow hospital's enrolled key, valid signatures, the victim's key or node id.
    fellow_client = _client(lc, Signer(fellow.public_key(), fellow))
    assert _refused(lambda: fellow_client.ActivateNode(activate))
    assert _refused(lambda: fellow_client.PullMessages(PullMessagesRequest(node=as_victim)))
    assert _refused(lambda: fellow_client.DeactivateNode(DeactivateNodeRequest(node_id=node_id)))
    # 4. Replays of headers the victim's key signed (here for a heartbeat the coordinator saw).
    signer = Signer(victim, _private_key(victim_site))
    with _client(lc, signer) as own:
        assert own.SendNodeHeartbeat(SendNodeHeartbeatRequest(node=as_victim,
                                                              heartbeat_interval=30)).success
    replay = _client(lc, Replayer(signer.sent[-1]))
    assert _refused(lambda: replay.ActivateNode(activate))
    assert _refused(lambda: replay.PullMessages(PullMessagesRequest(node=as_victim)))
    for client in (forged, fellow_client, replay):
        client.close()

    code = coordinator.wait(timeout=1800)
    log = lc.log("coordinator").read_text(errors="replace")
    assert code == 0, log[-4000:]
    # Never taken over, never activated again: the victim's one SuperNode kept its node.
    assert "taken over" not in log
    assert len(re.findall(rf"Activated node_id={node_id}\b", log)) == 1, log[-4000:]
    # The victim trained every round, those after the attack included.
    trained = _trained(lc)
    assert all("hospital-0" in trained[r] for r in range(1, ROUNDS + 1)), trained
    assert _replied(lc, 0) >= set(range(1, ROUNDS + 1))
