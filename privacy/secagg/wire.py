"""Record names and value encodings of the protocol's messages.

Flower node ids are unsigned 64-bit; ConfigRecord integers travel as signed 64-bit, so node
ids travel as decimal strings.
"""

from __future__ import annotations

from collections.abc import Iterable

RECORD = "secagg"
"""ConfigRecord with the stage's protocol fields, both ways."""
MASKED = "masked"
"""ArrayRecord of the masked-input reply; its one array is :data:`VECTOR`."""
VECTOR = "vector"


def ids_out(nodes: Iterable[int]) -> list[str]:
    """Node ids as they travel."""
    return [str(int(n)) for n in nodes]


def ids_in(values: object) -> list[int]:
    """Node ids from the wire (raises ValueError on anything but a list of decimal strings)."""
    if not isinstance(values, list):
        raise ValueError("node id list expected")
    return [int(str(v)) for v in values]
