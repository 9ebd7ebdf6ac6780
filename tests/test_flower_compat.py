"""One test per assumption medfed makes about Flower's internals (``core.flower_compat`` and
the few private imports elsewhere). A Flower upgrade that breaks one fails here first."""

from __future__ import annotations

import inspect

import flwr
import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict

from core import flower_compat


@pytest.fixture
def identity():
    with flower_compat.task_identity(run_id=7, node_id=0, task_id=3):
        yield


def test_the_pinned_flower_series():
    assert flwr.__version__.startswith(flower_compat.FLOWER_SERIES + ".")


def test_message_needs_a_task_identity_outside_flower_and_gets_it_from_ours(identity):
    message = Message(RecordDict({"config": ConfigRecord({"a": 1})}), dst_node_id=5,
                      message_type="train")
    assert message.metadata.run_id == 7 and message.metadata.dst_node_id == 5


def test_task_identity_is_restored_after_the_block():
    from flwr.supercore.task_identity import TaskIdentity

    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    with flower_compat.task_identity(run_id=11, node_id=2, task_id=4):
        assert (TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id) == (11, 2, 4)
    assert (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id) == before


def test_a_message_id_can_be_set_as_the_superlink_does(identity):
    message = Message(RecordDict(), dst_node_id=5, message_type="train")
    flower_compat.set_message_id(message, "m-1")
    assert message.metadata.message_id == "m-1"
    reply = Message(RecordDict(), reply_to=message)
    assert reply.metadata.reply_to_message_id == "m-1"


def test_a_replys_source_node_can_be_set(identity):
    message = Message(RecordDict(), dst_node_id=5, message_type="train")
    flower_compat.set_message_id(message, "m-2")
    reply = Message(Error(code=0, reason="Node Unavailable"), reply_to=message)
    flower_compat.set_source_node(reply, 5)
    assert reply.metadata.src_node_id == 5 and reply.has_error()


def test_object_pull_backoff_lives_in_keyword_defaults():
    from flwr.supercore.inflatable import inflatable_utils

    defaults = inflatable_utils.pull_and_inflate_object_from_tree.__kwdefaults__
    saved = dict(defaults)
    try:
        flower_compat.set_object_pull_backoff(0.05, 0.5)
        assert (defaults["initial_backoff"], defaults["backoff_cap"],
                defaults["max_tries_per_object"]) == (0.05, 0.5, None)
    finally:
        defaults.clear()
        defaults.update(saved)


def test_an_empty_run_for_grids_without_a_superlink():
    assert flower_compat.empty_run(3).run_id == 3


def test_superexec_builds_its_executor_through_a_replaceable_factory():
    from flwr.supercore.superexec import run_superexec as flower_superexec

    saved = flower_superexec.get_executor
    try:
        marker = object()
        flower_compat.use_superexec_executor(marker)
        assert flower_superexec.get_executor() is marker
    finally:
        flower_superexec.get_executor = saved
    assert {"runtime_api_address", "insecure", "superexec_auth_secret", "parent_pid"} <= set(
        inspect.signature(flower_superexec.run_superexec).parameters)


def test_warm_executor_builds_on_flowers_executor_and_clientapp_runner():
    """client/warm_exec.py subclasses Flower's SubprocessExecutor and calls run_clientapp
    with the fields of Flower's ExecutionSpec."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import LaunchResult, SubprocessExecutor
    from flwr.supercore.superexec.executor.types import ExecutionSpec
    from flwr.supercore.tls import validate_and_resolve_root_certificates  # noqa: F401
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    assert TaskType.CLIENT_APP
    assert callable(LaunchResult.accepted) and callable(LaunchResult.failed)
    assert {"launch", "reconcile"} <= set(dir(SubprocessExecutor))
    runner = set(inspect.signature(run_clientapp).parameters)
    assert {"runtime_api_address", "token", "insecure", "certificates", "parent_pid",
            "runtime_dependency_install"} <= runner
    spec_fields = set(inspect.signature(ExecutionSpec).parameters)
    assert {"runtime_api_address", "token", "insecure", "root_certificates_path", "parent_pid",
            "runtime_dependency_install", "task_type", "task_id"} <= spec_fields


def test_message_with_explicit_metadata_outside_flower():
    """simulations/inprocess.py builds messages from Metadata and make_message."""
    from simulations.inprocess import message_with_metadata

    message = message_with_metadata("train", RecordDict(), run_id=9, message_id="x")
    assert (message.metadata.run_id, message.metadata.message_id) == (9, "x")


def test_shamir_sharing_secure_aggregation_uses():
    """privacy/secagg/crypto.py shares secrets through Flower's Shamir wrapper."""
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.common.secure_aggregation.secaggplus_utils import (  # noqa: F401
        share_keys_plaintext_concat,
        share_keys_plaintext_separate,
    )

    secret = bytes(range(32))
    shares = create_shares(secret, 3, 5)
    assert combine_shares(shares[:3]) == secret


def test_supernode_key_loaders_the_pki_tests_compare_against():
    from flwr.cli.supernode.register import try_load_public_key  # noqa: F401
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    assert callable(_try_setup_client_authentication)


# --- the SuperLink that server.superlink_gate serves ---------------------------------------------


@pytest.fixture
def superlink(tmp_path):
    """Flower's SuperLink app as the gate builds it (SQLite state in ``tmp_path``)."""
    secret = tmp_path / "secret"
    secret.write_bytes(bytes(range(32)))
    app, config = flower_compat.superlink_app([
        "--insecure", "--database", str(tmp_path / "state.db"), "--host", "127.0.0.1",
        "--port", "9191", "--isolation", "process", "--superexec-auth-secret-file",
        str(secret)])
    return app, config


def _openssh_key() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    public = ec.generate_private_key(ec.SECP384R1()).public_key()
    return public.public_bytes(serialization.Encoding.OpenSSH,
                               serialization.PublicFormat.OpenSSH).decode()


def test_superlink_app_from_flower_flags_with_one_shared_state(superlink):
    import sys

    app, config = superlink
    assert (config.host, config.port, config.ssl_ca_certfile) == ("127.0.0.1", 9191, None)
    assert flower_compat.superlink_state(app) is flower_compat.superlink_state(app)
    assert sys.argv[0] != "flower-superlink"  # Flower's parser read our argv, then it was put back
    assert isinstance(flower_compat.uvicorn_log_config(), dict)


def test_node_registry_edited_in_process(superlink):
    state = flower_compat.superlink_state(superlink[0])
    key = flower_compat.public_key_bytes(_openssh_key())
    assert flower_compat.node_id_of_key(state, key) is None
    node = flower_compat.register_node(state, key, "hospital-a")
    assert flower_compat.node_id_of_key(state, key) == node
    assert flower_compat.registered_nodes(state) == {node: key}
    flower_compat.unregister_node(state, node)
    assert flower_compat.registered_nodes(state) == {}


def _one_delivered_message(app, state, node: int) -> tuple[object, list[str]]:
    """A run, and one message pushed to ``node`` and pulled by it (delivered, not answered)."""
    from flwr.common.constant import NOOP_FLWR_AID
    from flwr.supercore.constant import NOOP_FEDERATION_ID, TaskType
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    run_id = state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, NOOP_FLWR_AID,
                              TaskType.SERVER_APP)
    grid = InMemoryGrid(app.state.linkstate_factory)
    grid.set_run(flower_compat.empty_run(run_id))
    with flower_compat.task_identity(run_id=run_id):
        message = Message(RecordDict({"config": ConfigRecord({"a": 1})}), dst_node_id=node,
                          message_type="train", group_id="1")
    flower_compat.set_source_node(message, 1)  # from the SuperLink, as a ServerApp's messages
    ids = list(grid.push_messages([message]))
    assert len(ids) == 1 and len(state.get_message_ins(node, limit=1)) == 1  # delivered
    return grid, ids


def test_a_restarted_supernode_is_taken_over_and_what_it_lost_is_answered(superlink):
    app, _ = superlink
    state = flower_compat.superlink_state(app)
    node = flower_compat.register_node(state, flower_compat.public_key_bytes(_openssh_key()), "h")
    taken: list[int] = []
    assert state.activate_node(node, 30)
    grid, ids = _one_delivered_message(app, state, node)
    assert list(grid.pull_messages(ids)) == []  # waited for: the node is online

    # Flower alone refuses to activate a node it still counts online (2 heartbeats).
    activate = state.activate_node
    assert not activate(node, 30)
    flower_compat.recover_restarted_nodes(state, on_take_over=taken.append)
    assert state.activate_node(node, 30) and taken == [node]
    replies = list(grid.pull_messages(ids))
    assert len(replies) == 1 and replies[0].has_error()
    assert replies[0].error.reason == flower_compat.RESTARTED_REASON
    assert replies[0].metadata.reply_to_message_id == ids[0]
    # Answered once: the message is gone (Flower answers a later pull of its id itself).
    assert all(r.error.reason != flower_compat.RESTARTED_REASON for r in grid.pull_messages(ids))


def test_a_message_delivered_after_the_activation_is_still_waited_for(superlink):
    app, _ = superlink
    state = flower_compat.superlink_state(app)
    node = flower_compat.register_node(state, flower_compat.public_key_bytes(_openssh_key()), "h")
    flower_compat.recover_restarted_nodes(state)
    assert state.activate_node(node, 30)
    grid, ids = _one_delivered_message(app, state, node)
    assert list(grid.pull_messages(ids)) == []


def test_an_unregistered_node_is_not_taken_over(superlink):
    app, _ = superlink
    state = flower_compat.superlink_state(app)
    node = flower_compat.register_node(state, flower_compat.public_key_bytes(_openssh_key()), "h")
    flower_compat.recover_restarted_nodes(state, on_take_over=pytest.fail)
    assert state.activate_node(node, 30)
    flower_compat.unregister_node(state, node)
    assert not state.activate_node(node, 30)


@pytest.mark.parametrize("fetched", [False, True])
@pytest.mark.parametrize("uploaded", [False, True])
def test_a_reply_the_dead_supernode_did_not_finish_uploading_is_dropped(superlink, uploaded,
                                                                        fetched):
    """Flower stores a pushed reply, then its objects as they arrive, and drops an upload only
    when its push session expires (180 s). Here a take-over drops the dead process's unfinished
    upload at once: a reply not yet fetched is answered as lost, one being fetched has its
    objects gone (Flower's ServerApp then reports them unavailable); a whole one is kept."""
    from flwr.supercore.inflatable.inflatable_object import (
        get_all_nested_objects,
        get_object_tree,
    )

    app, _ = superlink
    state = flower_compat.superlink_state(app)
    node = flower_compat.register_node(state, flower_compat.public_key_bytes(_openssh_key()), "h")
    flower_compat.recover_restarted_nodes(state)
    assert state.activate_node(node, 30)
    grid, ids = _one_delivered_message(app, state, node)
    instruction = flower_compat.instruction_message(state, ids[0])
    reply = Message(RecordDict({"metrics": ConfigRecord({"x": 1})}), reply_to=instruction)
    flower_compat.set_message_id(reply, reply.object_id)
    run_id = instruction.metadata.run_id
    session = state.start_session(run_id)
    stored, missing = state.store_message_and_object_tree(reply, get_object_tree(reply), session)
    assert stored and missing  # preregistered, objects not yet uploaded
    objects = get_all_nested_objects(reply)
    if uploaded:
        for object_id, obj in objects.items():
            assert state.store_object(run_id, session, object_id, obj.deflate())
    if fetched:  # the ServerApp has the reply's id and fetches its objects
        assert [m.metadata.message_id for m in state.get_message_res({ids[0]}, run_id)] \
            == [reply.object_id]
    assert state.activate_node(node, 30)  # the SuperNode restarted: taken over
    if fetched:
        contents = [state.get_object(run_id, object_id) for object_id in objects]
        assert all(contents) if uploaded else not any(contents)
        return
    replies = list(grid.pull_messages(ids))
    assert len(replies) == 1
    if uploaded:
        assert not replies[0].has_error() and replies[0].metadata.message_id == reply.object_id
    else:
        assert replies[0].error.reason == flower_compat.RESTARTED_REASON


def _signed_headers(key, timestamp: str | None = None) -> list[tuple[bytes, bytes]]:  # noqa: ANN001
    """Flower's node-authentication headers for ``key`` (an EC private key)."""
    from base64 import b64encode

    from flwr.common.constant import TIMESTAMP_HEADER
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

    timestamp = timestamp or now().isoformat()
    return [(FLEET_HTTP_PUBLIC_KEY_HEADER.encode(),
             b64encode(public_key_to_bytes(key.public_key()))),
            (TIMESTAMP_HEADER.encode(), timestamp.encode()),
            (FLEET_HTTP_SIGNATURE_HEADER.encode(),
             b64encode(sign_message(key, timestamp.encode())))]


def _status(app, headers, path: str = "/v1/fleet/pull-messages") -> int:  # noqa: ANN001
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


async def _ok(scope, receive, send) -> None:  # noqa: ANN001
    """Stands for Flower's app: answers 200 to whatever reaches it."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def test_a_node_signature_is_accepted_once(superlink):
    """Flower's Fleet HTTP authentication signs only a timestamp and accepts it for 300 s:
    the gate lets each registered node's signature through once, then answers 401."""
    from datetime import timedelta

    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    state = flower_compat.superlink_state(superlink[0])
    key, stranger = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    flower_compat.register_node(state, public_key_to_bytes(key.public_key()), "h")
    guard = flower_compat.SingleUseSignatures(_ok, state)
    headers = _signed_headers(key)
    assert _status(guard, headers) == 200
    assert _status(guard, headers) == 401  # replayed
    assert _status(guard, headers, "/v1/fleet/activate-node") == 401
    # ECDSA malleability: (r, n - s) is another valid signature of the same timestamp.
    from base64 import b64decode, b64encode

    from cryptography.hazmat.primitives.asymmetric.utils import (
        decode_dss_signature,
        encode_dss_signature,
    )
    from flwr.supercore.primitives.asymmetric import verify_signature

    r, s = decode_dss_signature(b64decode(headers[2][1]))
    order = int("FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
                "581A0DB248B0A77AECEC196ACCC52973", 16)  # SECP384R1's group order
    twin = encode_dss_signature(r, order - s)
    assert twin != b64decode(headers[2][1])
    assert verify_signature(key.public_key(), headers[1][1], twin)
    assert _status(guard, [headers[0], headers[1], (headers[2][0], b64encode(twin))]) == 401
    assert _status(guard, _signed_headers(key)) == 200  # a fresh signature, as a node sends
    # Not a registered key's valid signature: not remembered, left to Flower to refuse.
    unknown = _signed_headers(stranger)
    assert _status(guard, unknown) == 200 and _status(guard, unknown) == 200
    forged = _signed_headers(stranger)[:2] + [_signed_headers(stranger)[2]]
    forged[0] = headers[0]  # the registered key claimed, another key's signature
    assert _status(guard, forged) == 200 and _status(guard, forged) == 200
    assert _status(guard, headers, "/health") == 200  # not the Fleet API: untouched
    # Forgotten once Flower's window (300 s + drift) has passed: Flower refuses it then.
    old = _signed_headers(key, (now() - timedelta(seconds=400)).isoformat())
    assert _status(guard, old) == 200
    assert len(guard.seen) == 2  # the two fresh ones: an expired one is not kept


def test_flowers_shamir_and_share_layout_come_through_the_compat_module():
    """privacy.secagg.crypto shares secrets with Flower's SecAgg+ helpers, reached through
    core.flower_compat: any 3 of 5 shares give the secret back, and a share's plaintext splits
    back into what was put in."""
    secret = bytes(range(32))
    shares = flower_compat.create_shares(secret, 3, 5)
    assert len(shares) == 5
    assert flower_compat.combine_shares(shares[1:4]) == secret
    assert flower_compat.combine_shares([shares[0], shares[2], shares[4]]) == secret
    text = flower_compat.share_keys_plaintext_concat(3, 9, b"seed-share", b"key-share")
    assert flower_compat.share_keys_plaintext_separate(text) == (3, 9, b"seed-share",
                                                                 b"key-share")


def test_make_message_keeps_the_metadata_given():
    from flwr.app import Metadata, RecordDict

    metadata = Metadata(run_id=5, message_id="m-1", src_node_id=2, dst_node_id=7,
                        reply_to_message_id="", group_id="g", created_at=1.0, ttl=60.0,
                        message_type="train")
    message = flower_compat.make_message(metadata, RecordDict())
    assert (message.metadata.message_id, message.metadata.src_node_id,
            message.metadata.run_id) == ("m-1", 2, 5)


def test_importing_any_medfed_package_sets_flowers_environment_defaults_unless_set():
    """core.flower_env: no telemetry and no runtime dependency installation before Flower
    loads, in every process medfed runs in; a value the operator set is kept."""
    import json
    import os
    import subprocess
    import sys

    from core.flower_env import FLOWER_ENV_DEFAULTS

    env = {k: v for k, v in os.environ.items() if k not in FLOWER_ENV_DEFAULTS}
    env["FLWR_DISABLE_UPDATE_CHECK"] = "operator's"
    code = ("import os, json, client; print(json.dumps({k: os.environ.get(k) for k in "
            f"{sorted(FLOWER_ENV_DEFAULTS)!r}}}))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    assert json.loads(done.stdout) == FLOWER_ENV_DEFAULTS | {
        "FLWR_DISABLE_UPDATE_CHECK": "operator's"}
