"""An attacker with everything the coordinator holds (or a network attacker) against roster
freshness and against a stolen node key.

The attacker holds every roster the CA ever signed (they travel in the clear with ``ca.pem``),
the enrolment list, the hospitals' public keys and node ids, and - for the stolen-key attacks -
a copy of one hospital's ``node.key``; not the CA's private key. It tries to:

- hand a hospital an older roster that still lists a revoked (stolen) key, after the hospital
  has seen the newer one;
- hand a hospital an expired roster (one the hospital never saw superseded);
- raise an old roster's serial (or push its expiry) by editing it;
- authenticate with a key the hospital rotated away;
- run a second live SuperNode on a hospital's node with the copied key.

Each attack is mounted on the real functions the hospital and the coordinator's SuperLink run
(``privacy.secagg.identity.identity_from_node_config`` from a real site folder, Flower's own
``LinkState`` and activation handler), and each test also shows that the attacker's material
is otherwise valid (the old roster verifies against the CA, the second session's heartbeats
are acknowledged without the watch), so the defence is what stops it.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from client.site_folder import init_site_folder, load_hospital_config, node_config, rotate_node_key
from core import flower_compat
from privacy.pki import load_ca
from privacy.secagg.config import SecAggError
from privacy.secagg.identity import (
    ROSTER_FILE,
    SetupKeys,
    identity_from_node_config,
    parse_roster,
    roster_text,
    sign_setup,
    verify_setup,
)
from server.consortium import (
    active_keys,
    enrol,
    init_consortium,
    load_enrolments,
    replace_key,
    revoke,
)
from server.superlink_gate import refuse_stolen_key, sync_registry_state

HOSPITALS = ("north", "south", "east", "stolen")


@pytest.fixture
def consortium(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """A consortium (CA key in the folder) with four enrolled hospitals, each site folder
    holding ``ca.pem`` and the current roster."""
    folder = tmp_path / "consortium"
    init_consortium(folder, "lungnet")
    sites = {}
    for name in HOSPITALS:
        sites[name] = tmp_path / name
        init_site_folder(sites[name], name)
        enrol(folder, name, sites[name] / "node.pub")
    for site in sites.values():
        deliver(folder, site)
    return folder, sites


def deliver(folder: Path, site: Path, roster: Path | None = None) -> None:
    """Copy ``ca.pem`` and a roster (default: the consortium's current one) to a site."""
    shutil.copy(folder / "ca" / "ca.pem", site / "ca.pem")
    shutil.copy(roster or folder / ROSTER_FILE, site / ROSTER_FILE)


def identity(site: Path):  # noqa: ANN201 (SecAggIdentity)
    """The hospital's secure-aggregation identity, read as its ClientApp reads it."""
    config = node_config(site, load_hospital_config(site))
    return identity_from_node_config(Context(run_id=1, node_id=1, node_config=config,
                                             state=RecordDict(), run_config={}))


def test_an_older_roster_still_listing_a_revoked_key_is_refused(consortium, tmp_path):
    folder, sites = consortium
    old = tmp_path / "old-roster.toml"  # the attacker keeps a copy of every roster it sees
    shutil.copy(folder / ROSTER_FILE, old)
    assert "stolen" in identity(sites["north"]).roster.keys
    revoke(folder, "stolen")  # its key was stolen: the CA key is here, serial + 1
    deliver(folder, sites["north"])
    fresh = identity(sites["north"])
    assert "stolen" not in fresh.roster.keys

    deliver(folder, sites["north"], roster=old)  # the replay
    with pytest.raises(SecAggError, match=r"serial 4 is older than serial 5"):
        identity(sites["north"])
    # The replayed roster is genuine (the CA signed it) and counts the stolen key's signature:
    # only the hospital's memory of serial 5 refuses it.
    replayed = parse_roster(old.read_text(), (folder / "ca" / "ca.pem").read_bytes())
    keys = SetupKeys(1, 1, 7, b"c" * 32, b"s" * 32, 0.0)
    stolen = _private_key(sites["stolen"])
    assert verify_setup(replayed, "stolen", keys, sign_setup(stolen, keys))
    assert not verify_setup(fresh.roster, "stolen", keys, sign_setup(stolen, keys))


def test_an_expired_roster_is_refused_by_a_hospital_that_never_saw_a_newer_one(consortium):
    folder, sites = consortium
    config_ca = load_ca(folder / "ca" / "ca.pem", folder / "ca" / "ca.key")
    signed_at = dt.datetime.now(dt.UTC) - dt.timedelta(days=31)
    expired = roster_text(config_ca.key, "lungnet", active_keys(folder), serial=9,
                          valid_days=30, now=signed_at)
    site = sites["east"]
    (site / "roster-accepted.toml").unlink(missing_ok=True)  # never saw any roster
    (site / ROSTER_FILE).write_text(expired)
    with pytest.raises(SecAggError, match=r"serial 9 expired at"):
        identity(site)
    # Genuine all the same: the CA's signature verifies; only the expiry refuses it.
    assert parse_roster(expired, (folder / "ca" / "ca.pem").read_bytes()).serial == 9


@pytest.mark.parametrize("edit", [
    ("serial = 4", "serial = 99"),
    ("expires_at = ", "expires_at = \"2999-01-01T00:00:00+00:00\"\n# was "),
])
def test_a_roster_with_a_forged_serial_or_expiry_is_refused(consortium, tmp_path, edit):
    folder, sites = consortium
    old = (folder / ROSTER_FILE).read_text()
    assert "serial = 4" in old
    revoke(folder, "stolen")
    deliver(folder, sites["south"])
    identity(sites["south"])  # accepts serial 5
    (sites["south"] / ROSTER_FILE).write_text(old.replace(*edit, 1))
    with pytest.raises(SecAggError, match="not signed by the consortium CA"):
        identity(sites["south"])


def test_a_key_rotated_away_cannot_authenticate_or_count_as_a_peer(consortium, tmp_path):
    from flwr.proto.fleet_pb2 import ActivateNodeRequest  # pylint: disable=E0611
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.superlink.servicer.fleet import fleet_handlers

    folder, sites = consortium
    state = _superlink_state(tmp_path)
    sync_registry_state(state, folder)
    site = sites["north"]
    old_key = _private_key(site)
    old_bytes = public_key_to_bytes(old_key.public_key())
    fleet_handlers.activate_node(ActivateNodeRequest(public_key=old_bytes,
                                                     heartbeat_interval=30), state)

    rotated = rotate_node_key(site)
    assert rotated.backup_key.read_bytes() and (site / "node.key").read_bytes() != \
        rotated.backup_key.read_bytes()
    revoked, enrolled = replace_key(folder, "north", site / "node.pub")
    assert revoked.fingerprint == rotated.old_fingerprint
    assert enrolled.fingerprint == rotated.fingerprint
    sync_registry_state(state, folder)  # what the gate does at start, 'register' at run time
    deliver(folder, site)
    deliver(folder, sites["south"])  # serial 5, without north's old key

    with pytest.raises(Exception, match="No SuperNode found"):  # Flower's own refusal
        fleet_handlers.activate_node(ActivateNodeRequest(public_key=old_bytes,
                                                         heartbeat_interval=30), state)
    assert flower_compat.node_id_of_key(state, old_bytes) is None
    new_key = _private_key(site)
    assert fleet_handlers.activate_node(ActivateNodeRequest(
        public_key=public_key_to_bytes(new_key.public_key()), heartbeat_interval=30), state)
    # Secure aggregation: the old key's signatures no longer count; the new key is north.
    assert identity(site).name == "north"
    roster = identity(sites["south"]).roster
    keys = SetupKeys(1, 1, 7, b"c" * 32, b"s" * 32, 0.0)
    assert not verify_setup(roster, "north", keys, sign_setup(old_key, keys))
    assert verify_setup(roster, "north", keys, sign_setup(new_key, keys))


def _headers(key, signed_at: dt.datetime) -> list[tuple[bytes, bytes]]:  # noqa: ANN001
    """Flower's node-authentication headers, the timestamp ``signed_at`` signed by ``key``."""
    from base64 import b64encode

    from flwr.common.constant import TIMESTAMP_HEADER
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

    timestamp = signed_at.isoformat()
    return [(FLEET_HTTP_PUBLIC_KEY_HEADER.encode(),
             b64encode(public_key_to_bytes(key.public_key()))),
            (TIMESTAMP_HEADER.encode(), timestamp.encode()),
            (FLEET_HTTP_SIGNATURE_HEADER.encode(),
             b64encode(sign_message(key, timestamp.encode())))]


def _status(app, headers, path: str) -> int:  # noqa: ANN001
    """The status ``app`` (ASGI) answers a POST to ``path`` with ``headers``."""
    import asyncio

    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    asyncio.run(app(scope, receive, send))
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


async def _flower(scope, receive, send) -> None:  # noqa: ANN001
    """Stands for Flower's app behind the gate: answers 200 to whatever reaches it."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


class Fleet:
    """The gate's Fleet API middleware on a real SuperLink state; requests signed by a node's
    key at times the test picks (seconds after a start 290 s ago, inside Flower's window)."""

    def __init__(self, state, on_second_session) -> None:  # noqa: ANN001
        self.gate = flower_compat.SingleUseSignatures(_flower, state, on_second_session)
        self.start = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=290)

    def call(self, key, path: str, at: float) -> int:  # noqa: ANN001
        signed_at = self.start + dt.timedelta(seconds=at)
        return _status(self.gate, _headers(key, signed_at), f"/v1/fleet/{path}")

    def heartbeats(self, key, times: list[float]) -> list[int]:  # noqa: ANN001
        return [self.call(key, "send-node-heartbeat", at) for at in times]


def _node_of(folder: Path, name: str) -> int:
    return int(next(e.node_id for e in load_enrolments(folder) if e.name == name))


def test_a_second_live_supernode_on_a_stolen_key_is_refused(consortium, tmp_path):
    folder, sites = consortium
    state = _superlink_state(tmp_path)
    sync_registry_state(state, folder)
    node, key = _node_of(folder, "stolen"), _private_key(sites["stolen"])  # the thief's copy
    cut_off: list[str | None] = []
    fleet = Fleet(state, lambda n: cut_off.append(refuse_stolen_key(folder, n)))

    assert fleet.call(key, "activate-node", 0.0) == 200  # the hospital's SuperNode
    assert fleet.heartbeats(key, [0.1, 20.0, 40.0]) == [200] * 3
    assert fleet.call(key, "activate-node", 50.0) == 200  # the thief's: a take-over
    # Both keep heartbeating, each on its own period (the thief's from 50.1 s): cut off within
    # about three minutes.
    thief = [50.1 + 21.0 * k for k in range(11)]
    hospital = [60.0 + 19.0 * k for k in range(12)]
    answers = [fleet.call(key, "send-node-heartbeat", at) for at in sorted(thief + hospital)]
    first = answers.index(401)
    assert answers[first:] == [401] * (len(answers) - first) and first < len(answers) - 2
    assert cut_off == ["stolen"]
    assert node not in flower_compat.registered_nodes(state)  # Flower refuses both from now on
    assert fleet.call(key, "activate-node", 280.0) == 401
    entry = next(e for e in load_enrolments(folder) if e.name == "stolen")
    assert entry.revoked_at and "stolen" not in parse_roster(
        (folder / ROSTER_FILE).read_text(), (folder / "ca" / "ca.pem").read_bytes()).keys


def test_without_the_watch_both_sessions_are_served(consortium, tmp_path):
    """The same two SuperNodes before the watch: every heartbeat of both passes the gate and
    the node stays registered - what the test above shows refused."""
    folder, sites = consortium
    state = _superlink_state(tmp_path)
    sync_registry_state(state, folder)
    key = _private_key(sites["stolen"])
    fleet = Fleet(state, None)  # no on_second_session: the gate as it was
    thief = [50.1 + 21.0 * k for k in range(11)]
    hospital = [60.0 + 19.0 * k for k in range(12)]
    assert set(fleet.heartbeats(key, sorted(thief + hospital))) == {200}
    assert _node_of(folder, "stolen") in flower_compat.registered_nodes(state)


def test_a_restarted_or_slowed_hospital_is_not_taken_for_a_second_session(consortium,
                                                                          tmp_path):
    """One SuperNode at a time: killed 1 s after a heartbeat and restarted 1 s later (the dead
    one's last heartbeat and the new one's first are close: an activation comes between), and
    heartbeat calls that time out (5 s) and are retried after 0-1, 0-2, 0-4 s of jitter while
    the SuperLink still acknowledges each: none is refused."""
    folder, sites = consortium
    state = _superlink_state(tmp_path)
    sync_registry_state(state, folder)
    key = _private_key(sites["north"])
    fleet = Fleet(state, pytest.fail)
    at = 0.0
    for _ in range(4):  # four restarts
        assert fleet.call(key, "activate-node", at) == 200
        assert fleet.heartbeats(key, [at + 0.1, at + 17.6]) == [200, 200]
        at += 19.6
    stalls = [0.0, 5.0, 10.0, 15.0, 20.0]  # each try times out after 5 s, retried at once
    for start in (at, at + 40.0, at + 80.0, at + 120.0, at + 160.0):
        assert fleet.heartbeats(key, [start + t for t in stalls]) == [200] * len(stalls)


def _private_key(site: Path):  # noqa: ANN202
    from cryptography.hazmat.primitives import serialization

    return serialization.load_ssh_private_key((site / "node.key").read_bytes(), password=None)


def _superlink_state(tmp_path: Path):  # noqa: ANN202
    """Flower's SuperLink state as the gate builds it (SQLite in ``tmp_path``)."""
    secret = tmp_path / "superexec.secret"
    secret.write_bytes(bytes(range(32)))
    app, _ = flower_compat.superlink_app([
        "--insecure", "--database", str(tmp_path / "state.db"), "--host", "127.0.0.1",
        "--port", "9191", "--isolation", "process", "--superexec-auth-secret-file",
        str(secret)])
    return flower_compat.superlink_state(app)
