"""One ClientApp task at the hospital: Flower's ``run_clientapp``, but never code from a FAB.

Flower's ClientApp process installs the run's FAB (the Flower App the coordinator submitted)
into ``FLWR_HOME/apps`` and imports the ClientApp its ``pyproject.toml`` names, with the FAB's
folder first on ``sys.path``: whoever can submit a run would run code inside the hospital.
:func:`run_guarded_task` runs Flower's own task loop (pull the message, run the app, push the
reply and the task status) with three of its steps replaced:

* the FAB is never unpacked (no files of it on disk, nothing added to ``sys.path``);
* the app is always ``client.app:app`` of the medfed *installed at the hospital*, whatever the
  FAB names; runtime dependency installation is always off;
* before that, the run's app is checked against the hospital's run policy
  (``allowed_apps`` = FAB id and version, ``allowed_fab_sha256`` = the FAB's sha256, which is
  recomputed from the FAB's bytes here). A run the policy does not allow gets an error reply
  naming the rule, written to the egress audit log like every other reply.

And one step wrapped: pushing the reply. A reply that Flower's runtime made itself (the app
failed to load, or raised past every guard) carries the exception's text, which may name
files; it is replaced by a category-only error and written to the audit log before it is
pushed, so no reply leaves unlogged (:func:`_audited_push`).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from client.audit import audit_reply, is_audited

# Kept light: a fresh task process must pull its task from the SuperNode within Flower's
# launch deadline, so torch and the run policy (which imports the model registry) load after.

logger = logging.getLogger(__name__)

INSTALLED_APP = "client.app:app"
"""The only ClientApp a hospital runs: the one of the medfed installed there."""
APP_REFUSED = "refused the run's app"
"""Logged (with the run id and the reason) when the run policy refuses a run's app."""

_task: dict[str, Any] = {}
"""The task's run, FAB and context, as pulled from the SuperNode (one task per process)."""


class RefusingClientApp(ClientApp):
    """Answers every message with the run-policy refusal ``reason`` (audited), runs nothing."""

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason

    def __call__(self, message: Message, context: Context) -> Message:
        from client.run_policy import RUN_REFUSAL_CODE

        reply = Message(Error(code=RUN_REFUSAL_CODE, reason=self.reason), reply_to=message)
        audit_reply(message, reply, context)
        return reply


def installed_app_for(fab_id: str, fab_version: str, fab_hash: str, fab_content: bytes,
                      context: Context) -> ClientApp:
    """The ClientApp to run for a run of FAB ``fab_id`` ``fab_version``: the installed medfed's
    when the node's run policy allows that app, else a :class:`RefusingClientApp`."""
    from client.run_policy import RUN_POLICY_KEY, app_refusal, load_run_policy

    actual = hashlib.sha256(fab_content).hexdigest()
    policy_path = context.node_config.get(RUN_POLICY_KEY)
    if actual != fab_hash:
        reason = (f"run policy: the run's FAB does not hash to its declared sha256 "
                  f"{fab_hash[:16]}... (it is {actual[:16]}...)")
    elif not policy_path:
        reason = ("run policy 'allowed_apps': this hospital has no run policy (node config "
                  f"'{RUN_POLICY_KEY}'), so it takes part in no run")
    else:
        reason = app_refusal(load_run_policy(Path(str(policy_path))), fab_id, fab_version,
                             actual)
    if reason:
        logger.warning("run %s: %s: %s", context.run_id, APP_REFUSED, reason)
        return RefusingClientApp(reason)
    from client.app import app  # the installed package, never the FAB's folder

    return app


RUNTIME_FAILURE_REASON = ("flower-runtime: the hospital's ClientApp could not answer this "
                          "message; details in the hospital's log")
"""What the coordinator learns of a failure in Flower's task runtime (never its text)."""


def _pull_task_input_recording(original):
    def pull(client):
        message, context, run, fab = original(client)
        _task.update(run=run, fab=fab, context=context, message=message)
        return message, context, run, fab
    return pull


def _audited_push(original):
    """Flower's ``push_message``, but a reply not yet audited (made by Flower's runtime, not
    by the app) is first reduced to a category-only error and audited; if its line cannot
    be written, the exception stops the push (Flower logs it; nothing leaves)."""
    def push(client: Any, message: Message, context: Context) -> None:
        if not is_audited(message):
            request = _task.get("message")
            code = message.error.code if message.has_error() else 0
            logger.error("a reply made outside the ClientApp (code %s) is sent as a "
                         "category-only error", code)
            message = Message(Error(code=code, reason=RUNTIME_FAILURE_REASON),
                              reply_to=request) if request is not None else message
            audit_reply(request if request is not None else message, message, context)
        original(client, message, context)
    return push


def _never_install(*args: Any, **kwargs: Any) -> None:
    """Stands in for Flower's FAB installer: the FAB is never unpacked at the hospital."""


def _installed_app_loader(default_app_ref: str, app_path: str | None, multi_app: bool):
    """Stands in for Flower's loader factory (``get_load_client_app_fn``)."""
    del default_app_ref, app_path, multi_app

    def load(fab_id: str, fab_version: str, fab_hash: str) -> ClientApp:
        return installed_app_for(fab_id, fab_version, fab_hash, _task["fab"].content,
                                 _task["context"])
    return load


def guard_flower_runtime() -> None:
    """Replace, in Flower's ClientApp runtime module, FAB installation and app loading by
    :func:`installed_app_for` (idempotent; call it in the task process before the task)."""
    runtime = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    if getattr(runtime, "_medfed_guarded", False):
        return
    runtime.pull_task_input = _pull_task_input_recording(runtime.pull_task_input)
    runtime.install_from_fab = _never_install
    runtime.get_load_client_app_fn = _installed_app_loader
    runtime.push_message = _audited_push(runtime.push_message)
    runtime._medfed_guarded = True


def run_guarded_task(runtime_api_address: str, token: str, insecure: bool,
                     root_certificates_path: str | None, parent_pid: int | None) -> None:
    """One ClientApp task against the SuperNode's Runtime API, as ``flwr-clientapp`` runs it
    but with the installed medfed's ClientApp only (exits the process when done)."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    guard_flower_runtime()
    run_clientapp(
        runtime_api_address=runtime_api_address,
        token=token,
        insecure=insecure,
        certificates=validate_and_resolve_root_certificates(root_certificates_path, insecure),
        parent_pid=parent_pid,
        runtime_dependency_install=False,  # never install what a FAB asks for
    )
