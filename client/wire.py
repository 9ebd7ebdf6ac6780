"""The hospital's side of ``core.wire``: a ClientApp mod that unpacks the coordinator's
packed adapter before the handlers run and packs the reply's adapter after them.

The handlers see the named tensors; what leaves is the same values concatenated, with their
names and shapes in the layout record, and that is what the egress audit (the mod around this
one) records.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from core.wire import pack_content, unpack_content


def packed_wire_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Unpack ``msg``'s adapter when the coordinator packed it; pack the reply's likewise."""
    packed = unpack_content(msg.content)
    reply = call_next(msg, context)
    if packed and not reply.has_error():
        pack_content(reply.content)
    return reply
