"""Whether the hospital takes a coordinator's message at all, before any work: its run policy's
rules (:mod:`client.run_policy`), then, for an evaluation, its caps
(:mod:`client.evaluation_cap`). Both are read from the node config; a simulated hospital has no
run policy and takes every message.
"""

from __future__ import annotations

from flwr.app import Context, Error, Message

from client.evaluation_cap import admit_evaluation
from client.run_policy import RUN_REFUSAL_CODE, node_run_policy, run_refusal


def refuse_run(msg: Message, context: Context) -> Message | None:
    """An error reply if the node config's run policy refuses ``msg``'s run, else None.

    An ``evaluate`` message the policy allows is also counted against the evaluation caps
    (:mod:`client.evaluation_cap`) here, before any work, and refused past them.
    """
    policy = node_run_policy(context)
    if policy is None or not msg.has_content() or "config" not in msg.content.config_records:
        return None
    message_type = msg.metadata.message_type
    reason = run_refusal(policy, msg.content.config_records["config"], message_type)
    if not reason and message_type == "evaluate":
        reason = admit_evaluation(msg, context, policy)
    if not reason:
        return None
    return Message(Error(code=RUN_REFUSAL_CODE, reason=reason), reply_to=msg)
