"""Every place medfed reaches past Flower's public API, in one module.

Flower 1.42's message API has no public way to set a message's id or source (the SuperLink
sets them), to build a message outside a Flower process (the runtime sets the process's task
identity), or to tune how a SuperNode's ClientApp process polls for objects; nor to build its
SuperLink application in process, edit the node registry there, or change how the SuperLink
treats a SuperNode that restarts (``server.superlink_gate``). medfed needs each of these in a
few places; they live here so that a Flower upgrade that changes one fails in
``tests/test_flower_compat.py``, one test per assumption, and is fixed here. Flower's Shamir and
SecAgg+ helpers (``privacy.secagg.crypto``) come through here too. An import-linter contract
(``.importlinter``) refuses Flower's internal packages elsewhere; its two listed exceptions,
``client.warm_exec`` and ``client.task_guard``, subclass and replace parts of Flower's runtime.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator

from flwr.app import Message, Metadata, RecordDict

FLOWER_SERIES = "1.42"
"""The Flower minor version these assumptions were checked against (pyproject pins it)."""


def set_message_id(message: Message, message_id: str) -> None:
    """Give ``message`` the id a SuperLink would assign when it is pushed (in-process grids)."""
    # Metadata exposes message_id read-only; the SuperLink writes the private field.
    message.metadata.__dict__["_message_id"] = message_id


def set_source_node(message: Message, node_id: int) -> None:
    """Record ``message`` as coming from ``node_id`` (the SuperLink sends its own errors, e.g.
    "Node Unavailable", from node 1; the coordinator files them under the hospital asked)."""
    message.metadata.__dict__["_src_node_id"] = node_id


def set_task_identity(run_id: int, node_id: int = 0, task_id: int = 0) -> None:
    """Set this process's task identity, as Flower's runtime does before a ServerApp or a
    ClientApp runs; ``Message(...)`` reads the run id from it."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id


@contextlib.contextmanager
def task_identity(run_id: int = 1, node_id: int = 0, task_id: int = 1) -> Iterator[None]:
    """:func:`set_task_identity` for the duration of a block, then the previous identity."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    set_task_identity(run_id, node_id, task_id)
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def set_object_pull_backoff(initial_s: float, cap_s: float) -> None:
    """Make Flower's object pulls retry every ``initial_s``..``cap_s`` seconds, without a limit
    on tries per object, for this process. Flower exposes no setting for it: its default
    backoff is the keyword defaults of ``pull_and_inflate_object_from_tree``."""
    from flwr.supercore.inflatable import inflatable_utils

    defaults = inflatable_utils.pull_and_inflate_object_from_tree.__kwdefaults__
    defaults.update(initial_backoff=initial_s, backoff_cap=cap_s, max_tries_per_object=None)


def empty_run(run_id: int = 1):
    """A ``flwr.supercore.run.Run`` with nothing set, for grids that serve no real SuperLink."""
    from flwr.supercore.run import Run

    return Run.create_empty(run_id=run_id)


def use_superexec_executor(executor) -> None:  # noqa: ANN001 (Flower's Executor protocol)
    """Make Flower's SuperExec loop (``flwr.supercore.superexec.run_superexec``) launch tasks
    with ``executor``. Flower 1.42 builds its executor through a module-level factory and
    offers only subprocess and Kubernetes executors; replacing the factory hands it ours."""
    from flwr.supercore.superexec import run_superexec as flower_superexec

    flower_superexec.get_executor = lambda *args, **kwargs: executor


# --- The SuperLink served by server.superlink_gate ---------------------------------------------
# Flower 1.42 has no public API to build its SuperLink application, reach its state, or edit its
# node registry in process; the gate needs all three.


def superlink_app(argv: list[str]):  # noqa: ANN201 (FastAPI app, Flower's config)
    """Flower's SuperLink application (``flwr.superlink.main.create_app``) set up by
    ``flower-superlink`` flags ``argv``, with Flower's own parser and checks.

    Returns:
        ``(app, config)``: the ASGI app and the parsed config (``host``, ``port``,
        ``ssl_keyfile``, ``ssl_certfile``, ``ssl_ca_certfile``).
    """
    import sys

    from flwr.superlink.cli.flower_superlink import (
        SuperLinkLifespan,
        _parse_superlink_lifespan_config,
    )
    from flwr.superlink.main import create_app

    saved, sys.argv = sys.argv, ["flower-superlink", *argv]  # Flower's parser reads sys.argv
    try:
        config = _parse_superlink_lifespan_config()
    finally:
        sys.argv = saved
    return create_app(config, SuperLinkLifespan), config


def uvicorn_log_config() -> dict:
    """Flower's uvicorn logging config, at the level of Flower's console handler."""
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler

    return get_uvicorn_log_config(console_handler.level)


def superlink_state(app):  # noqa: ANN001, ANN201 (Flower's FastAPI app and LinkState)
    """The SuperLink's one ``LinkState`` (the factory caches it: every router shares it)."""
    return app.state.linkstate_factory.state()


def public_key_bytes(openssh_line: str) -> bytes:
    """An OpenSSH public key line as Flower's node registry stores it."""
    from cryptography.hazmat.primitives import serialization
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    return public_key_to_bytes(serialization.load_ssh_public_key(openssh_line.encode()))


def registered_nodes(state) -> dict[int, bytes]:  # noqa: ANN001
    """Node id -> public key of every node in the registry that is not unregistered."""
    from flwr.common.constant import NOOP_FLWR_AID
    from flwr.supercore.constant import NodeStatus

    return {n.node_id: bytes(n.public_key) for n in state.get_node_info(owner_aids=[NOOP_FLWR_AID])
            if n.status != NodeStatus.UNREGISTERED}


def node_id_of_key(state, public_key: bytes) -> int | None:  # noqa: ANN001
    """The registered node id of ``public_key`` (``None``: not registered)."""
    return state.get_node_id_by_public_key(public_key)


def register_node(state, public_key: bytes, name: str) -> int:  # noqa: ANN001
    """Register ``public_key`` as ``flwr supernode register`` would; returns its node id."""
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID

    return state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, public_key,
                             HEARTBEAT_DEFAULT_INTERVAL, name=name)


def unregister_node(state, node_id: int) -> None:  # noqa: ANN001
    """Unregister ``node_id`` as ``flwr supernode unregister`` would: the SuperLink refuses
    its next request."""
    from flwr.common.constant import NOOP_FLWR_AID

    state.delete_node(NOOP_FLWR_AID, node_id)


RESTARTED_REASON = ("the hospital's SuperNode restarted before it replied: the message was lost "
                    "with its previous process")
"""Error reason of a reply the SuperLink makes for a message a restarted SuperNode lost."""


def recover_restarted_nodes(state, on_take_over: Callable[[int], None] | None = None
                            ) -> None:  # noqa: ANN001
    """Make the SuperLink's ``state`` accept a SuperNode that restarts at once after its
    process died (``kill -9``, a crash), and answer at once what the dead process lost.

    Flower counts a node online until two heartbeats (60 s) are missed and refuses to activate
    a node it counts online: a hospital restarted within that minute was refused as if its key
    were unknown. What the dead process was doing was waited for: a message it had received
    (kept only in its memory) until the round's timeout, a reply it had pushed without
    uploading all its objects until Flower's object-push session expired (180 s). With this:

    - activating a node still counted online takes it over (the previous process is gone;
      with node authentication the request is signed by the node's own key);
    - at every activation, the node's unfinished reply uploads are dropped as Flower drops an
      expired upload (the ServerApp then gets Flower's "objects unavailable" error for a reply
      it was already fetching);
    - a message delivered to a node before its current activation and not answered gets an
      error reply (:data:`RESTARTED_REASON`) at the ServerApp's next pull.

    Times are the SuperLink's own clock. ``on_take_over(node_id)`` is called at each take-over
    (for the log).
    """
    from collections import defaultdict, deque
    from datetime import datetime

    from flwr.supercore.date import now

    activate, pull = state.activate_node, state.get_message_res
    store = state.store_message_and_object_tree
    activated: dict[int, datetime] = {}
    # node -> push sessions of its latest reply uploads (a process has few at once).
    uploads: dict[int, deque[str]] = defaultdict(lambda: deque(maxlen=64))

    def activate_node(node_id: int, heartbeat_interval: float) -> bool:
        ok = activate(node_id, heartbeat_interval)
        if not ok and state.deactivate_node(node_id):  # it was online: its process is gone
            ok = activate(node_id, heartbeat_interval)
            if ok and on_take_over is not None:
                on_take_over(node_id)
        if ok:
            activated[node_id] = now()
            for session_id in uploads.pop(node_id, ()):  # a finished one is gone already
                state._cleanup_push_session(session_id, cleanup_messages=True)
        return ok

    def store_message_and_object_tree(message: Message, object_tree, session_id: str):  # noqa: ANN001, ANN202
        stored = store(message, object_tree, session_id)
        if stored[0] and message.metadata.reply_to_message_id:
            uploads[message.metadata.src_node_id].append(session_id)
        return stored

    def get_message_res(message_ids: set[str], run_id: int) -> list:
        asked = set(message_ids)
        replies = list(pull(message_ids, run_id))
        answered = {m.metadata.reply_to_message_id for m in replies}
        for message_id in sorted(asked - answered):
            row = state.get_valid_message_ins(message_id)
            ins = instruction_message(state, message_id) if row else None
            if ins is None or not row.get("delivered_at"):
                continue
            since = activated.get(ins.metadata.dst_node_id)
            if since is not None and datetime.fromisoformat(row["delivered_at"]) < since:
                reply = lost_message_reply(ins)
                state._store_generated_message(reply)  # as Flower stores its own errors
                replies.append(reply)
        return replies

    state.activate_node, state.get_message_res = activate_node, get_message_res
    state.store_message_and_object_tree = store_message_and_object_tree


def instruction_message(state, message_id: str) -> Message | None:  # noqa: ANN001
    """The instruction message ``message_id`` as the SuperLink stores it (``None``: gone or
    expired)."""
    from flwr.server.superlink.linkstate.utils import (
        convert_sint64_values_in_dict_to_uint64,
        dict_to_message,
    )

    row = state.get_valid_message_ins(message_id)
    if not row:
        return None
    convert_sint64_values_in_dict_to_uint64(row, ["run_id", "src_node_id", "dst_node_id"])
    return dict_to_message(row)


def make_message(metadata: Metadata, content: RecordDict | None = None) -> Message:
    """A message carrying ``metadata`` as given (ids, source, reply-to), which the public
    ``Message(...)`` sets itself: Flower's internal factory, for in-process messages."""
    from flwr.app.message.message import make_message as flower_make_message

    return flower_make_message(metadata, content)


def create_shares(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """Flower's Shamir secret sharing: ``num`` shares of ``secret``, any ``threshold`` of
    which give it back (SecAgg+'s own, so that medfed's shares match Flower's protocol)."""
    from flwr.common.secure_aggregation.crypto.shamir import create_shares as flower_create

    return flower_create(secret, threshold, num)


def combine_shares(share_list: list[bytes]) -> bytes:
    """The secret of :func:`create_shares`'s ``share_list`` (at least the threshold)."""
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares as flower_combine

    return flower_combine(share_list)


def share_keys_plaintext_concat(src_node_id: int, dst_node_id: int, b_share: bytes,
                                sk_share: bytes) -> bytes:
    """SecAgg+'s plaintext of one hospital's shares for another, in Flower's layout."""
    from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat as f

    return f(src_node_id, dst_node_id, b_share, sk_share)


def share_keys_plaintext_separate(plaintext: bytes) -> tuple[int, int, bytes, bytes]:
    """:func:`share_keys_plaintext_concat`'s parts back: (source, destination, the mask seed's
    share, the secret key's share)."""
    from flwr.common.secure_aggregation.secaggplus_utils import (
        share_keys_plaintext_separate as f,
    )

    return f(plaintext)


def lost_message_reply(message: Message) -> Message:
    """The error reply the SuperLink sends for ``message`` when its destination lost it (from
    the SuperLink's node id, as Flower's own "Node Unavailable" replies)."""
    from flwr.app import Error, Metadata
    from flwr.app.message.message import make_message
    from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
    from flwr.supercore.date import now

    ins = message.metadata
    current = now().timestamp()
    metadata = Metadata(
        run_id=ins.run_id, message_id="", src_node_id=SUPERLINK_NODE_ID,
        dst_node_id=SUPERLINK_NODE_ID, reply_to_message_id=ins.message_id,
        group_id=ins.group_id, message_type=ins.message_type, created_at=current,
        ttl=max(ins.ttl - (current - ins.created_at), 0), src_task_id=ins.dst_task_id,
        dst_task_id=ins.src_task_id)
    reply = make_message(metadata=metadata, error=Error(code=ErrorCode.NODE_UNAVAILABLE,
                                                         reason=RESTARTED_REASON))
    set_message_id(reply, reply.object_id)
    return reply


# --- Single-use node signatures ------------------------------------------------------------------
# Flower 1.42's Fleet HTTP node authentication signs only the request's timestamp (not its body,
# path or node id) and accepts a signature for 300 s (+5 s of clock drift). Whoever sees one
# request's headers (the coordinator terminates TLS; a proxy log) could replay them for that
# long as that node: pull its messages, or activate as it - which, with the take-over of a
# restarted node above, would push the real SuperNode off. A node signs a fresh timestamp for
# every request (retries included), so a signature seen twice is a replay.


async def _refuse(send) -> None:  # noqa: ANN001 (ASGI send)
    """Answer 401 as Flower answers a bad node signature."""
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body",
                "body": b'{"detail":"Invalid SuperNode authentication"}'})


class SingleUseSignatures:
    """ASGI middleware: a Fleet API request whose node signature the SuperLink has already
    accepted once answers 401, as Flower answers a bad signature.

    A use is remembered as the pair (node key, signed timestamp), not as the signature's bytes:
    ECDSA signatures are malleable (``(r, s)`` and ``(r, n - s)`` both verify), so a replayer
    could otherwise send the same signed timestamp under a second valid signature. Only pairs
    whose signature verifies against a registered node's key are remembered (an attacker
    cannot fill the memory with made-up ones), each until its timestamp leaves Flower's window;
    everything else goes on to Flower's own node authentication, unchanged.

    With ``on_second_session``, a node whose key runs two live SuperNodes
    (:class:`SecondSessionWatch`, fed the verified signed times of heartbeats) is refused:
    its node is unregistered (Flower then answers 401 to both processes, which stop), every
    request claiming its key answers 401 here, and ``on_second_session(node_id)`` is called
    once, in a worker thread (the gate logs it and revokes the enrolment, so no restart
    registers the key again).
    """

    def __init__(self, app: Callable, state,  # noqa: ANN001 (ASGI app, LinkState)
                 on_second_session: Callable[[int], object] | None = None,
                 watch: SecondSessionWatch | None = None) -> None:
        self.app = app
        self.state = state
        self.on_second_session = on_second_session
        self.watch = watch or SecondSessionWatch()
        self.seen: set[tuple[bytes, str]] = set()
        # (forget at, epoch s; (node key, signed timestamp))
        self.expiry: deque[tuple[float, tuple[bytes, str]]] = deque()

    def _key_signed(self, headers: dict[bytes, bytes]) -> tuple[tuple[bytes, str], float] | None:
        """``((node key, timestamp), forget_at)`` if the headers carry a registered node's
        valid signature of a timestamp inside Flower's window; else ``None``."""
        import binascii
        import time
        from base64 import b64decode
        from datetime import datetime

        from flwr.common.constant import (
            SYSTEM_TIME_TOLERANCE,
            TIMESTAMP_HEADER,
            TIMESTAMP_TOLERANCE,
        )
        from flwr.supercore.constant import (
            FLEET_HTTP_PUBLIC_KEY_HEADER,
            FLEET_HTTP_SIGNATURE_HEADER,
        )
        from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature

        try:
            public_key = b64decode(headers[FLEET_HTTP_PUBLIC_KEY_HEADER.encode()], validate=True)
            signature = b64decode(headers[FLEET_HTTP_SIGNATURE_HEADER.encode()], validate=True)
            timestamp = headers[TIMESTAMP_HEADER.encode()].decode("ascii")
            signed_at = datetime.fromisoformat(timestamp).timestamp()
            if node_id_of_key(self.state, public_key) is None or not verify_signature(
                    bytes_to_public_key(public_key), timestamp.encode("ascii"), signature):
                return None
        except (KeyError, ValueError, TypeError, UnicodeError, binascii.Error):
            return None
        forget_at = signed_at + TIMESTAMP_TOLERANCE + 2 * SYSTEM_TIME_TOLERANCE
        # else Flower refuses
        return ((public_key, timestamp), forget_at) if forget_at > time.time() else None

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] == "http" and str(scope.get("path", "")).startswith("/v1/fleet/"):
            import time

            from starlette.concurrency import run_in_threadpool

            headers = dict(scope["headers"])
            if self._flagged(headers):  # cut off for a second session: refused for good
                await _refuse(send)
                return
            signed = await run_in_threadpool(self._key_signed, headers)
            if signed is not None:
                # Check and record with no await between: one event loop, so atomic.
                while self.expiry and self.expiry[0][0] < time.time():  # about in time order
                    self.seen.discard(self.expiry.popleft()[1])
                if signed[0] in self.seen:
                    await _refuse(send)
                    return
                self.seen.add(signed[0])
                self.expiry.append((signed[1], signed[0]))
                if await self._second_session(str(scope.get("path", "")), *signed[0]):
                    await _refuse(send)
                    return
        await self.app(scope, receive, send)

    def _flagged(self, headers: dict[bytes, bytes]) -> bool:
        """Whether the request claims a node key cut off for running a second session."""
        import binascii
        from base64 import b64decode

        from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER

        if not self.watch.flagged:
            return False
        try:
            claimed = b64decode(headers[FLEET_HTTP_PUBLIC_KEY_HEADER.encode()], validate=True)
        except (KeyError, ValueError, binascii.Error):
            return False
        return claimed in self.watch.flagged

    async def _second_session(self, path: str, key: bytes, timestamp: str) -> bool:
        """Watch activations and heartbeats; ``True`` (after cutting the node off, once) when
        ``key`` runs a second live SuperNode."""
        from datetime import datetime

        from starlette.concurrency import run_in_threadpool

        if self.on_second_session is None:
            return False
        if path.endswith("/activate-node"):
            self.watch.activated(key)
            return False
        if not path.endswith("/send-node-heartbeat"):
            return False
        first = key not in self.watch.flagged
        if not self.watch.heartbeat(key, datetime.fromisoformat(timestamp).timestamp()):
            return False
        node_id = node_id_of_key(self.state, key)
        if first and node_id is not None:
            await run_in_threadpool(unregister_node, self.state, node_id)
            await run_in_threadpool(self.on_second_session, node_id)
        return True


# --- A second live session on one node -----------------------------------------------------------
# Whoever copies a hospital's node.key can start a second SuperNode with it: its activation takes
# the node over (as a restarted SuperNode's does, above), and from then on both processes pull
# the node's messages, each getting about half. Flower's requests carry nothing that tells two
# processes apart, but the timestamps a node signs on its heartbeats do: one SuperNode signs one
# heartbeat every 17.5-22.5 s (Flower's HeartbeatSender: (30 - 5) s times 0.7-0.9), and retries
# a failed one only after the call failed - a timed-out call after 5 s (HEARTBEAT_CALL_TIMEOUT),
# so two heartbeats one process signs are never less than 5 s apart, however slow the SuperLink
# (its arrival times may bunch up; the signed times cannot). Two live SuperNodes, each on its own
# period, sign heartbeats closer than that about every other period.

SECOND_SESSION_GAP_S = 5.0
"""Two heartbeats of one node signed less than this (s) apart come from two live SuperNodes
(Flower's heartbeat call timeout: a retry is signed after the failed call timed out)."""
SECOND_SESSION_COUNT = 3
"""How many such close pairs within :data:`SECOND_SESSION_WINDOW_S` prove a second session
(one could be a retry after a call that failed at once yet reached the SuperLink)."""
SECOND_SESSION_WINDOW_S = 900.0
"""Close pairs signed longer ago than this (s) are forgotten."""


class SecondSessionWatch:
    """Counts, per node key, heartbeats signed closer together than one SuperNode signs them.

    An activation forgets the node's last heartbeat (the heartbeats of a process that died
    before a restart never pair with the new process's) but not the close pairs already seen
    (a second SuperNode that re-activates does not wipe its trail).
    """

    def __init__(self, gap_s: float = SECOND_SESSION_GAP_S, count: int = SECOND_SESSION_COUNT,
                 window_s: float = SECOND_SESSION_WINDOW_S) -> None:
        self.gap_s, self.count, self.window_s = gap_s, count, window_s
        self.last: dict[bytes, float] = {}
        self.close: dict[bytes, deque[float]] = {}
        self.flagged: set[bytes] = set()

    def activated(self, key: bytes) -> None:
        """Forget the node's last heartbeat: a new process holds it from now on."""
        self.last.pop(key, None)

    def heartbeat(self, key: bytes, signed_at: float) -> bool:
        """Record a heartbeat the node's key signed at ``signed_at`` (epoch s); ``True`` when
        the node shows (or showed) a second live session."""
        if key in self.flagged:
            return True
        previous = self.last.get(key)
        self.last[key] = max(signed_at, previous or signed_at)
        if previous is None or abs(signed_at - previous) >= self.gap_s:
            return False
        close = self.close.setdefault(key, deque())
        close.append(signed_at)
        while close and close[0] < signed_at - self.window_s:
            close.popleft()
        if len(close) >= self.count:
            self.flagged.add(key)
            return True
        return False
