"""A whole ArrayRecord as two Arrays: fewer objects for Flower's transport to move, the same arrays at the end.

Flower 1.42 moves a message as a tree of content-addressed objects, one request
each between the SuperLink, a SuperNode and its ClientApp process: every Array
is an object, and so is each 5 MB chunk of it. An nnU-Net network's canonical
tensors (88 for the 2D demo, a few hundred for a ResEnc network) make a model
message about twice as many requests, which cost a ClientApp process 1.2 to 1.5 s
to pull on a 2-core machine, more than the round's own work. Packed, the
record's arrays travel back to back in one Array (:data:`PACKED_KEY`), with each
array's name, dtype, shape, stype and length in a second one, JSON
(:data:`LAYOUT_KEY`): a few objects plus the chunks. Unpacking gives back the
same Arrays, byte for byte and in order, so everything downstream reads what it
read before. What packing gives up is deduplication per tensor: two equal
tensors in flight are sent twice, where Flower would have sent one of them
(equal whole records, such as one global model sent to every site, still
travel once).

:func:`unpack_array_record` checks a peer's layout before it slices a byte: a
malformed one raises :class:`PackedArraysError`, naming what is wrong.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

from flwr.app import Array, ArrayRecord, RecordDict

from flwr_nnunet.errors import FlwrNnUNetError

__all__ = [
    "LAYOUT_KEY",
    "PACKED_KEY",
    "PackedArraysError",
    "is_packed",
    "pack_array_record",
    "pack_content",
    "unpack_array_record",
    "unpack_content",
]

PACKED_KEY = "flwr-nnunet.packed"
LAYOUT_KEY = "flwr-nnunet.layout"
PACKED_STYPE = "flwr-nnunet/packed-bytes"
LAYOUT_STYPE = "flwr-nnunet/layout+json"
MAX_LAYOUT_BYTES = 16 * 1024 * 1024
"""A layout's bound: about 100 bytes an array, for 100,000 arrays and more."""


class PackedArraysError(FlwrNnUNetError, ValueError):
    """A packed ArrayRecord that cannot be unpacked as it claims (the reason names what)."""


def is_packed(record: ArrayRecord) -> bool:
    """Whether ``record`` is :func:`pack_array_record`'s form (exactly its two keys)."""
    return set(record.keys()) == {PACKED_KEY, LAYOUT_KEY}


def _bytes_array(data: bytes, stype: str) -> Array:
    return Array(dtype="uint8", shape=(len(data),), stype=stype, data=data)


def pack_array_record(record: ArrayRecord) -> ArrayRecord:
    """``record``'s arrays back to back in one Array, their layout in another (an empty record stays empty)."""
    if not record:
        return record
    layout = [[key, array.dtype, list(array.shape), array.stype, len(array.data)] for key, array in record.items()]
    packed = b"".join(array.data for array in record.values())
    text = json.dumps(layout, separators=(",", ":")).encode()
    return ArrayRecord(
        {PACKED_KEY: _bytes_array(packed, PACKED_STYPE), LAYOUT_KEY: _bytes_array(text, LAYOUT_STYPE)},
        keep_input=True,
    )


def _entry(item: Any, index: int) -> tuple[str, str, list[int], str, int]:
    """One checked layout entry: name, dtype, shape, stype, byte length."""
    if not (isinstance(item, list) and len(item) == 5):
        raise PackedArraysError(f"layout entry {index} must be [name, dtype, shape, stype, length], not {item!r:.80}")
    name, dtype, shape, stype, length = item
    if not (isinstance(name, str) and name) or name in (PACKED_KEY, LAYOUT_KEY):
        raise PackedArraysError(f"layout entry {index}: the name must be a non-empty text, not {name!r:.80}")
    if not (isinstance(dtype, str) and isinstance(stype, str)):
        raise PackedArraysError(f"layout entry {index} ({name!r}): dtype and stype must be texts")
    if not (isinstance(shape, list) and all(type(edge) is int and edge >= 0 for edge in shape)):
        raise PackedArraysError(f"layout entry {index} ({name!r}): the shape must be a list of edges >= 0")
    if not (type(length) is int and length >= 0):
        raise PackedArraysError(f"layout entry {index} ({name!r}): the length must be an integer >= 0")
    return name, dtype, shape, stype, length


def _layout(record: ArrayRecord) -> list[tuple[str, str, list[int], str, int]]:
    array = record[LAYOUT_KEY]
    if array.stype != LAYOUT_STYPE or len(array.data) > MAX_LAYOUT_BYTES:
        raise PackedArraysError(
            f"the layout must be stype {LAYOUT_STYPE!r} of at most {MAX_LAYOUT_BYTES} bytes "
            f"(got {array.stype!r}, {len(array.data)} bytes)"
        )
    try:
        items = json.loads(array.data.decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # RecursionError: nested past Python's limit
        raise PackedArraysError(f"the layout is not JSON text of entries ({type(error).__name__}: {error})") from None
    if not isinstance(items, list):
        raise PackedArraysError(f"the layout must be a list of entries, not {type(items).__name__}")
    entries = [_entry(item, index) for index, item in enumerate(items)]
    names = [entry[0] for entry in entries]
    if len(set(names)) != len(names):
        repeated = sorted({name for name in names if names.count(name) > 1})
        raise PackedArraysError(f"the layout names arrays more than once: {repeated[:5]}")
    return entries


def unpack_array_record(record: ArrayRecord) -> ArrayRecord:
    """The ArrayRecord that :func:`pack_array_record` packed into ``record``: the same arrays, in order.

    Raises
    ------
    PackedArraysError
        The layout is not a list of ``[name, dtype, shape, stype, length]`` entries with unique names, or the
        lengths do not add up to the packed bytes.
    """
    entries = _layout(record)
    packed = record[PACKED_KEY]
    if packed.stype != PACKED_STYPE:
        raise PackedArraysError(f"the packed bytes must be stype {PACKED_STYPE!r}, not {packed.stype!r}")
    data = packed.data
    total = sum(entry[4] for entry in entries)
    if total != len(data):
        raise PackedArraysError(f"the layout's lengths add up to {total} bytes, the packed array holds {len(data)}")
    arrays: OrderedDict[str, Array] = OrderedDict()
    start = 0
    for name, dtype, shape, stype, length in entries:
        arrays[name] = Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data[start : start + length])
        start += length
    return ArrayRecord(arrays, keep_input=True)


def pack_content(content: RecordDict, *, done: dict[int, tuple[ArrayRecord, ArrayRecord]] | None = None) -> RecordDict:
    """``content`` with each ArrayRecord packed (:func:`pack_array_record`); its other records as they are.

    ``done`` (id of a record -> the record and its packed form) carries the records packed so far across calls:
    a record that many messages share (one global model for every node) is packed once, into one object.
    """
    done = {} if done is None else done
    records = {}
    for key, record in content.items():
        if isinstance(record, ArrayRecord):
            if id(record) not in done:  # the record itself is kept in ``done``: its id stays its own
                done[id(record)] = (record, pack_array_record(record))
            record = done[id(record)][1]
        records[key] = record
    return RecordDict(records)


def unpack_content(content: RecordDict) -> RecordDict:
    """``content`` with each packed ArrayRecord unpacked (:func:`unpack_array_record`); the rest as it is.

    Raises
    ------
    PackedArraysError
        A packed record's layout is malformed (the message names the record).
    """
    unpacked = {}
    for key, record in content.items():
        if isinstance(record, ArrayRecord) and is_packed(record):
            try:
                record = unpack_array_record(record)
            except PackedArraysError as error:
                raise PackedArraysError(f"array record {key!r}: {error}") from None
        unpacked[key] = record
    return RecordDict(unpacked)
