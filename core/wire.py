"""One array on the wire for a whole adapter: fewer objects for Flower's deployment transport.

Flower 1.42's deployment engine moves every ``Array`` of a message as its own object (one HTTP
request per hop: ServerApp -> SuperLink -> SuperNode -> ClientApp and back), so an adapter of
about a hundred tensors costs hundreds of requests per hospital per message. Packing concatenates
the tensors of the content's ``arrays`` record, in the record's order, into one 1-D array and
keeps their names and shapes in a ``ConfigRecord``; unpacking restores the same record exactly
(same names, order, shapes, dtype and values). The bytes are the same; only the object count
changes. Both ends use it: the coordinator's ``server.wire_grid.PackedWireGrid`` and the
hospital's ``client.wire.packed_wire_mod``.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

ARRAYS_KEY = "arrays"
LAYOUT_KEY = "arrays-layout"
PACKED_NAME = "packed"


def pack_content(content: RecordDict) -> bool:
    """Replace ``content["arrays"]`` by one packed array and its layout, in place.

    Returns:
        True when packed; False (content unchanged) when there is no ``arrays`` record, it is
        already packed, or its tensors do not share one dtype.
    """
    record = content.array_records.get(ARRAYS_KEY)
    if record is None or LAYOUT_KEY in content.config_records or len(record) < 2:
        return False
    tensors = [record[name].numpy() for name in record]
    if len({t.dtype for t in tensors}) != 1:
        return False
    layout = ConfigRecord({
        "names": list(record),
        "ndims": [int(t.ndim) for t in tensors],
        "shape": [int(d) for t in tensors for d in t.shape],
        "dtype": str(tensors[0].dtype),
    })
    flat = np.concatenate([t.reshape(-1) for t in tensors])
    content[ARRAYS_KEY] = ArrayRecord({PACKED_NAME: Array(flat)})
    content[LAYOUT_KEY] = layout
    return True


def unpack_content(content: RecordDict) -> bool:
    """Restore a packed ``content["arrays"]`` in place (see :func:`pack_content`).

    Returns:
        True when the content was packed (and is now restored), False when it was not.

    Raises:
        ValueError: the layout does not describe the packed array (names, ranks and shape
            lists of unequal lengths, or sizes that do not add up to its length).
    """
    layout = content.config_records.get(LAYOUT_KEY)
    if layout is None:
        return False
    record = content.array_records.get(ARRAYS_KEY)
    if record is None or list(record) != [PACKED_NAME]:
        raise ValueError(f"'{LAYOUT_KEY}' without a packed '{ARRAYS_KEY}' record")
    flat = record[PACKED_NAME].numpy()
    names, ndims, dims = list(layout["names"]), list(layout["ndims"]), list(layout["shape"])
    if len(names) != len(ndims) or sum(ndims) != len(dims) or flat.ndim != 1:
        raise ValueError(f"'{LAYOUT_KEY}' does not match: {len(names)} names, {len(ndims)} "
                         f"ranks, {len(dims)} dimensions")
    if str(flat.dtype) != layout["dtype"]:
        raise ValueError(f"packed array is {flat.dtype}, layout says {layout['dtype']}")
    shapes, start = [], 0
    for ndim in ndims:
        shapes.append(tuple(dims[start:start + ndim]))
        start += ndim
    sizes = [int(np.prod(s)) for s in shapes]
    if sum(sizes) != flat.size:
        raise ValueError(f"'{LAYOUT_KEY}' describes {sum(sizes)} values, the packed array has "
                         f"{flat.size}")
    restored, offset = ArrayRecord(), 0
    for name, shape, size in zip(names, shapes, sizes, strict=True):
        restored[name] = Array(np.ascontiguousarray(flat[offset:offset + size].reshape(shape)))
        offset += size
    content[ARRAYS_KEY] = restored
    del content[LAYOUT_KEY]
    return True
