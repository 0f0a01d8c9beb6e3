"""Reply validation: every malformed reply is rejected with a logged reason, never raised."""

from __future__ import annotations

import math
import time
from collections import OrderedDict

import pytest
import torch
from flwr.app import Array, ConfigRecord, Error, Message
from flwr.app.message.message import make_message
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg
from strategy_support import canonical, metadata, perturbed, reply, tiny_network, tiny_plans

from flwr_nnunet import AliasMap, NnUNetFedAvg, to_array_record
from flwr_nnunet.nnunet.digests import plans_sha256
from flwr_nnunet.strategy.replies import AcceptedReply, Rejection, check_weight
from flwr_nnunet.strategy.validator import ReplyValidator

PLANS = tiny_plans()


def _full_state_dict(tensors, amap: AliasMap) -> OrderedDict:
    """Every key, each a separate copy (as a per-key state_dict export sends it)."""
    return OrderedDict((k, tensors[amap.canonical_of(k)].clone()) for k in amap.keys)


def _malformed(base: OrderedDict, amap: AliasMap) -> dict[str, Message]:
    """One malformed reply per kind, node ids 100+."""
    first, conv = next(iter(base)), next(k for k, v in base.items() if v.dim() == 4)
    wrong_shape = OrderedDict(base)
    wrong_shape[conv] = torch.zeros(base[conv].shape[0] + 1, *base[conv].shape[1:])
    wrong_dtype = OrderedDict(base)
    wrong_dtype[conv] = base[conv].double()
    with_nan = OrderedDict((k, v.clone()) for k, v in base.items())
    with_nan[conv].view(-1)[3] = math.nan
    with_inf = OrderedDict((k, v.clone()) for k, v in base.items())
    with_inf[conv].view(-1)[5] = -math.inf
    missing = OrderedDict(list(base.items())[1:])
    extra = OrderedDict(base)
    extra["decoder.extra.weight"] = torch.zeros(2)
    undecodable = to_array_record(base)
    undecodable[first] = Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=b"\x93NUMPY garbage")
    conflicting = _full_state_dict(base, amap)
    alias = next(k for k in amap.keys if k != amap.canonical_of(k) and conflicting[k].dim() == 4)
    conflicting[alias] = conflicting[alias] + 1.0
    error_reply = make_message(metadata(115), error=Error(code=0, reason="CUDA out of memory"))
    two_metrics = reply(116, base, 10)
    two_metrics.content["more"] = two_metrics.content["metrics"].copy()
    no_arrays = reply(117, None, 10)
    return {
        "missing keys": reply(100, missing, 10),
        "extra keys": reply(101, extra, 10),
        "wrong shape": reply(102, wrong_shape, 10),
        "wrong dtype": reply(103, wrong_dtype, 10),
        "NaN": reply(104, with_nan, 10),
        "Inf": reply(105, with_inf, 10),
        "missing num-examples": reply(106, base, None),
        "non-numeric num-examples": reply(107, base, [1, 2]),
        "zero num-examples": reply(108, base, 0),
        "negative num-examples": reply(109, base, -3),
        "non-finite num-examples": reply(110, base, math.inf),
        "NaN num-examples": reply(111, base, math.nan),
        "other plans": reply(112, base, 10, config={"plans-sha256": plans_sha256(tiny_plans(norm="batch"))}),
        "undecodable payload": reply(113, undecodable, 10),
        "conflicting aliases": reply(114, conflicting, 10),
        "error reply": error_reply,
        "two MetricRecords": two_metrics,
        "no arrays": no_arrays,
    }


EXPECTED_REASON = {
    "missing keys": "missing",
    "extra keys": "unknown keys",
    "wrong shape": "shape",
    "wrong dtype": "dtype",
    "NaN": "NaN",
    "Inf": "Inf",
    "missing num-examples": "missing",
    "non-numeric num-examples": "not a number",
    "zero num-examples": "must be > 0",
    "negative num-examples": "must be > 0",
    "non-finite num-examples": "not finite",
    "NaN num-examples": "not finite",
    "other plans": "plans-sha256",
    "undecodable payload": "undecodable payload",
    "conflicting aliases": "hold different values",
    "error reply": "CUDA out of memory",
    "two MetricRecords": "exactly one MetricRecord",
    "no arrays": "no ArrayRecord",
}


def _strategy(configured: bool, **kwargs) -> NnUNetFedAvg:
    """NnUNetFedAvg on a tiny network.

    configured: as after configure_train, the sent record is at hand, so NaN/Inf are found in the aggregate
    (one pass over the replies) and rolled back; otherwise every reply is checked for NaN/Inf first.
    """
    strategy = NnUNetFedAvg(tiny_network(), plans=PLANS, **kwargs)
    if configured:
        strategy.model.record()
    return strategy


@pytest.mark.parametrize("configured", [False, True])
def test_each_malformed_reply_is_rejected_and_the_valid_ones_aggregated(flwr_log, configured):
    strategy = _strategy(configured, min_train_nodes=2)
    network = strategy.model.network
    amap = strategy.model.alias_map
    base = OrderedDict((k, v.clone()) for k, v in canonical(network).items())
    good = [perturbed(base, 1), perturbed(base, 2), perturbed(base, 3)]
    weights = [5, 7.5, 11]
    valid = [
        reply(1, good[0], weights[0], config={"plans-sha256": plans_sha256(PLANS)}),
        reply(2, good[1], weights[1], metrics={"train-loss": 0.5}),
        reply(3, _full_state_dict(good[2], amap), weights[2]),  # full state_dict, aliases agree: accepted
    ]
    bad = _malformed(base, amap)
    replies = [valid[0], *bad.values(), valid[1], valid[2]]

    arrays, _ = strategy.aggregate_train(1, replies)

    assert arrays is not None and list(arrays.keys()) == list(amap.canonical_keys)
    total = sum(weights)
    for key, target in canonical(network).items():
        expected = sum(w * g[key].double() for w, g in zip(weights, good)) / total
        torch.testing.assert_close(target.double(), expected, rtol=1e-6, atol=1e-7)
    rejections = [r.getMessage() for r in flwr_log if "rejected reply from node " in r.getMessage()]
    by_node = {line.split("rejected reply from node ")[1].split(":")[0]: line for line in rejections}
    assert len(rejections) == len(by_node) == len(bad)  # one line per rejected reply
    for kind, message in bad.items():
        assert EXPECTED_REASON[kind] in by_node[str(message.metadata.src_node_id)], kind
    assert any("aggregated 3 replies (nodes [1, 2, 3]" in r.getMessage() for r in flwr_log)


@pytest.mark.parametrize("configured", [False, True])
def test_all_bad_round_keeps_the_model_bit_identical(flwr_log, configured):
    strategy = _strategy(configured, min_train_nodes=1)
    network = strategy.model.network
    before = {k: v.clone() for k, v in network.state_dict().items()}
    bad = _malformed(OrderedDict((k, v.clone()) for k, v in canonical(network).items()), strategy.model.alias_map)

    assert strategy.aggregate_train(1, list(bad.values())) == (None, None)
    assert strategy.aggregate_train(2, []) == (None, None)

    for key, value in network.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert any("global model unchanged" in r.getMessage() for r in flwr_log)


def test_fewer_valid_replies_than_min_train_nodes_leave_the_model_unchanged():
    network = tiny_network()
    strategy = NnUNetFedAvg(network, min_train_nodes=3)
    base = canonical(network)
    before = {k: v.clone() for k, v in base.items()}
    replies = [reply(1, perturbed(base, 1)), reply(2, perturbed(base, 2)), reply(3, perturbed(base, 3), 0)]

    assert strategy.aggregate_train(1, replies) == (None, None)
    assert all(torch.equal(v, before[k]) for k, v in canonical(network).items())


def test_inconsistent_replies_that_end_a_flower_run_are_only_dropped():
    network = tiny_network()
    base = canonical(network)
    expected = perturbed(base, 1)
    replies = [reply(1, expected, 10), reply(2, OrderedDict(list(perturbed(base, 2).items())[1:]), 10)]
    with pytest.raises(InconsistentMessageReplies):
        FedAvg().aggregate_train(1, replies)

    strategy = NnUNetFedAvg(network, min_train_nodes=1)
    arrays, _ = strategy.aggregate_train(1, replies)

    assert arrays is not None
    assert all(torch.equal(v, expected[k]) for k, v in canonical(network).items())


def test_validator_results_and_weights():
    network = tiny_network(norm="batch")
    amap = AliasMap.from_module(network)
    reference = canonical(network)
    validator = ReplyValidator(amap, reference, plans_sha256="abc")
    update = perturbed(reference, 4)

    accepted = validator.check_train(reply(9, update, 3, config={"plans-sha256": "abc"}))
    assert isinstance(accepted, AcceptedReply)
    assert accepted.node_id == 9 and accepted.num_examples == 3.0
    tracked = next(k for k in reference if k.endswith("num_batches_tracked"))
    assert accepted.tensors[tracked].dtype == torch.int64 and int(accepted.tensors[tracked]) == 4
    assert all(torch.equal(accepted.tensors[k], update[k]) for k in reference)

    compiled = OrderedDict((f"_orig_mod.{k}", v) for k, v in update.items())  # a torch.compile'd client network
    assert isinstance(validator.check_train(reply(8, compiled, 3)), AcceptedReply)

    rejected = validator.check_train(reply(9, update, 3, config={"plans-sha256": "abd"}))
    assert isinstance(rejected, Rejection) and "nnUNetv2_preprocess" in rejected.reason

    evaluated = validator.check_evaluate(reply(4, None, 2, metrics={"dice": math.nan}))
    assert isinstance(evaluated, Rejection) and "'dice'" in evaluated.reason

    assert check_weight(True, "n") == "metric 'n' is a bool, not a number"
    assert check_weight(2, "n") is None


def test_load_global_refuses_bad_arrays_and_keeps_the_model():
    network = tiny_network()
    strategy = NnUNetFedAvg(network)
    base = canonical(network)
    before = {k: v.clone() for k, v in base.items()}
    bad = perturbed(base, 1)
    key = next(iter(bad))
    bad[key] = bad[key].clone()
    bad[key].view(-1)[0] = math.nan

    with pytest.raises(ValueError, match="NaN"):
        strategy.model.load_(to_array_record(bad))
    assert all(torch.equal(v, before[k]) for k, v in canonical(network).items())


# ------------------------------------------------------------ issue 10: hostile replies, one test per item


def _good(strategy: NnUNetFedAvg, nodes=(1, 2, 3), num_examples=10) -> list[Message]:
    base = canonical(strategy.model.network)
    return [reply(n, perturbed(base, n), num_examples) for n in nodes]


def _state(strategy: NnUNetFedAvg) -> dict:
    return {k: v.clone() for k, v in strategy.model.network.state_dict().items()}


def _lines(flwr_log) -> list[str]:
    return [r.getMessage() for r in flwr_log]


def test_weights_are_finite_positive_and_summed_in_float64(flwr_log):
    """Item 2: an integer weight beyond float range is a rejection, a sum that overflows float64 refuses the round."""
    strategy = _strategy(True, min_train_nodes=1)
    before = _state(strategy)
    assert "beyond float64's range" in check_weight(10**400, "num-examples")
    evaluated = strategy.validator.check_evaluate(reply(5, None, 10**400, metrics={"dice": 0.5}))
    assert isinstance(evaluated, Rejection) and "beyond float64's range" in evaluated.reason

    assert strategy.aggregate_train(1, _good(strategy, (1, 2), 1e308)) == (None, None)

    assert all(torch.equal(v, before[k]) for k, v in strategy.model.network.state_dict().items())
    assert any("sum to inf in float64" in line and "round refused" in line for line in _lines(flwr_log))
    arrays, _ = strategy.aggregate_train(
        2, [*_good(strategy, (1,)), reply(9, perturbed(canonical(tiny_network()), 9), 10**400)]
    )
    assert arrays is not None and any(
        "node 9: metric 'num-examples' is an integer" in line for line in _lines(flwr_log)
    )


def test_max_reply_weight_clips_each_reply(flwr_log):
    """Item 2: weights above the cap count as the cap (logged), in the in-place mean and in Flower's code."""
    capped = _strategy(True, min_train_nodes=1, max_reply_weight=10.0)
    plain = _strategy(True, min_train_nodes=1)
    replies = lambda s: [*_good(s, (1,), 1e308), *_good(s, (2,), 5)]
    expected = lambda s: [*_good(s, (1,), 10), *_good(s, (2,), 5)]

    capped.aggregate_train(1, replies(capped))
    plain.aggregate_train(1, expected(plain))

    assert all(torch.equal(v, plain.model.tensors[k]) for k, v in capped.model.tensors.items())
    assert any("node 1: weight 1e+308 clipped to max_reply_weight 10" in line for line in _lines(flwr_log))
    message = capped.valid_messages(2, replies(capped), is_train=True)[0]
    assert message.content["metrics"]["num-examples"] == 10.0
    with pytest.raises(ValueError, match="max_reply_weight"):
        NnUNetFedAvg(tiny_network(), max_reply_weight=math.inf)


def test_a_huge_error_reason_is_logged_truncated(flwr_log):
    """Item 6: a 10 MB reason becomes 500 characters plus its length; every rejection reason is bounded."""
    strategy = _strategy(True, min_train_nodes=1)
    huge = make_message(metadata(7), error=Error(code=0, reason="y" * 10_000_000))

    strategy.aggregate_train(1, [*_good(strategy, (1,)), huge])

    (line,) = [line for line in _lines(flwr_log) if "node 7" in line]
    assert len(line) < 700 and line.endswith("... (10000028 characters)")
    assert len(Rejection(1, "z" * 10**6).reason) < 600


def test_evaluation_metrics_are_range_checked_and_best_dice_never_out_of_range(flwr_log):
    """Item 7: dice outside [0, 1] (or any non-finite loss) is rejected; best_dice only takes values in [0, 1]."""
    strategy = _strategy(True, min_evaluate_nodes=1)
    validator = strategy.validator
    for metrics, reason in [
        ({"dice": 1e300}, "outside [0, 1]"),
        ({"dice": -0.5}, "outside [0, 1]"),
        ({"dice": 0.5, "dice-per-class": [0.5, 1.5]}, "'dice-per-class' holds 1.5"),
        ({"dice": 0.5, "val-loss": math.inf}, "'val-loss' is not finite"),
        ({"dice": 10**400}, "not a finite number"),
    ]:
        result = validator.check_evaluate(reply(4, None, 2, metrics=metrics))
        assert isinstance(result, Rejection) and reason in result.reason, metrics
    assert isinstance(
        validator.check_evaluate(reply(4, None, 2, metrics={"dice": 1.0, "val-loss": -0.7})), AcceptedReply
    )

    hostile = reply(5, None, 1000, metrics={"dice": 1e300}, message_type="evaluate")
    honest = reply(6, None, 2, metrics={"dice": 0.4}, message_type="evaluate")
    metrics = strategy.aggregate_evaluate(1, [hostile, honest])

    assert metrics["dice"] == pytest.approx(0.4) and strategy.checkpoints.best_dice == pytest.approx(0.4)
    for value in (1e300, math.nan, -1.0, True):
        strategy.checkpoints.note_dice(2, value)
    assert strategy.checkpoints.best_dice == pytest.approx(0.4)


def test_the_same_node_twice_in_a_round_counts_once(flwr_log):
    """Item 8: the first reply received from a node counts; a later one from it is rejected as a duplicate."""
    strategy, single = _strategy(True, min_train_nodes=1), _strategy(True, min_train_nodes=1)
    base = canonical(strategy.model.network)
    first, again = reply(1, perturbed(base, 1), 10), reply(1, perturbed(base, 50), 30)

    expected = [reply(1, perturbed(base, 1), 10), *_good(single, (2,))]
    strategy.aggregate_train(1, [first, *_good(strategy, (2,)), again])
    single.aggregate_train(1, expected)

    assert all(torch.equal(v, single.model.tensors[k]) for k, v in strategy.model.tensors.items())
    assert any("node 1: a second reply from this node in the round" in line for line in _lines(flwr_log))
    assert any("aggregated 2 replies (nodes [1, 2], total weight 20)" in line for line in _lines(flwr_log))


def test_a_superlink_reply_for_a_lost_node_names_that_node(flwr_log):
    """Item 9: the SuperLink's error reply (sender: the SuperLink, node 1) is logged under the node the instruction
    went to, found through reply_to_message_id; without message ids, under the one node that sent nothing."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
    from strategy_support import LoopbackGrid, set_task_identity

    set_task_identity()
    strategy = _strategy(True, min_train_nodes=1)
    grid = LoopbackGrid([21, 22, 23], handler=lambda node, message: None)
    sent = list(strategy.configure_train(1, None, ConfigRecord(), grid))
    for index, message in enumerate(sent):  # as InMemoryGrid.push_messages / GrpcGrid set them
        message.metadata.__dict__["_message_id"] = f"instruction-{index}"
    to_22 = next(m for m in sent if m.metadata.dst_node_id == 22)
    lost = create_message_error_unavailable_res_message(to_22.metadata, "node_unavail")
    assert lost.metadata.src_node_id == 1 and lost.metadata.reply_to_message_id == to_22.metadata.message_id

    strategy.aggregate_train(1, [*_good(strategy, (21, 23)), lost])

    line = next(line for line in _lines(flwr_log) if "rejected reply" in line)
    assert "rejected reply from node 22: the SuperLink answered for node 22" in line and "Node Unavailable" in line

    for message in sent:  # a grid that sets no ids: the node of the round that sent nothing
        message.metadata.__dict__["_message_id"] = ""
    flwr_log.clear()
    strategy.aggregate_train(2, [*_good(strategy, (21, 23)), lost])
    assert any("rejected reply from node 22: the SuperLink answered for node 22" in line for line in _lines(flwr_log))


def test_lost_nodes_through_flowers_own_grid_and_linkstate_are_named(flwr_log):
    """Item 9 end to end: Flower's InMemoryGrid sets the message ids on the strategy's own messages when it
    pushes them, and its InMemoryLinkState answers for nodes whose heartbeat lapsed with an error reply from the
    SuperLink (node 1) whose reply_to_message_id is the instruction's id: each is logged under its own node."""
    from typing import cast

    from flwr.proto.task_pb2 import Task
    from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = cast(InMemoryLinkState, factory.state())
    run = Run.create_empty(7)
    run.primary_task_id, run.federation_id = 99, NOOP_FEDERATION_ID
    state.run_ids[7] = RunRecord(run=run)
    state.task_store[99] = Task(task_id=99, run_id=7)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 99
    strategy = NnUNetFedAvg(tiny_network(), min_available_nodes=2, min_train_nodes=1)
    nodes = []
    for index in range(2):  # online for 2 s: sampled while online even on a busy machine (else Flower waits forever)
        nodes.append(state.create_node("aid", "owner", f"key-{index}".encode(), heartbeat_interval=2.0))
        state.activate_node(nodes[-1], heartbeat_interval=2.0)
    activated = time.monotonic()
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)

    messages = strategy.configure_train(1, None, ConfigRecord(), grid)
    time.sleep(max(0.0, 2.5 - (time.monotonic() - activated)))  # no heartbeats: both nodes are lost
    replies = list(grid.send_and_receive(messages, timeout=3))

    assert {r.metadata.src_node_id for r in replies} == {1} and all(r.has_error() for r in replies)
    assert strategy.aggregate_train(1, replies) == (None, None)
    for node in nodes:
        assert any(
            f"rejected reply from node {node}: the SuperLink answered for node {node}" in line
            and "Node Unavailable" in line
            for line in _lines(flwr_log)
        ), node
