"""Reply validation: every malformed reply is rejected with a logged reason, never raised."""

from __future__ import annotations

import logging
import math
from collections import OrderedDict

import pytest
import torch
from flwr.app import Array, Error, Message
from flwr.app.message.message import make_message
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg
from strategy_support import canonical, metadata, perturbed, reply, tiny_network, tiny_plans

from flwr_nnunet import AliasMap, NnUNetFedAvg, to_array_record
from flwr_nnunet.nnunet.digests import plans_sha256
from flwr_nnunet.strategy.replies import AcceptedReply, Rejection, ReplyValidator, check_weight

PLANS = tiny_plans()


@pytest.fixture
def flwr_log():
    """Records of Flower's logger (it does not propagate to pytest's caplog)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


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
