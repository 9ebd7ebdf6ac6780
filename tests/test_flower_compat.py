"""One test per assumption medfed makes about Flower's internals (``models.flower_compat`` and
the few private imports elsewhere). A Flower upgrade that breaks one fails here first."""

from __future__ import annotations

import inspect

import flwr
import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict

from models import flower_compat


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
