"""The alias-aware family: every Flower built-in strategy (and the DP wrappers) on an nnU-Net network."""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from flwr.serverapp import strategy as flower
from strategy_support import LoopbackGrid, canonical, perturbed, received, reply, set_task_identity, tiny_network

from flwr_nnunet import AliasMap, from_array_record, strategy_from_name
from flwr_nnunet.strategy.privacy import NnUNetDPServerSideFixedClipping
from flwr_nnunet.strategy.registry import DP_WRAPPERS, STRATEGIES

NODES = [21, 22, 23, 24]
EXTRA = {"qfedavg": {"client_learning_rate": 0.1}, "fedtrimmedavg": {"beta": 0.25}}


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def _grid() -> LoopbackGrid:
    return LoopbackGrid(NODES, handler=lambda node, message: None)


def _replies(sent: OrderedDict, server_round: int, nodes=NODES) -> list:
    """Fresh replies (Flower's strategies consume them): the sent tensors moved by seeded steps."""
    return [
        reply(node, perturbed(sent, 100 * server_round + node, scale=0.05), 2 + i, metrics={"train-loss": 0.5 + i})
        for i, node in enumerate(nodes)
    ]


def _storages(network: torch.nn.Module) -> int:
    return len({v.untyped_storage().data_ptr() for v in network.state_dict().values()})


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_runs_a_round_and_keeps_aliases_shared(name):
    network = tiny_network(norm="batch")
    amap = AliasMap.from_module(network)
    strategy = strategy_from_name(name, network=network, **EXTRA.get(name, {}))
    before = OrderedDict((k, v.clone()) for k, v in canonical(network).items())

    message = next(iter(strategy.configure_train(1, None, ConfigRecord(), _grid())))
    arrays, _ = strategy.aggregate_train(1, _replies(received(message), 1))

    after = canonical(network)
    assert list(arrays.keys()) == list(amap.canonical_keys)
    assert all(torch.equal(v, after[k]) for k, v in from_array_record(arrays).items())
    assert not all(torch.equal(after[k], before[k]) for k in after), "the round changed nothing"
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert _storages(network) == len(amap.groups) and AliasMap.from_module(network) == amap


def _flower(name: str) -> flower.FedAvg:
    classes = {
        "fedavgm": lambda: flower.FedAvgM(server_learning_rate=0.7, server_momentum=0.9),
        "fedadagrad": flower.FedAdagrad,
        "fedadam": flower.FedAdam,
        "fedyogi": flower.FedYogi,
        "fedmedian": flower.FedMedian,
        "fedtrimmedavg": lambda: flower.FedTrimmedAvg(beta=0.25),
        "krum": lambda: flower.Krum(num_malicious_nodes=1),
        "multikrum": lambda: flower.MultiKrum(num_malicious_nodes=1, num_nodes_to_select=2),
    }
    return classes[name]()


OPTIONS = {
    "fedavgm": {"server_learning_rate": 0.7, "server_momentum": 0.9},
    "fedtrimmedavg": {"beta": 0.25},
    "krum": {"num_malicious_nodes": 1},
    "multikrum": {"num_malicious_nodes": 1, "num_nodes_to_select": 2},
}


@pytest.mark.parametrize(
    "name", ["fedavgm", "fedadagrad", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum", "multikrum"]
)
def test_matches_flowers_strategy_on_canonical_records(name):
    """Three rounds, same replies: the in-place torch path equals Flower's numpy implementation.

    Both work in float32 and sum in different orders; the server optimizers divide
    by sqrt(v) of small deltas, which amplifies that rounding to ~1e-5. A wrong
    rule would be off by ~eta (1e-2 to 1e-1).
    """
    network = tiny_network()
    ours = strategy_from_name(name, network=network, **OPTIONS.get(name, {}))
    theirs = _flower(name)
    global_record = ours.model.record()
    for server_round in (1, 2, 3):
        sent = received(next(iter(ours.configure_train(server_round, None, ConfigRecord(), _grid()))))
        list(theirs.configure_train(server_round, global_record, ConfigRecord(), _grid()))
        ours.aggregate_train(server_round, _replies(sent, server_round))
        global_record, _ = theirs.aggregate_train(server_round, _replies(sent, server_round))
        expected = {k: torch.from_numpy(a.numpy()) for k, a in global_record.items()}
        for key, value in canonical(network).items():
            torch.testing.assert_close(value, expected[key].to(value.dtype), rtol=1e-4, atol=1e-4)


def test_defaults_equal_flowers():
    pairs = {
        "fedavgm": flower.FedAvgM,
        "fedadagrad": flower.FedAdagrad,
        "fedadam": flower.FedAdam,
        "fedyogi": flower.FedYogi,
        "fedtrimmedavg": flower.FedTrimmedAvg,
    }
    for name, cls in pairs.items():
        ours = STRATEGIES[name](tiny_network())
        for parameter in inspect.signature(cls.__init__).parameters.values():
            if parameter.default is not inspect.Parameter.empty and parameter.default is not None:
                assert getattr(ours, parameter.name) == parameter.default, (name, parameter.name)


def test_strategy_from_name_errors_and_options():
    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'.*fedadam"):
        strategy_from_name("fedsgd", network=tiny_network())
    with pytest.raises(ValueError, match="unknown dp option 'local'"):
        strategy_from_name("fedavg", network=tiny_network(), dp="local")
    with pytest.raises(TypeError, match="eta"):
        strategy_from_name("fedavg", network=tiny_network(), eta=0.1)
    adam = strategy_from_name("Fed-Adam", network=tiny_network(), eta=0.3, min_train_nodes=3)
    assert (type(adam).__name__, adam.eta, adam.min_train_nodes) == ("NnUNetFedAdam", 0.3, 3)
    prox = strategy_from_name("fedprox", network=tiny_network(), proximal_mu=0.01, min_available_nodes=4)
    message = next(iter(prox.configure_train(1, None, ConfigRecord(), _grid())))
    assert message.content["config"]["proximal-mu"] == 0.01
    wrapped = strategy_from_name(
        "fedavg",
        network=tiny_network(),
        dp="server-adaptive",
        dp_options={"noise_multiplier": 0.1, "num_sampled_clients": 4},
    )
    assert isinstance(wrapped, DP_WRAPPERS["server-adaptive"]) and wrapped.strategy.model.network is not None


def _norm(tensors) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors))


def test_dp_clipping_norm_counts_each_shared_tensor_once():
    network = tiny_network()
    amap = AliasMap.from_module(network)
    inner = strategy_from_name("fedavg", network=network, min_train_nodes=1, min_available_nodes=1)
    clipping = 0.5
    dp = NnUNetDPServerSideFixedClipping(inner, noise_multiplier=0.0, clipping_norm=clipping, num_sampled_clients=1)
    grid = LoopbackGrid([21], handler=lambda node, message: None)
    sent = received(next(iter(dp.configure_train(1, None, ConfigRecord(), grid))))
    update = perturbed(sent, 5, scale=0.05)
    delta = {k: update[k] - sent[k] for k in sent}
    unique_norm = _norm(delta.values())
    per_key_norm = _norm(delta[amap.canonical_of(k)] for k in amap.keys)
    assert per_key_norm**2 > 2.5 * unique_norm**2 and unique_norm > clipping  # per-key: squared norm ~3x

    dp.aggregate_train(1, [reply(21, update, 8)])

    applied = {k: v.double() - sent[k].double() for k, v in canonical(network).items()}
    assert _norm(applied.values()) == pytest.approx(clipping, rel=1e-5)
    for key, value in applied.items():
        torch.testing.assert_close(value, delta[key].double() * clipping / unique_norm, rtol=1e-4, atol=1e-7)
    assert _storages(network) == len(amap.groups)


@pytest.mark.parametrize("dp", sorted(DP_WRAPPERS))
def test_dp_wrappers_run_a_round_and_drop_bad_replies_before_clipping(dp):
    network = tiny_network()
    options = {"noise_multiplier": 0.01, "num_sampled_clients": 4}
    options |= {"clipping_norm": 1.0} if "fixed" in dp else {"initial_clipping_norm": 1.0}
    strategy = strategy_from_name("fedavg", network=network, dp=dp, dp_options=options)
    before = OrderedDict((k, v.clone()) for k, v in canonical(network).items())
    sent = received(next(iter(strategy.configure_train(1, None, ConfigRecord(), _grid()))))
    replies = _replies(sent, 1)
    for message in replies:
        message.content["metrics"]["norm_bit"] = 1
    broken = perturbed(sent, 9)
    broken[next(iter(broken))].view(-1)[0] = np.nan
    replies[0] = reply(21, broken, 2, metrics={"norm_bit": 1})

    arrays, _ = strategy.aggregate_train(1, replies)

    after = canonical(network)
    assert arrays is not None and not all(torch.equal(after[k], before[k]) for k in after)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert _storages(network) == len(AliasMap.from_module(network).groups)
    if dp.endswith("adaptive"):
        assert strategy.strategy_state()["clipping_norm"] != 1.0


def test_a_nan_found_in_the_aggregate_is_rolled_back_exactly():
    """Single-pass mode: a NaN in the last group is caught in the result; FedAdam ends as if the reply never came."""
    with_bad, without = (strategy_from_name("fedadam", network=tiny_network()) for _ in range(2))
    sent = received(next(iter(with_bad.configure_train(1, None, ConfigRecord(), _grid()))))
    list(without.configure_train(1, None, ConfigRecord(), _grid()))
    good = _replies(sent, 1, nodes=NODES[:3])
    broken = perturbed(sent, 77)
    last = list(broken)[-1]
    broken[last] = broken[last].clone()
    broken[last].view(-1)[-1] = np.inf

    with_bad.aggregate_train(1, [*good[:1], reply(NODES[3], broken, 50), *good[1:]])
    without.aggregate_train(1, _replies(sent, 1, nodes=NODES[:3]))

    for key, value in canonical(without.model.network).items():
        assert torch.equal(canonical(with_bad.model.network)[key], value), key
        assert torch.equal(with_bad.buffers["m"][key], without.buffers["m"][key]), key


def _huge(sent: OrderedDict, node: int):
    """A finite but huge reply (3e38 in float32 groups): any squared step overflows."""
    tensors = OrderedDict((k, torch.full_like(v, 3e38) if v.is_floating_point() else v) for k, v in sent.items())
    return reply(node, tensors, 2, metrics={"train-loss": 0.5})


def _buffers(strategy) -> dict:
    return {name: {k: t.clone() for k, t in b.items()} for name, b in strategy.buffers.items()}


@pytest.mark.parametrize("name", ["fedadam", "fedadagrad", "fedyogi", "fedavgm"])
def test_a_server_step_that_would_go_non_finite_is_refused_and_the_run_goes_on(name, caplog):
    """Item 3: one finite but huge reply: the round's update is refused, model and moments bit-identical to
    before it, one log line; the next honest round changes the model again (the run is not frozen)."""
    options = {"server_momentum": 0.9, "server_learning_rate": 5.0} if name == "fedavgm" else {}
    strategy = strategy_from_name(name, network=tiny_network(), min_train_nodes=1, **options)
    sent = received(next(iter(strategy.configure_train(1, None, ConfigRecord(), _grid()))))
    strategy.aggregate_train(1, _replies(sent, 1))  # moments now hold values
    sent = received(next(iter(strategy.configure_train(2, None, ConfigRecord(), _grid()))))
    model, moments = (
        OrderedDict((k, v.clone()) for k, v in canonical(strategy.model.network).items()),
        _buffers(strategy),
    )

    with caplog.at_level("WARNING", logger="flwr"):
        assert strategy.aggregate_train(2, [*_replies(sent, 2)[:2], _huge(sent, NODES[2])]) == (None, None)

    assert all(torch.equal(v, model[k]) for k, v in canonical(strategy.model.network).items())
    assert all(torch.equal(t, moments[n][k]) for n, b in strategy.buffers.items() for k, t in b.items())
    assert moments.keys() == strategy.buffers.keys() and all(
        moments[n].keys() == b.keys() for n, b in strategy.buffers.items()
    )
    refusals = [r.getMessage() for r in caplog.records if "server step would make" in r.getMessage()]
    assert len(refusals) == 1 and "rolled back" in refusals[0] and "global model unchanged" in refusals[0]

    strategy.aggregate_train(3, _replies(sent, 3))
    after = canonical(strategy.model.network)
    changed = [k for k in after if after[k].is_floating_point() and not torch.equal(after[k], model[k])]
    assert len(changed) == sum(1 for v in after.values() if v.is_floating_point())
    assert all(torch.isfinite(t).all() for b in strategy.buffers.values() for t in b.values())


def test_qfedavg_on_huge_finite_replies_refuses_the_round(caplog):
    """Item 4: Flower's q-FedAvg result on 3e38 replies holds NaN/Inf: refused, model unchanged, one line."""
    strategy = strategy_from_name("qfedavg", network=tiny_network(), client_learning_rate=0.1, min_train_nodes=1)
    sent = received(next(iter(strategy.configure_train(1, None, ConfigRecord(), _grid()))))
    before = {k: v.clone() for k, v in strategy.model.network.state_dict().items()}

    with caplog.at_level("WARNING", logger="flwr"):
        assert strategy.aggregate_train(1, [_huge(sent, node) for node in NODES]) == (None, None)

    assert all(torch.equal(v, before[k]) for k, v in strategy.model.network.state_dict().items())
    lines = [r.getMessage() for r in caplog.records if "NnUNetQFedAvg refused its result" in r.getMessage()]
    assert len(lines) == 1 and "global model unchanged" in lines[0]
