"""NnUNetFedAvg on real nnU-Net networks: wire format, exact in-place aggregation, hooks, personalization."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from flwr.app import ConfigRecord, MessageType
from strategy_support import (
    LoopbackGrid,
    canonical,
    evaluate_reply,
    perturbed,
    received,
    reply,
    set_task_identity,
    tiny_network,
    tiny_plans,
)

from flwr_nnunet import AliasMap, NnUNetFedAvg, to_array_record
from flwr_nnunet.nnunet.digests import plans_sha256

PLANS = tiny_plans()


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def _snapshot(tensors):
    return OrderedDict((k, v.clone()) for k, v in tensors.items())


def _storages(network: torch.nn.Module) -> int:
    return len({v.untyped_storage().data_ptr() for v in network.state_dict().values()})


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_aggregate_equals_float64_weighted_mean_and_keeps_one_storage_per_group(norm):
    network = tiny_network(norm)
    amap = AliasMap.from_module(network)
    strategy = NnUNetFedAvg(network, plans=PLANS)
    base = _snapshot(canonical(network))
    updates = [perturbed(base, seed) for seed in (1, 2, 3, 4)]
    weights = [3, 1, 4.5, 9]

    arrays, metrics = strategy.aggregate_train(
        1, [reply(i + 1, u, w, metrics={"train-loss": float(i)}) for i, (u, w) in enumerate(zip(updates, weights))]
    )

    total = sum(weights)
    after = canonical(network)
    for key, value in after.items():
        reference = sum(w * u[key].double() for w, u in zip(weights, updates)) / total
        if value.is_floating_point():
            torch.testing.assert_close(value.double(), reference, rtol=1e-6, atol=1e-7)
        else:
            assert value.dtype == torch.int64 and torch.equal(value, reference.round().long()), key
    assert list(arrays.keys()) == list(amap.canonical_keys)
    assert all(torch.equal(torch.from_numpy(arrays[k].numpy()), after[k]) for k in after)
    assert _storages(network) == len(amap.groups) < len(amap.keys)
    assert AliasMap.from_module(network) == amap
    assert metrics["train-loss"] == pytest.approx(sum(w * i for i, w in enumerate(weights)) / total)


def test_configure_sends_canonical_tensors_alias_map_and_plans_digest():
    network = tiny_network()
    strategy = NnUNetFedAvg(network, plans=PLANS, min_available_nodes=3)
    grid = LoopbackGrid([11, 12, 13], handler=lambda node, message: None)

    train = list(strategy.configure_train(5, None, ConfigRecord({"local-epochs": 2}), grid))
    evaluate = list(strategy.configure_evaluate(5, None, ConfigRecord(), grid))

    assert sorted(m.metadata.dst_node_id for m in train) == [11, 12, 13]
    assert train[0].metadata.message_type == MessageType.TRAIN
    assert evaluate[0].metadata.message_type == MessageType.EVALUATE
    for message in (train[0], evaluate[0]):
        config = message.content["config"]
        assert AliasMap.from_json(config["alias-map"]) == strategy.model.alias_map
        assert config["plans-sha256"] == plans_sha256(PLANS)
        assert config["server-round"] == 5
        sent = received(message)
        assert list(sent) == list(strategy.model.alias_map.canonical_keys)
        assert all(torch.equal(sent[k], v) for k, v in canonical(network).items())
    assert train[0].content["config"]["local-epochs"] == 2


def test_initial_arrays_with_every_key_are_loaded_into_the_network():
    network = tiny_network(seed=0)
    other = tiny_network(seed=1)
    strategy = NnUNetFedAvg(network, min_available_nodes=1, min_train_nodes=1)
    grid = LoopbackGrid([1], handler=lambda node, message: None)

    messages = list(strategy.configure_train(1, to_array_record(other.state_dict()), ConfigRecord(), grid))

    assert all(torch.equal(v, other.state_dict()[k]) for k, v in network.state_dict().items())
    assert list(received(messages[0])) == list(strategy.model.alias_map.canonical_keys)
    assert _storages(network) == len(strategy.model.alias_map.groups)


def test_local_groups_stay_at_each_site_alias_consistently():
    network = tiny_network()
    strategy = NnUNetFedAvg(network, local_keys=lambda key: ".norm." in key, min_available_nodes=1, min_train_nodes=1)
    amap = strategy.model.alias_map
    local = set(strategy.model.local_groups)
    norm_aliases = [k for k in amap.keys if amap.canonical_of(k) in local]
    assert local and any(".all_modules.1." in k for k in norm_aliases)  # the alias of .norm. is local too
    grid = LoopbackGrid([1], handler=lambda node, message: None)
    message = next(iter(strategy.configure_train(1, None, ConfigRecord(), grid)))
    assert set(received(message)) == set(amap.canonical_keys) - local
    assert sorted(json.loads(message.content["config"]["local-keys"])) == sorted(local)

    before = _snapshot(canonical(network))
    full = perturbed(before, 1)  # a site may send every canonical key; its local groups are ignored
    arrays, _ = strategy.aggregate_train(1, [reply(1, full)])

    after = canonical(network)
    assert set(arrays.keys()) == set(amap.canonical_keys) - local
    for key in amap.canonical_keys:
        assert torch.equal(after[key], before[key] if key in local else full[key]), key


# --- documented example: a custom strategy in under 30 lines (keep in sync with documentation/strategies.md) ---
from flwr_nnunet import median_


class RobustDecoderFedAvg(NnUNetFedAvg):
    """Median for decoder groups, capped weighted mean for the rest."""

    def reduce_group_(self, key, target, values, weights):
        if key.startswith("decoder."):
            median_({key: target}, [{key: v} for v in values])
        else:
            super().reduce_group_(key, target, values, weights)

    def reply_weight(self, reply):
        return min(reply.num_examples, 100.0)  # no site outweighs 100 cases


def make_strategy(network, plans):
    return RobustDecoderFedAvg(
        network,
        plans=plans,
        local_keys=lambda key: ".norm." in key,  # FedBN: normalization stays local
        post_round_fn=lambda rnd, strategy: print(f"round {rnd} done, best Dice {strategy.checkpoints.best_dice}"),
        min_train_nodes=2,
    )


# --- end of documented example ------------------------------------------------------------------------------


def test_readme_custom_strategy(capsys):
    network = tiny_network()
    strategy = make_strategy(network, PLANS)
    before = _snapshot(canonical(network))
    updates = [perturbed(before, s) for s in (1, 2, 3)]
    examples = [50, 400, 100]  # capped to 50, 100, 100

    strategy.aggregate_train(1, [reply(i + 1, u, n) for i, (u, n) in enumerate(zip(updates, examples))])
    strategy.aggregate_evaluate(1, [evaluate_reply(1, 0.5), evaluate_reply(2, 0.75)])
    strategy.on_round_end(1)

    after = canonical(network)
    for key, value in after.items():
        stack = torch.stack([u[key].double() for u in updates])
        if key in strategy.model.local_groups:
            expected = before[key].double()
        elif key.startswith("decoder."):
            expected = stack.median(dim=0).values
        else:
            expected = (50 * stack[0] + 100 * stack[1] + 100 * stack[2]) / 250
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7)
    assert "round 1 done, best Dice 0.625" in capsys.readouterr().out


def test_valid_messages_are_canonical_replies_with_their_other_records():
    network = tiny_network()
    strategy = NnUNetFedAvg(network, min_train_nodes=1)
    amap = strategy.model.alias_map
    tensors = perturbed(_snapshot(canonical(network)), 1)
    full = OrderedDict((k, tensors[amap.canonical_of(k)]) for k in amap.keys)
    in_order = reply(1, tensors, 4, config={"site-name": "site-0"})
    every_key = reply(2, full, 4, config={"site-name": "site-1"})
    broken = reply(3, tensors, 0)
    compiled = reply(4, OrderedDict((f"_orig_mod.{k}", v) for k, v in tensors.items()), 4)

    valid = strategy.valid_messages(1, [in_order, every_key, broken, compiled], is_train=True)

    assert len(valid) == 3 and valid[0] is in_order and all(m is not broken for m in valid)
    assert list(valid[2].content["arrays"].keys()) == list(amap.canonical_keys)
    assert list(valid[1].content["arrays"].keys()) == list(amap.canonical_keys)
    assert valid[1].content["config"]["site-name"] == "site-1" and valid[1].content["metrics"]["num-examples"] == 4
    first = amap.canonical_keys[0]
    assert valid[1].content["arrays"][first].data is every_key.content["arrays"][first].data  # bytes not copied
