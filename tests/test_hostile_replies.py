"""Hostile replies through ``aggregate_train``: a table of kinds, each for every strategy it applies to.

For each kind and strategy: no exception escapes; a rejected reply leaves the
global model exactly as the honest replies alone make it (every tensor of
``network.state_dict()`` compared with ``torch.equal``), and a refused round
leaves it bit-identical to before; the log names the node and the reason; and
Python-side allocations during the call stay small (a header declaring 10**12
elements allocates nothing).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import tracemalloc
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.app.message.message import make_message
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from strategy_support import (
    LoopbackGrid,
    metadata,
    perturbed,
    received,
    reply,
    set_task_identity,
    tiny_plans,
)
from strategy_support import tiny_network as _tiny_network
from test_codec import F4, hostile

from flwr_nnunet import strategy_from_name, to_array_record
from flwr_nnunet.core.codec import decode_array, encode_tensor
from flwr_nnunet.core.delta_codec import BASE_KEY, COMPRESSION_KEY, SCALES_RECORD, encode_delta
from flwr_nnunet.core.quantize import SCHEMES
from flwr_nnunet.nnunet.digests import plans_sha256
from flwr_nnunet.strategy.replies import MAX_REASON_CHARS

HONEST = [11, 12, 13]
LOST = 150
NODES = [*HONEST, *range(100, 160)]
LOSS = {"train-loss": 0.5}
PEAK_BYTES = 32 << 20
PLANS = tiny_plans()

STRATEGIES: dict[str, Callable[[], object]] = {
    "fedavg": lambda: strategy_from_name("fedavg", network=_tiny_network(), plans=PLANS, min_train_nodes=2),
    "fedadam": lambda: strategy_from_name("fedadam", network=_tiny_network(), plans=PLANS, min_train_nodes=2),
    "qfedavg": lambda: strategy_from_name(
        "qfedavg", network=_tiny_network(), plans=PLANS, client_learning_rate=0.1, min_train_nodes=2
    ),
    "krum": lambda: strategy_from_name("krum", network=_tiny_network(), plans=PLANS, min_train_nodes=2),
    "dp": lambda: dp_strategy(),
}


def dp_strategy(**options):
    """FedAvg in server-side fixed-clipping DP without noise (a clip no honest reply reaches)."""
    return strategy_from_name(
        "fedavg",
        network=_tiny_network(),
        plans=PLANS,
        min_train_nodes=2,
        dp="server-fixed",
        dp_options={"noise_multiplier": 0.0, "clipping_norm": 100.0, "num_sampled_clients": 3},
        **options,
    )


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


@pytest.fixture(autouse=True, scope="module")
def _frozen_gc():
    """Flower's q-FedAvg calls gc.collect() per reply: freezing the objects alive so far keeps that fast."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def model_of(strategy):
    return getattr(strategy, "strategy", strategy).model


def configure(strategy) -> tuple[OrderedDict, dict[int, Message]]:
    """configure_train as a round starts; message ids set as Flower's InMemoryGrid.push_messages sets them."""
    grid = LoopbackGrid(NODES, handler=lambda node, message: None)
    messages = list(strategy.configure_train(1, None, ConfigRecord(), grid))
    for message in messages:
        message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    return received(messages[0]), {m.metadata.dst_node_id: m for m in messages}


def honest(sent: OrderedDict) -> list[Message]:
    return [reply(node, perturbed(sent, node, scale=0.05), 4, metrics=LOSS) for node in HONEST]


def state(strategy) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model_of(strategy).network.state_dict().items()}


def assert_same(model: dict, expected: dict) -> None:
    assert model.keys() == expected.keys()
    for key, value in model.items():
        assert torch.equal(value, expected[key]), key


# ---------------------------------------------------------------- the kinds

Context = tuple[OrderedDict, dict[int, Message]]  # (tensors sent, instruction by node)


def with_array(make_array: Callable[[OrderedDict, str], Array]) -> Callable[[Context, int], list[Message]]:
    """A reply whose first 4-d group is replaced by ``make_array(sent, key)``."""

    def build(context: Context, node: int) -> list[Message]:
        sent = context[0]
        key = next(k for k, v in sent.items() if v.dim() == 4)
        record = to_array_record(perturbed(sent, node))
        record[key] = make_array(sent, key)
        return [reply(node, record, 4, metrics=LOSS)]

    return build


def with_tensors(change: Callable[[OrderedDict], OrderedDict]) -> Callable[[Context, int], list[Message]]:
    def build(context: Context, node: int) -> list[Message]:
        return [reply(node, change(perturbed(context[0], node)), 4, metrics=LOSS)]

    return build


def with_metrics(num_examples: object = 4, **metrics: object) -> Callable[[Context, int], list[Message]]:
    def build(context: Context, node: int) -> list[Message]:
        values = {**LOSS, **{k.replace("_", "-"): v for k, v in metrics.items()}}
        return [reply(node, perturbed(context[0], node), num_examples, metrics=values)]

    return build


def first_conv(tensors: OrderedDict) -> str:
    return next(k for k, v in tensors.items() if v.dim() == 4)


def set_value(value: float) -> Callable[[OrderedDict], OrderedDict]:
    def change(tensors: OrderedDict) -> OrderedDict:
        tensors[first_conv(tensors)].view(-1)[3] = value
        return tensors

    return change


def replace(key_change: Callable[[OrderedDict], None]) -> Callable[[OrderedDict], OrderedDict]:
    def change(tensors: OrderedDict) -> OrderedDict:
        key_change(tensors)
        return tensors

    return change


def header(text: str, payload_bytes: int | None = None, **kwargs) -> Callable[[OrderedDict, str], Array]:
    def make(sent: OrderedDict, key: str) -> Array:
        shape = tuple(sent[key].shape)
        size = sent[key].numel() * 4 if payload_bytes is None else payload_bytes
        return hostile(text.replace("SHAPE", str(shape)), b"\0" * size, shape=shape, **kwargs)

    return make


def array_fields(**fields) -> Callable[[OrderedDict, str], Array]:
    def make(sent: OrderedDict, key: str) -> Array:
        good = to_array_record({key: sent[key]})[key]
        values = {"dtype": good.dtype, "shape": good.shape, "stype": good.stype, "data": good.data} | fields
        if callable(values["data"]):
            values["data"] = values["data"](good.data)
        return Array(**values)

    return make


def error_reply(reason: str) -> Callable[[Context, int], list[Message]]:
    def build(context: Context, node: int) -> list[Message]:
        return [make_message(metadata(node), error=Error(code=0, reason=reason))]

    return build


def superlink_reply(context: Context, node: int) -> list[Message]:
    """What Flower's SuperLink puts in the place of a lost node's reply (linkstate/utils.py)."""
    return [create_message_error_unavailable_res_message(context[1][LOST].metadata, "node_unavail")]


def duplicate(context: Context, node: int) -> list[Message]:
    """A second reply from the first honest node (after its honest one), carrying other values."""
    return [reply(HONEST[0], perturbed(context[0], 999), 4, metrics=LOSS)]


def two_metric_records(context: Context, node: int) -> list[Message]:
    message = reply(node, perturbed(context[0], node), 4, metrics=LOSS)
    message.content["more"] = message.content["metrics"].copy()
    return [message]


def no_metrics(context: Context, node: int) -> list[Message]:
    content = RecordDict({"arrays": to_array_record(perturbed(context[0], node))})
    return [make_message(metadata(node), content=content)]


def full_state_dict_conflict(context: Context, node: int) -> list[Message]:
    model = _tiny_network()
    from flwr_nnunet import AliasMap

    amap = AliasMap.from_module(model)
    tensors = perturbed(context[0], node)
    full = OrderedDict((k, tensors[amap.canonical_of(k)].clone()) for k in amap.keys)
    alias = next(k for k in amap.keys if k != amap.canonical_of(k) and full[k].dim() == 4)
    full[alias] += 1.0
    return [reply(node, full, 4, metrics=LOSS)]


def huge_weights(context: Context, node: int) -> list[Message]:
    """Two replies whose num-examples (1e308 each) are finite but sum to inf in float64."""
    return [reply(n, perturbed(context[0], n), 1e308, metrics=LOSS) for n in (node, node + 1)]


def huge_values(context: Context, node: int) -> list[Message]:
    """Finite but huge values (3e38 in float32): a server step on them overflows."""
    tensors = OrderedDict((k, torch.full_like(v, 3e38) if v.is_floating_point() else v) for k, v in context[0].items())
    return [reply(node, tensors, 4, metrics=LOSS)]


def unknown_error_code(context: Context, node: int) -> list[Message]:
    message = make_message(metadata(node), error=Error(code=10**6, reason="\n".join(["injected log line"] * 3)))
    return [message]


@dataclass(frozen=True)
class Kind:
    build: Callable[[Context, int], list[Message]]
    reason: str
    outcome: str = "rejected"  # "rejected": model as the honest replies alone make it; "refused": model unchanged;
    # "survives": the round aggregates and the model stays finite
    only: tuple[str, ...] = ()  # the strategies it applies to (all when empty)
    node: int | None = None  # the node the log must name (default: the hostile reply's)
    traced: bool = False  # also trace Python allocations (tracemalloc) during the call


_LONG = "x" * 10_000_000
KINDS: dict[str, Kind] = {
    # payloads (the codec's header check)
    "bad magic": Kind(with_array(array_fields(data=b"garbage" * 10)), "bad magic"),
    "truncated header": Kind(with_array(array_fields(data=lambda d: d[:12])), "truncated .npy header"),
    "short payload": Kind(with_array(array_fields(data=lambda d: d[:-4])), "payload bytes, but shape"),
    "trailing bytes": Kind(with_array(array_fields(data=lambda d: d + b"\0" * 8)), "payload bytes, but shape"),
    "object dtype": Kind(with_array(header("{'descr': '|O', 'fortran_order': False, 'shape': SHAPE}")), "numeric"),
    "structured dtype": Kind(
        with_array(header("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': SHAPE}")), "structured"
    ),
    "string dtype": Kind(with_array(header("{'descr': '<U1', 'fortran_order': False, 'shape': SHAPE}")), "numeric"),
    "float128 '<f16'": Kind(
        with_array(header("{'descr': '<f16', 'fortran_order': False, 'shape': SHAPE}", 1, dtype="float128")),
        "not carried",
    ),
    "complex64": Kind(with_array(header("{'descr': '<c8', 'fortran_order': False, 'shape': SHAPE}")), "not carried"),
    "65 dimensions": Kind(
        with_array(lambda s, k: hostile(F4 % ("(" + "1, " * 65 + ")",), b"\0" * 4, shape=(1,) * 65)), "65 dimensions"
    ),
    "bool in shape": Kind(with_array(lambda s, k: hostile(F4 % ("(True, 4)",), b"\0" * 16, shape=(1, 4))), "bad shape"),
    "negative dim": Kind(with_array(lambda s, k: hostile(F4 % ("(-4, -4)",), b"", shape=(4, 4))), "bad shape"),
    "float dim": Kind(with_array(lambda s, k: hostile(F4 % ("(4.0, 4)",), b"\0" * 64, shape=(4, 4))), "bad shape"),
    "10**12 elements, short payload": Kind(
        with_array(lambda s, k: hostile(F4 % ("(1000000, 1000000)",), b"\0" * 64, shape=(10**6, 10**6))),
        "needs 4000000000000",
        traced=True,
    ),
    "dims beyond int64": Kind(
        with_array(lambda s, k: hostile(F4 % (str((2**70, 2**70)),), b"", shape=(2**70, 2**70))),
        "2**63 - 1 bytes",
        traced=True,
    ),
    "1 MB header padding": Kind(
        with_array(header(F4.replace("%s", "SHAPE"), pad=1 << 20, version=2)), "longer than 10000", traced=True
    ),
    "unreadable header": Kind(with_array(lambda s, k: hostile("{'descr': __import__('os')}", b"")), "unreadable"),
    "extra header key": Kind(
        with_array(header("{'descr': '<f4', 'fortran_order': False, 'shape': SHAPE, 'x': 1}")), "exactly 'descr'"
    ),
    "fortran_order not bool": Kind(
        with_array(header("{'descr': '<f4', 'fortran_order': 'yes', 'shape': SHAPE}")), "bad fortran_order"
    ),
    "npy version 9": Kind(with_array(header(F4.replace("%s", "SHAPE"), version=9)), "version 9"),
    "Array.dtype mismatch": Kind(with_array(array_fields(dtype="int32")), "Array.dtype 'int32' differs"),
    "Array.shape mismatch": Kind(with_array(array_fields(shape=(1, 1, 1, 1))), "Array.shape (1, 1, 1, 1) differs"),
    "Array.dtype 10 KB": Kind(with_array(array_fields(dtype="f" * 10_000)), "not a dtype name", traced=True),
    "stype not numpy": Kind(with_array(array_fields(stype="torch.Tensor")), "serialization type"),
    "bfloat16 over float32 bits": Kind(with_array(array_fields(dtype="bfloat16")), "must hold '<u2'"),
    # tensors
    "missing keys": Kind(with_tensors(lambda t: OrderedDict(list(t.items())[1:])), "missing"),
    "extra keys": Kind(with_tensors(lambda t: OrderedDict(t, **{"decoder.extra": torch.zeros(2)})), "unknown keys"),
    "wrong shape": Kind(
        with_tensors(replace(lambda t: t.__setitem__(first_conv(t), torch.zeros(1, 1, 1, 1)))), "has shape"
    ),
    "wrong dtype": Kind(
        with_tensors(replace(lambda t: t.__setitem__(first_conv(t), t[first_conv(t)].double()))), "dtype"
    ),
    "NaN": Kind(with_tensors(set_value(math.nan)), "NaN"),
    "Inf": Kind(with_tensors(set_value(-math.inf)), "Inf"),
    "conflicting aliases": Kind(full_state_dict_conflict, "hold different values"),
    # records
    "no arrays": Kind(lambda c, n: [reply(n, None, 4, metrics=LOSS)], "no ArrayRecord"),
    "two MetricRecords": Kind(two_metric_records, "exactly one MetricRecord"),
    "no MetricRecord": Kind(no_metrics, "exactly one MetricRecord, got 0"),
    "other plans": Kind(
        lambda c, n: [
            reply(n, perturbed(c[0], n), 4, metrics=LOSS, config={"plans-sha256": plans_sha256(tiny_plans("batch"))})
        ],
        "plans-sha256",
    ),
    # errors and senders
    "error reply, 10 MB reason": Kind(error_reply(_LONG), "... (10000028 characters)", traced=True),
    "error reply, newlines": Kind(unknown_error_code, "injected log line\\ninjected"),
    "SuperLink reply for a lost node": Kind(superlink_reply, "the SuperLink answered for node 150", node=LOST),
    "duplicate node id": Kind(duplicate, "only the first one counts", node=HONEST[0]),
    # weights
    "missing num-examples": Kind(with_metrics(None), "missing"),
    "list num-examples": Kind(with_metrics([1, 2]), "not a number"),
    "zero num-examples": Kind(with_metrics(0), "must be > 0"),
    "negative num-examples": Kind(with_metrics(-3), "must be > 0"),
    "inf num-examples": Kind(with_metrics(math.inf), "not finite"),
    "NaN num-examples": Kind(with_metrics(math.nan), "not finite"),
    "num-examples 10**400": Kind(with_metrics(10**400), "beyond float64's range"),
    "weights summing to inf": Kind(huge_weights, "sum to inf in float64", outcome="refused"),
    # metrics
    "NaN train loss": Kind(with_metrics(train_loss=math.nan), "'train-loss'"),
    "train loss 10**400": Kind(with_metrics(train_loss=10**400), "'train-loss'"),
    "pseudo-dice 1e300": Kind(with_metrics(pseudo_dice=1e300), "outside [0, 1]"),
    "negative pseudo-dice": Kind(with_metrics(pseudo_dice_per_class=[0.5, -0.1]), "outside [0, 1]"),
    "list pseudo-dice": Kind(with_metrics(pseudo_dice=[0.5, 0.7]), "'pseudo-dice' must be a number, not a list"),
    # finite but huge values: only the strategies whose step cannot hold them refuse the round
    "3e38 values": Kind(huge_values, " Inf values", outcome="refused", only=("fedadam", "qfedavg")),
    "3e38 values, finite mean": Kind(huge_values, "", outcome="survives", only=("fedavg", "krum", "dp")),
    "10 MB key name": Kind(
        with_tensors(lambda t: OrderedDict(t, **{"k" * 10_000_000: torch.zeros(1)})), "unknown keys", traced=True
    ),
}
assert len(KINDS) >= 40

CASES = [
    pytest.param(kind, name, id=f"{kind}-{name}")
    for kind, spec in KINDS.items()
    for name in STRATEGIES
    if not spec.only or name in spec.only
]

_reference: dict[str, dict[str, torch.Tensor]] = {}


def _resident_bytes() -> int:
    """The process's resident set size."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def honest_result(name: str) -> dict[str, torch.Tensor]:
    """The model after one round of the honest replies alone (computed once per strategy)."""
    if name not in _reference:
        strategy = STRATEGIES[name]()
        sent, _ = configure(strategy)
        arrays, _ = strategy.aggregate_train(1, honest(sent))
        assert arrays is not None
        _reference[name] = state(strategy)
    return _reference[name]


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_a_hostile_reply_never_escapes_and_never_touches_the_model(flwr_log, kind, name):
    spec = KINDS[kind]
    strategy = STRATEGIES[name]()
    sent, instructions = configure(strategy)
    before = state(strategy)
    replies = honest(sent)
    hostile_replies = spec.build((sent, instructions), 100)
    replies = [replies[0], *hostile_replies, *replies[1:]]

    resident = _resident_bytes()
    if spec.traced:
        tracemalloc.start()
    try:
        arrays, _ = strategy.aggregate_train(1, replies)
        peak = tracemalloc.get_traced_memory()[1] if spec.traced else 0
    finally:
        tracemalloc.stop()

    assert peak < PEAK_BYTES, f"{peak / 1e6:.1f} MB allocated"
    assert _resident_bytes() - resident < 2 * PEAK_BYTES
    lines = [r.getMessage() for r in flwr_log]
    if spec.outcome == "survives":  # not a bad reply for this strategy: the round goes on, the model stays finite
        assert arrays is not None
        assert all(torch.isfinite(v).all() for v in state(strategy).values() if v.is_floating_point())
        return
    if spec.outcome == "refused":
        assert arrays is None
        assert_same(state(strategy), before)
        assert any(spec.reason in line and ("unchanged" in line or "refused" in line) for line in lines), lines
        return
    assert arrays is not None
    assert_same(state(strategy), honest_result(name))
    node = spec.node if spec.node is not None else hostile_replies[0].metadata.src_node_id
    rejections = [line for line in lines if f"rejected reply from node {node}: " in line]
    assert rejections and any(spec.reason in line for line in rejections), lines
    assert all(len(line) < MAX_REASON_CHARS + 300 for line in lines)
    assert all("\n" not in line for line in rejections)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_round_of_hostile_replies_only_leaves_the_model_bit_identical(flwr_log, name):
    strategy = STRATEGIES[name]()
    sent, instructions = configure(strategy)
    before = state(strategy)
    replies = []
    for index, (kind, spec) in enumerate(KINDS.items()):
        if spec.outcome == "rejected" and spec.node is None:  # the others are not rejections (or need honest nodes)
            replies += spec.build((sent, instructions), 200 + index)

    assert strategy.aggregate_train(1, replies) == (None, None)

    assert_same(state(strategy), before)
    rejected = {
        line.split("rejected reply from node ")[1].split(":")[0]
        for line in map(logging.LogRecord.getMessage, flwr_log)
        if "rejected reply from node " in line
    }
    assert len(rejected) == len(replies)


EVALUATING = sorted(STRATEGIES)


@pytest.mark.parametrize("name", EVALUATING)
def test_an_evaluation_reply_with_a_list_dice_is_rejected(flwr_log, name):
    """``dice`` is one number (the lists are ``dice-per-class``): such a reply is not aggregated as a list."""
    strategy = STRATEGIES[name]()
    before = state(strategy)
    honest_replies = [
        reply(node, None, 4, metrics={"dice": dice}, message_type=MessageType.EVALUATE)
        for node, dice in zip(HONEST, (0.2, 0.4, 0.6), strict=True)
    ]
    hostile_reply = reply(100, None, 4, metrics={"dice": [0.9, 0.9]}, message_type=MessageType.EVALUATE)

    metrics = strategy.aggregate_evaluate(1, [honest_replies[0], hostile_reply, *honest_replies[1:]])

    assert metrics["dice"] == pytest.approx(0.4)
    assert_same(state(strategy), before)
    lines = [r.getMessage() for r in flwr_log]
    assert any(
        "rejected reply from node 100: " in line and "'dice' must be a number, not a list" in line for line in lines
    )


# ------------------------------------------------- compressed replies (run-config compression)

COMPRESSED = {
    f"{name} {scheme}": (lambda make=make, scheme=scheme: make(compression=scheme))
    for scheme in ("int8-block", "int3-block")
    for name, make in (
        (
            "fedavg",
            lambda **options: strategy_from_name(
                "fedavg", network=_tiny_network(), plans=PLANS, min_train_nodes=2, **options
            ),
        ),
        ("dp", dp_strategy),
    )
}


def compressed_reply(strategy, sent: OrderedDict, node: int, **change) -> Message:
    """A site's compressed reply (its update ``perturbed - sent``) in the scheme of ``strategy``'s run (int8-block
    if it has none), with ``change``: records or config replaced; a callable gets the honest array of
    :data:`KEY` (codes or scales) as a tensor."""
    scheme = sender(strategy).scheme if sender(strategy) is not None else SCHEMES["int8-block"]
    (codes, scales), _ = encode_delta(perturbed(sent, node, scale=0.05), sent, scheme)
    codes, scales = OrderedDict(codes.items()), OrderedDict(scales.items())
    for record, replaced in ((codes, change.get("codes", {})), (scales, change.get("scales", {}))):
        honest = decode_array(record[KEY]).clone()
        for name, make in replaced.items():
            record[name] = make(honest) if callable(make) else make
    digest = sender(strategy).digest if sender(strategy) is not None else ""
    config = {COMPRESSION_KEY: scheme.name, BASE_KEY: digest}
    config.update(change.get("config", {}))
    message = reply(node, ArrayRecord(codes), 4, metrics=LOSS, config=config)
    if not change.get("no scales"):
        message.content[SCALES_RECORD] = ArrayRecord(scales)
    return message


def sender(strategy):
    return getattr(strategy, "strategy", strategy).model_sender


def scale_at_end(value: float) -> Callable[[torch.Tensor], Array]:
    return lambda scales: encode_tensor(torch.cat((scales[:-1], torch.tensor([value]))))


def first_code_minus_qmax_minus_1(packed: torch.Tensor) -> Array:
    """Packed codes whose first is ``-qmax - 1`` (stored as 0: the low bits of the first byte)."""
    packed[0] &= 0xF8
    return encode_tensor(packed)


KEY = "encoder.stages.0.0.convs.0.conv.weight"
COMPRESSED_KINDS: dict[str, tuple[dict, str]] = {
    "too few block scales": ({"scales": {KEY: lambda s: encode_tensor(s[:-1])}}, "block scales"),
    "too many block scales": ({"scales": {KEY: lambda s: encode_tensor(torch.cat((s, s)))}}, "block scales"),
    "NaN scale": ({"scales": {KEY: scale_at_end(math.nan)}}, "NaN or Inf"),
    "Inf scale": ({"scales": {KEY: scale_at_end(math.inf)}}, "NaN or Inf"),
    "huge scale": ({"scales": {KEY: scale_at_end(1e30)}}, "block scales must be in [0, 1e+06]"),
    "negative scale": ({"scales": {KEY: scale_at_end(-1.0)}}, "block scales must be in"),
    "float64 scales": ({"scales": {KEY: lambda s: encode_tensor(s.double())}}, "float32 block scales"),
    "extra array": (
        {"codes": {"decoder.extra": encode_tensor(torch.zeros(2, dtype=torch.int8))}},
        "record 'arrays' holds",
    ),
    "no scales record": ({"no scales": True}, "record 'scales' holds 0 arrays"),
    "bad .npy in codes": (
        {"codes": {KEY: Array(dtype="int8", shape=(1,), stype="numpy.ndarray", data=b"garbage")}},
        "bad magic",
    ),
    "update from another model": ({"config": {BASE_KEY: "0" * 64}}, "not from the model sent this round"),
    "another scheme": ({"config": {COMPRESSION_KEY: "int4-block"}}, "compressed with 'int4-block'"),
    "unknown scheme": ({"config": {COMPRESSION_KEY: "zip"}}, "compressed with 'zip'"),
}
"""Hostile changes of any blockwise scheme's reply, and the reason each is refused with."""
CODE_KINDS: dict[str, dict[str, tuple[dict, str]]] = {
    "int8-block": {
        "codes of another shape": ({"codes": {KEY: lambda c: encode_tensor(c.reshape(-1))}}, "int8 codes of shape"),
        "float32 codes": ({"codes": {KEY: lambda c: encode_tensor(c.float())}}, "int8 codes of shape"),
        "int16 codes": ({"codes": {KEY: lambda c: encode_tensor(c.to(torch.int16))}}, "int8 codes"),
        "code -128": ({"codes": {KEY: lambda c: encode_tensor(c.fill_(-128))}}, "outside [-127, 127]"),
    },
    "int3-block": {
        "codes of another shape": (
            {"codes": {KEY: lambda c: encode_tensor(c.reshape(3, -1))}},
            "uint8 bytes of 3-bit codes",
        ),
        "one byte short": ({"codes": {KEY: lambda c: encode_tensor(c[:-1])}}, "uint8 bytes of 3-bit codes"),
        "int8 bytes": ({"codes": {KEY: lambda c: encode_tensor(c.to(torch.int8))}}, "uint8 bytes of 3-bit codes"),
        "code -4": ({"codes": {KEY: first_code_minus_qmax_minus_1}}, "outside [-3, 3]"),
    },
}
"""Hostile codes of each scheme, and the reason each is refused with."""


def kinds_of(name: str) -> dict[str, tuple[dict, str]]:
    """The hostile kinds for the strategy ``name`` of :data:`COMPRESSED`: its scheme's codes, and every other."""
    return {**COMPRESSED_KINDS, **CODE_KINDS[name.split()[1]]}


def honest_compressed(strategy, sent: OrderedDict) -> list[Message]:
    return [compressed_reply(strategy, sent, node) for node in HONEST]


_compressed_reference: dict[str, dict[str, torch.Tensor]] = {}


def honest_compressed_result(name: str) -> dict[str, torch.Tensor]:
    if name not in _compressed_reference:
        strategy = COMPRESSED[name]()
        sent, _ = configure(strategy)
        assert strategy.aggregate_train(1, honest_compressed(strategy, sent))[0] is not None
        _compressed_reference[name] = state(strategy)
    return _compressed_reference[name]


@pytest.mark.parametrize(
    ("name", "kind"), [(name, kind) for name in sorted(COMPRESSED) for kind in sorted(kinds_of(name))]
)
def test_a_hostile_compressed_reply_is_refused_with_its_reason(flwr_log, kind, name):
    change, reason = kinds_of(name)[kind]
    strategy = COMPRESSED[name]()
    sent, _ = configure(strategy)
    replies = honest_compressed(strategy, sent)
    replies.insert(1, compressed_reply(strategy, sent, 100, **change))

    arrays, _ = strategy.aggregate_train(1, replies)

    assert arrays is not None
    assert_same(state(strategy), honest_compressed_result(name))  # as the honest replies alone make it
    rejections = [r.getMessage() for r in flwr_log if "rejected reply from node 100: " in r.getMessage()]
    assert rejections and reason in rejections[0], rejections


def test_a_compressed_reply_to_an_uncompressed_run_is_refused(flwr_log):
    strategy = STRATEGIES["fedavg"]()
    sent, _ = configure(strategy)
    replies = honest(sent)
    replies.insert(1, compressed_reply(strategy, sent, 100))
    before = honest_result("fedavg")

    assert strategy.aggregate_train(1, replies)[0] is not None

    assert_same(state(strategy), before)
    assert any("compression is none" in r.getMessage() for r in flwr_log)


@pytest.mark.parametrize("name", sorted(COMPRESSED))
def test_a_round_of_hostile_compressed_replies_only_leaves_the_model_bit_identical(flwr_log, name):
    strategy = COMPRESSED[name]()
    sent, _ = configure(strategy)
    before = state(strategy)
    replies = [
        compressed_reply(strategy, sent, 200 + i, **change) for i, (change, _) in enumerate(kinds_of(name).values())
    ]

    assert strategy.aggregate_train(1, replies) == (None, None)

    assert_same(state(strategy), before)
    assert sum("rejected reply from node 2" in r.getMessage() for r in flwr_log) == len(replies)
