"""Packed arrays on the wire: a whole ArrayRecord as two Arrays, unpacked to the same Arrays; malformed layouts
refused by name; the server's grid and the ClientApp's mod packing both ways."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from strategy_support import LoopbackGrid, set_task_identity

from flwr_nnunet.apps.packed_messages import PackedGrid, packed_arrays_mod
from flwr_nnunet.core.packed_arrays import (
    LAYOUT_KEY,
    PACKED_KEY,
    PackedArraysError,
    is_packed,
    pack_array_record,
    pack_content,
    unpack_array_record,
    unpack_content,
)

DTYPES = st.sampled_from([np.float32, np.float16, np.int64, np.uint8, np.bool_])
ARRAYS = hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
RECORDS = st.dictionaries(st.text(min_size=1, max_size=20).filter(lambda k: k not in (PACKED_KEY, LAYOUT_KEY)), ARRAYS)


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(value) for key, value in arrays.items()})


def _same(a: ArrayRecord, b: ArrayRecord) -> bool:
    return list(a.keys()) == list(b.keys()) and all(
        (x.dtype, tuple(x.shape), x.stype, x.data) == (y.dtype, tuple(y.shape), y.stype, y.data)
        for x, y in zip(a.values(), b.values(), strict=True)
    )


def _wire(content: RecordDict) -> RecordDict:
    """``content`` serialized as Flower sends it and read back."""
    return recorddict_from_proto(ProtoRecordDict.FromString(recorddict_to_proto(content).SerializeToString()))


@settings(max_examples=60, deadline=None)
@given(RECORDS)
def test_unpacking_gives_back_the_same_arrays_in_order(arrays):
    record = _record(arrays)
    packed = pack_array_record(record)
    assert is_packed(packed) or not arrays
    back = unpack_array_record(_wire(RecordDict({"a": packed}))["a"]) if arrays else packed
    assert _same(back, record)
    for key, value in arrays.items():
        np.testing.assert_array_equal(back[key].numpy(), value)


def _layout(entries) -> ArrayRecord:
    data = json.dumps(entries).encode() if not isinstance(entries, bytes) else entries
    packed = pack_array_record(_record({"w": np.arange(6, dtype=np.float32)}))
    layout = Array(dtype="uint8", shape=(len(data),), stype=packed[LAYOUT_KEY].stype, data=data)
    return ArrayRecord({PACKED_KEY: packed[PACKED_KEY], LAYOUT_KEY: layout})


@pytest.mark.parametrize(
    ("layout", "reason"),
    [
        (b"\xff{", "not JSON text"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON text"),  # nested past Python's recursion limit
        ({"w": 1}, "must be a list of entries"),
        ([["w", "float32", [6], "numpy.ndarray"]], "entry 0 must be"),
        ([["", "float32", [6], "numpy.ndarray", 152]], "the name must be a non-empty text"),
        ([[PACKED_KEY, "float32", [6], "numpy.ndarray", 152]], "the name must be a non-empty text"),
        ([["w", "float32", [-1], "numpy.ndarray", 152]], "the shape must be a list of edges >= 0"),
        ([["w", "float32", [6], "numpy.ndarray", -1]], "the length must be an integer >= 0"),
        ([["w", "float32", [6], "numpy.ndarray", 1.5]], "the length must be an integer >= 0"),
        ([["w", 3, [6], "numpy.ndarray", 152]], "dtype and stype must be texts"),
        ([["w", "float32", [6], "numpy.ndarray", 100]], "add up to 100 bytes, the packed array holds"),
        ([["w", "float32", [3], "numpy.ndarray", 76]] * 2, "names arrays more than once: ['w']"),
    ],
)
def test_a_malformed_layout_is_refused_by_name(layout, reason):
    with pytest.raises(PackedArraysError, match=None) as refused:
        unpack_array_record(_layout(layout))
    assert reason in str(refused.value)
    with pytest.raises(PackedArraysError, match="array record 'arrays'"):
        unpack_content(RecordDict({"arrays": _layout(layout)}))


def test_a_record_shared_by_many_messages_is_packed_once_and_other_records_pass_as_they_are():
    model, config = _record({"w": np.ones(4, np.float32)}), ConfigRecord({"server-round": 1})
    done = {}
    first = pack_content(RecordDict({"arrays": model, "config": config}), done=done)
    second = pack_content(RecordDict({"arrays": model, "config": config}), done=done)
    assert first["arrays"] is second["arrays"]  # one object for Flower: sent once
    assert first["config"] is config
    assert _same(unpack_content(first)["arrays"], model)


@pytest.fixture(autouse=True)
def _server_task() -> None:
    set_task_identity()


def _instruction(content: RecordDict, node: int = 7) -> Message:
    return Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def test_the_mod_unpacks_a_packed_instruction_and_packs_its_reply():
    model = _record({"w": np.arange(4, dtype=np.float32)})
    seen = {}

    def app(message, context):
        seen["arrays"] = message.content["arrays"]
        return Message(RecordDict({"arrays": message.content["arrays"]}), reply_to=message)

    reply = packed_arrays_mod(_instruction(pack_content(RecordDict({"arrays": model}))), _context(), app)
    assert _same(seen["arrays"], model)  # the app read the arrays as they were
    assert is_packed(reply.content["arrays"]) and _same(unpack_content(reply.content)["arrays"], model)
    plain = packed_arrays_mod(_instruction(RecordDict({"arrays": model})), _context(), app)
    assert _same(plain.content["arrays"], model)  # an instruction sent per tensor is answered per tensor


def test_the_mod_refuses_a_malformed_instruction_without_calling_the_app():
    def app(message, context):
        raise AssertionError("the app must not see it")

    bad = RecordDict({"arrays": _layout([["w", "float32", [6], "numpy.ndarray", 100]])})
    reply = packed_arrays_mod(_instruction(bad), _context(), app)
    assert reply.has_error() and "the server's instruction is refused" in reply.error.reason
    assert "add up to 100 bytes" in reply.error.reason


def test_the_grid_packs_instructions_unpacks_replies_and_turns_a_malformed_reply_into_an_error():
    model = _record({"w": np.arange(4, dtype=np.float32), "b": np.zeros(2, np.int64)})

    def answer(node, message):
        if node == 8:  # a site whose reply's layout is malformed
            return RecordDict({"arrays": _layout(b"[")})
        return _wire(message.content)  # echoes the packed model, as it came over the wire

    loopback = LoopbackGrid([7, 8], answer)
    grid = PackedGrid(loopback)
    assert grid.get_node_ids() == [7, 8]  # every other call goes to the grid
    messages = [_instruction(RecordDict({"arrays": model}), node) for node in (7, 8)]
    good, bad = grid.send_and_receive(messages, timeout=1.0)
    assert all(is_packed(m.content["arrays"]) for m in loopback.sent)
    assert loopback.sent[0].content["arrays"] is loopback.sent[1].content["arrays"]
    assert _same(good.content["arrays"], model)
    assert bad.has_error() and bad.metadata.src_node_id == 8
    assert "node 8: the reply's packed arrays are malformed" in bad.error.reason
