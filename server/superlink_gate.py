"""Flower's SuperLink with only its Fleet API on the hospital-facing address.

Flower 1.42 serves the Fleet API (hospitals), the Control API (run submission, node
registration) and the Runtime/ServerAppIo API (the ServerApp) on one HTTP port, without
authenticating the Control API in its open-source build: anyone who reaches that port could
submit a run or register a node key. This process runs Flower's own SuperLink application
(``flwr.superlink.main.create_app``, the same state, routers and node authentication) on two
sockets:

- ``--host``/``--port`` (the hospital-facing address): Fleet API paths only (``/v1/fleet/``
  and ``/health``); every other path answers 404 there.
- ``127.0.0.1:--admin-port``: every API, for the ``flwr`` CLI and the ServerApp on this
  machine. The Runtime API is further authenticated by the SuperExec secret
  (``--superexec-auth-secret-file``, Flower's own HMAC scheme) in process isolation.

The gate starts Flower's ``flower-superexec`` itself (it launches the ServerApp for each run),
against the loopback socket, authenticated by a secret made fresh at each start, and set to die
with the gate (parent-death signal); Flower's own SuperLink would point it at the public one.

With ``--consortium DIR`` the node registry is made to match DIR's enrolment list *before*
either socket accepts a connection (:func:`sync_registry_state`), so an enrolled hospital is
never refused for connecting early, and a key registered behind the coordinator's back is
removed.

A hospital restarted at once after its daemon died (``kill -9``, a crash) is taken back at once:
Flower would refuse it while it still counts the dead process online (two missed heartbeats,
a minute), and would wait for the round's timeout for the message that process was working on.
Here the node is taken over, and that message is answered as lost
(:func:`core.flower_compat.recover_restarted_nodes`). Only the node's private key can do
that: Flower checks a signature of the request's timestamp by the node's key, and the gate
accepts each signed timestamp once (:class:`core.flower_compat.SingleUseSignatures`), so
headers seen by the coordinator or a proxy cannot be replayed to activate as the node or pull
its messages. Every Flower internal the gate uses is in :mod:`core.flower_compat`.

A node whose key runs two live SuperNodes at once (a copied or stolen ``node.key``: the second
one's activation takes the node over, and both keep heartbeating) is refused: the gate
unregisters it, so both processes are refused, and revokes its enrolment
(:func:`refuse_stolen_key`); the hospital rotates its key and is re-enrolled
(docs/threat-model.md, "Roster freshness and stolen node keys").

    python -m server.superlink_gate --admin-port 9093 --consortium DIR <flower-superlink args>
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from core import flower_compat
from core.processes import dies_with_this_process

logger = logging.getLogger(__name__)

PUBLIC_PATHS = ("/v1/fleet/", "/health")
"""Path prefixes served on the hospital-facing socket: the Fleet API and the health probe."""
READY_LINE = "medfed superlink gate: serving"
"""Logged once both sockets listen (after the registry sync)."""
SECRET_FILE = "superexec.secret"
"""In the consortium folder, 0600, new at each start: the SuperLink and its SuperExec share it."""

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class FleetOnly:
    """ASGI middleware: requests that arrive on ``public_port`` reach only Fleet API paths.

    The socket a request came in on is ``scope["server"]`` (uvicorn's local address); the port
    decides, so a Fleet socket on 127.0.0.1 (loopback tests) is kept apart from the admin one.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], public_port: int) -> None:
        self.app = app
        self.public_port = public_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        if (scope["type"] in ("http", "websocket") and server and server[1] == self.public_port
                and not str(scope.get("path", "")).startswith(PUBLIC_PATHS)):
            if scope["type"] == "http":
                await send({"type": "http.response.start", "status": 404,
                            "headers": [(b"content-type", b"text/plain")]})
                await send({"type": "http.response.body",
                            "body": b"not served on this address\n"})
            return
        await self.app(scope, receive, send)


def sync_registry_state(state: Any, folder: Path) -> list[str]:
    """Make the SuperLink state's node registry match the enrolment list of ``folder``.

    Registers every active enrolment's key that is not registered (recording its node id in
    the enrolment list), unregisters revoked keys and every node whose key is not an active
    enrolment's. Works on Flower's ``LinkState`` directly (``core.flower_compat``):
    milliseconds a key, where ``flwr supernode register`` starts a Python CLI per key.

    Returns:
        One line per change, for the log.
    """
    from server.consortium import load_enrolments, set_node_id

    lines = []
    wanted: dict[bytes, Any] = {}
    for entry in load_enrolments(folder):
        if entry.active:
            wanted[flower_compat.public_key_bytes(entry.public_key)] = entry
        elif entry.node_id:
            set_node_id(folder, entry.fingerprint, "")
    for node_id, key in flower_compat.registered_nodes(state).items():
        if key not in wanted:
            flower_compat.unregister_node(state, node_id)
            lines.append(f"unregistered node {node_id}: its key is not on the enrolment "
                         f"list (revoked, or registered behind the coordinator's back)")
    for key, entry in wanted.items():
        node_id = flower_compat.node_id_of_key(state, key)
        if node_id is None:
            node_id = flower_compat.register_node(state, key, entry.name)
            lines.append(f"registered {entry.name} (node {node_id})")
        if entry.node_id != str(node_id):
            set_node_id(folder, entry.fingerprint, str(node_id))
    return lines


def refuse_stolen_key(folder: Path, node_id: int) -> str | None:
    """Revoke the enrolment of ``node_id``, whose key runs two live SuperNodes at once (the
    SuperLink has unregistered it already), and log what the operators must do.

    Returns:
        The hospital's enrolled name (``None``: no enrolment holds this node id).
    """
    from server.consortium import (
        ConsortiumError,
        ca_key_here,
        load_enrolments,
        revoke,
        roster_offline_message,
    )

    entry = next((e for e in load_enrolments(folder) if e.active and e.node_id == str(node_id)),
                 None)
    name = entry.name if entry is not None else None
    logger.critical(
        "node %d (hospital %s): its key runs two live SuperNodes at once (a copied or stolen "
        "node.key); refused: the node is unregistered and its enrolment revoked. The hospital "
        "runs 'medfed hospital rotate-key --dir SITE' on its own machine and sends the new "
        "node.pub; then 'medfed coordinator enroll %s --name %s --hospital-key node.pub'",
        node_id, name or "?", folder, name or "NAME")
    if entry is None:
        return None
    try:
        revoke(folder, entry.name)
    except ConsortiumError as err:
        logger.error("could not revoke %s in %s: %s", entry.name, folder, err)
    if ca_key_here(folder) is None:
        logger.error("%s", roster_offline_message(folder))
    return name


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(2048)  # connections queue from now on; uvicorn serves them once started
    sock.set_inheritable(True)
    return sock


def fresh_secret(path: Path) -> Path:
    """A new random SuperExec secret at ``path`` (0600, created with that mode)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_bytes(32))
    return path


def superexec_command(admin_port: int, secret: Path, ca_cert: str | None) -> list[str]:
    """``flower-superexec`` for ServerApp runs, on the loopback Runtime API."""
    exe = Path(sys.executable).parent / "flower-superexec"
    tls = ["--root-certificates", ca_cert] if ca_cert else ["--insecure"]
    return [str(exe) if exe.is_file() else "flower-superexec", *tls,
            "--runtime-api-address", f"127.0.0.1:{admin_port}",
            "--superexec-auth-secret-file", str(secret), "--parent-pid", str(os.getpid())]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.superlink_gate", add_help=False)
    parser.add_argument("--admin-port", type=int, required=True,
                        help="loopback port for the Control and Runtime APIs")
    parser.add_argument("--consortium", type=Path, required=True,
                        help="sync the node registry with this folder's enrolment list first; "
                             "the SuperExec secret is kept there")
    args, flower_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    secret = fresh_secret(Path(args.consortium) / SECRET_FILE)
    flower_args += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    import uvicorn

    # Flower's own parser and config: same flags, same checks as flower-superlink.
    app, config = flower_compat.superlink_app(flower_args)
    state = flower_compat.superlink_state(app)
    for line in sync_registry_state(state, args.consortium):
        logger.info("registry: %s", line)
    from server.consortium import load_coordinator_config

    gap_s = load_coordinator_config(args.consortium).second_session_gap_s
    flower_compat.recover_restarted_nodes(state, on_take_over=lambda node: logger.warning(
        "node %d reconnected while its previous SuperNode was still counted online (killed or "
        "restarted): taken over; what that process had received and not answered is answered "
        "as lost", node))
    sockets = [_bind(config.host, config.port), _bind("127.0.0.1", args.admin_port)]
    # The SuperExec retries until the Runtime API answers; it dies with this process.
    subprocess.Popen(superexec_command(args.admin_port, secret, config.ssl_ca_certfile),
                     preexec_fn=dies_with_this_process())  # noqa: PLW1509 - prctl only
    logger.info("%s: Fleet API on %s:%d; Control and Runtime APIs on 127.0.0.1:%d only",
                READY_LINE, config.host, config.port, args.admin_port)
    server = uvicorn.Server(uvicorn.Config(
        FleetOnly(flower_compat.SingleUseSignatures(
            app, state, functools.partial(refuse_stolen_key, args.consortium),
            watch=flower_compat.SecondSessionWatch(gap_s=gap_s)), config.port),
        log_config=flower_compat.uvicorn_log_config(),
        access_log=False, timeout_graceful_shutdown=3, ssl_keyfile=config.ssl_keyfile,
        ssl_certfile=config.ssl_certfile, workers=1))
    server.run(sockets=sockets)


if __name__ == "__main__":
    main()
