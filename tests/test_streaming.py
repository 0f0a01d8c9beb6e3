"""Streaming rounds: replies folded as they arrive equal the batch aggregation, in any arrival order."""

from __future__ import annotations

import logging
import math
import os
import time
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from strategy_support import (
    LoopbackGrid,
    ScriptedGrid,
    canonical,
    perturbed,
    received,
    reply,
    set_task_identity,
    tiny_network,
)

from flwr_nnunet import AliasMap, NnUNetFedAvg, to_array_record
from flwr_nnunet.core.reduce import weighted_mean_
from flwr_nnunet.core.running import RunningWeightedSum
from flwr_nnunet.strategy.flower_adapted import NnUNetBulyan, NnUNetKrum, NnUNetQFedAvg
from flwr_nnunet.strategy.privacy import (
    NnUNetDPClientSideFixedClipping,
    NnUNetDPServerSideAdaptiveClipping,
    NnUNetDPServerSideFixedClipping,
)
from flwr_nnunet.strategy.robust import NnUNetFedMedian, NnUNetFedTrimmedAvg
from flwr_nnunet.strategy.server_optimizers import NnUNetFedAdam, NnUNetFedAvgM
from flwr_nnunet.strategy.stream_round import quorum_count
from flwr_nnunet.strategy.streaming import TrainStream, streams

NODES = [11, 12, 13, 14, 15]
WEIGHTS = {11: 3, 12: 1, 13: 7, 14: 2, 15: 5}


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def messages(log: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in log]


def site_content(node: int, instruction: Message) -> RecordDict:
    """What a site sends back: the received model perturbed by a node-seeded amount, and its weight."""
    update = perturbed(received(instruction), seed=node)
    metrics = MetricRecord({"num-examples": WEIGHTS.get(node, 4), "train-loss": float(node)})
    return RecordDict({"arrays": to_array_record(update), "metrics": metrics})


def build(cls=NnUNetFedAvg, **kwargs):
    kwargs.setdefault("fraction_evaluate", 0.0)
    return cls(tiny_network(seed=0), **kwargs)


def state(strategy) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((k, v.clone()) for k, v in strategy.model.network.state_dict().items())


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in float32 ulps between two float32 tensors of the same sign pattern."""
    return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max())


def assert_float32_close(streamed, batch, *, max_ulps=None, rtol=1e-6, atol=1e-7):
    for key, value in streamed.items():
        if value.is_floating_point():
            if max_ulps is None:
                torch.testing.assert_close(value, batch[key], rtol=rtol, atol=atol)
            else:
                assert ulps(value, batch[key]) <= max_ulps, key
        else:
            assert torch.equal(value, batch[key]), key


# ------------------------------------------------------------------ accumulator


@pytest.mark.parametrize("in_place", [False, True], ids=["float64", "float32-pair-in-place"])
def test_running_sum_is_order_independent_and_matches_the_float64_batch_mean_to_one_ulp(in_place):
    torch.manual_seed(0)

    def like():
        return {
            "w": torch.zeros(700, 300),
            "n": torch.zeros(3, dtype=torch.int64),
            "b": torch.zeros(9, dtype=torch.bool),
        }

    updates = [
        {"w": torch.randn(700, 300), "n": torch.randint(0, 1000, (3,)), "b": torch.rand(9) > 0.5} for _ in range(24)
    ]
    weights = [float(w) for w in torch.randint(1, 500, (24,))]

    def streamed(order):
        out = like()
        acc = RunningWeightedSum(out, in_place=in_place, chunk_elements=5000, num_threads=2)
        assert acc.nbytes == (700 * 300 * 4 + 12 * 8 if in_place else (700 * 300 + 12) * 8)
        for i in order:
            acc.add_(updates[i], weights[i])
        assert acc.finish_(out, check_finite=True) == []
        acc.release()
        return out

    forward = streamed(range(24))
    for order in (reversed(range(24)), torch.randperm(24, generator=torch.Generator().manual_seed(3)).tolist()):
        other = streamed(order)
        assert ulps(forward["w"], other["w"]) <= 1
        assert torch.equal(forward["n"], other["n"]) and torch.equal(forward["b"], other["b"])
    batch64 = like()
    weighted_mean_(batch64, updates, weights, accumulate_dtype=torch.float64)
    assert ulps(forward["w"], batch64["w"]) <= 1
    batch32 = like()
    weighted_mean_(batch32, updates, weights)
    torch.testing.assert_close(forward["w"], batch32["w"], rtol=1e-5, atol=1e-6)
    assert torch.equal(forward["n"], batch32["n"]) and torch.equal(forward["b"], batch32["b"])


@pytest.mark.parametrize("in_place", [False, True], ids=["float64", "float32-pair-in-place"])
def test_running_sum_refuses_a_bad_update_without_touching_the_sums(in_place):
    acc = RunningWeightedSum({"w": torch.zeros(4)}, in_place=in_place)
    acc.add_({"w": torch.ones(4)}, 2)
    before = [p.clone() for p in acc.parts()["w"]]
    with pytest.raises(ValueError):
        acc.add_({"w": torch.ones(5)}, 1)
    with pytest.raises(ValueError):
        acc.add_({"w": torch.ones(4)}, float("nan"))
    with pytest.raises(KeyError):
        acc.add_({"v": torch.ones(4)}, 1)
    assert all(torch.equal(p, b) for p, b in zip(acc.parts()["w"], before))
    assert acc.count == 1 and acc.total_weight == 2
    acc.release()
    with pytest.raises(RuntimeError):
        acc.add_({"w": torch.ones(4)}, 1)


def test_quorum_count():
    assert quorum_count(None, 7) == 7
    assert quorum_count(0.5, 7) == 4
    assert quorum_count(0.6, 5) == 3
    assert quorum_count(0.01, 5) == 1
    with pytest.raises(ValueError):
        quorum_count(0.0, 5)


# -------------------------------------------------------------------- rounds


@pytest.mark.parametrize("local", [False, True], ids=["all-groups", "fedbn-local-norms"])
def test_streamed_round_equals_batch_aggregation(local):
    options = {"local_keys": (lambda k: ".norm." in k)} if local else {}
    batch, stream = build(**options), build(**options)
    batch64 = build(accumulate_dtype=torch.float64, **options)

    for strategy in (batch, batch64):
        strategy.start(ScriptedGrid(NODES, site_content), num_rounds=1)
    grid = ScriptedGrid(NODES, site_content, order=[13, 11, 15, 12, 14])
    result = stream.start(grid, num_rounds=1, streaming=True, poll_interval=0.01, timeout=30)

    assert not grid.used_send_and_receive
    assert_float32_close(state(stream), state(batch))
    assert_float32_close(state(stream), state(batch64), max_ulps=1)
    metrics = result.train_metrics_clientapp[1]
    assert metrics["train-loss"] == pytest.approx(sum(n * w for n, w in WEIGHTS.items()) / sum(WEIGHTS.values()))


def test_two_arrival_orders_give_the_same_model():
    first, second = build(), build()
    first.start(ScriptedGrid(NODES, site_content, order=NODES), num_rounds=2, streaming=True, poll_interval=0.01)
    second.start(
        ScriptedGrid(NODES, site_content, order=list(reversed(NODES)), per_pull=2),
        num_rounds=2,
        streaming=True,
        poll_interval=0.01,
    )
    assert_float32_close(state(first), state(second), max_ulps=1)


def test_aggregate_train_called_directly_matches_the_stream():
    stream, batch = build(), build()
    base = OrderedDict((k, v.clone()) for k, v in canonical(stream.model.network).items())
    round_stream = TrainStream(stream, 1)
    for node in reversed(NODES):
        message = reply(node, perturbed(base, node), WEIGHTS[node])
        assert round_stream.offer(message)
        assert len(message.content["arrays"]) == 0  # released once folded
    round_stream.finish()
    batch.aggregate_train(1, [reply(n, perturbed(base, n), WEIGHTS[n]) for n in NODES])
    assert_float32_close(state(stream), state(batch))


def test_a_bad_reply_mid_stream_is_rejected_without_touching_the_accumulator(flwr_log):
    strategy, reference = build(), build()
    base = OrderedDict((k, v.clone()) for k, v in canonical(strategy.model.network).items())

    def good_replies():
        return [reply(n, perturbed(base, n), WEIGHTS[n]) for n in (11, 12, 13)]

    good = good_replies()
    poisoned = perturbed(base, 99)
    key = next(k for k, v in poisoned.items() if v.is_floating_point())
    poisoned[key].view(-1)[3] = float("nan")
    wrong_shape = OrderedDict(base)
    wrong_shape[key] = torch.zeros(2, 2)

    round_stream = TrainStream(strategy, 1)
    assert round_stream.offer(good[0])
    sums = {k: [p.clone() for p in parts] for k, parts in round_stream.accumulator.parts().items()}
    assert not round_stream.offer(reply(14, poisoned, 5))
    assert not round_stream.offer(reply(15, wrong_shape, 5))
    assert not round_stream.offer(reply(11, perturbed(base, 5), 5))  # a second reply from node 11
    for key, parts in round_stream.accumulator.parts().items():
        assert all(torch.equal(p, b) for p, b in zip(parts, sums[key]))
    assert round_stream.accumulator.count == 1 and round_stream.accumulator.total_weight == WEIGHTS[11]
    for message in good[1:]:
        assert round_stream.offer(message)
    arrays, _ = round_stream.finish()
    assert arrays is not None
    reference.aggregate_train(1, good_replies())
    assert_float32_close(state(strategy), state(reference))
    rejected = [m for m in messages(flwr_log) if "rejected reply from node" in m]
    assert len(rejected) == 3 and "NaN" in rejected[0] and "second reply" in rejected[2]


def test_a_late_reply_is_dropped_and_logged(flwr_log):
    strategy = build()
    grid = ScriptedGrid([11, 12, 13], site_content, delays={11: 0.0, 12: 0.0, 13: 0.6})
    before = time.monotonic()
    result = strategy.start(grid, num_rounds=2, streaming=True, poll_interval=0.01, timeout=0.3)
    text = messages(flwr_log)
    assert time.monotonic() - before < 5
    assert any("closed with 1 replies outstanding (the round timed out): nodes [13]" in m for m in text)
    assert any("dropped a reply from node 13: it arrived after round 1 closed" in m for m in text)
    assert sorted(result.train_metrics_clientapp) == [1, 2]  # nodes 11 and 12 made both rounds
    assert any("streamed 2 replies (nodes [11, 12]" in m for m in text)


def test_a_timeout_with_too_few_replies_leaves_the_model_bit_identical(flwr_log):
    strategy = build(min_train_nodes=3)
    before, record = state(strategy), strategy.model.record()
    grid = ScriptedGrid([11, 12, 13], site_content, delays={11: 0.0, 12: 0.0})  # node 13 never answers
    result = strategy.start(grid, num_rounds=1, streaming=True, poll_interval=0.01, timeout=0.2)
    after = state(strategy)
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())
    assert strategy.model.record() is record
    assert result.train_metrics_clientapp == {}
    assert any("fewer than the 3 required" in m for m in messages(flwr_log))


def test_quorum_and_grace_close_the_round_before_the_slow_sites(flwr_log):
    strategy = build()
    grid = ScriptedGrid(NODES, site_content, delays={11: 0.0, 12: 0.0, 13: 0.0, 14: 20.0, 15: 20.0})
    before = time.monotonic()
    result = strategy.start(grid, num_rounds=1, streaming=True, quorum=0.6, grace=0.2, timeout=30)
    assert time.monotonic() - before < 5
    text = messages(flwr_log)
    assert any("quorum of 3 accepted replies met" in m for m in text)
    assert any("the grace period after the quorum ended" in m and "[14, 15]" in m for m in text)
    assert 1 in result.train_metrics_clientapp


@pytest.mark.parametrize(
    ("cls", "options"),
    [(NnUNetFedAdam, {}), (NnUNetFedAvgM, {"server_momentum": 0.9, "server_learning_rate": 0.7})],
    ids=["fedadam", "fedavgm"],
)
def test_server_optimizer_streaming_equals_its_batch_result(cls, options):
    batch, stream = build(cls, **options), build(cls, **options)
    batch.start(ScriptedGrid(NODES, site_content), num_rounds=2)
    stream.start(
        ScriptedGrid(NODES, site_content, order=list(reversed(NODES))), num_rounds=2, streaming=True, poll_interval=0.01
    )
    assert_float32_close(state(stream), state(batch), rtol=1e-5, atol=1e-6)  # the step amplifies the mean's rounding
    for name, buffers in batch.buffers.items():
        for key, value in buffers.items():
            torch.testing.assert_close(stream.buffers[name][key], value, rtol=1e-5, atol=1e-6)


def test_strategies_that_do_not_stream_use_the_batch_path(flwr_log):
    assert streams(NnUNetFedAvg) is True and streams(NnUNetFedAdam) is True
    assert streams(NnUNetFedMedian) is False
    assert not any(streams(c) for c in (NnUNetFedTrimmedAvg, NnUNetKrum, NnUNetBulyan, NnUNetQFedAvg))
    assert streams(NnUNetDPServerSideFixedClipping) and not streams(NnUNetDPServerSideAdaptiveClipping)
    assert not streams(NnUNetDPServerSideFixedClipping(build(NnUNetFedMedian), 0.0, 1.0, 5))  # what it wraps
    strategy = build(NnUNetFedMedian)
    grid = ScriptedGrid(NODES, site_content)
    result = strategy.start(grid, num_rounds=1, streaming=True, poll_interval=0.01)
    assert grid.used_send_and_receive
    assert any("NnUNetFedMedian does not stream" in m for m in messages(flwr_log))
    assert 1 in result.train_metrics_clientapp
    with pytest.raises(TypeError):
        TrainStream(strategy, 1)


def test_subclass_overriding_the_reduction_does_not_stream_unless_it_says_so():
    class Custom(NnUNetFedAvg):
        def reduce_group_(self, key, target, values, weights):
            target.copy_(values[0])

    class Declared(NnUNetFedAvg):
        streams = True

        def reduce_all_(self, server_round, targets, updates, weights):
            return super().reduce_all_(server_round, targets, updates, weights)

    assert not streams(Custom) and streams(Declared)


# ------------------------------------------------------- differential privacy

DP_SCALES = {node: 0.01 * (node - 10) for node in NODES}
"""Per-node update scale: the update norms grow with the node id, so a clipping norm between them clips some."""


def dp_content(node: int, instruction: Message) -> RecordDict:
    update = perturbed(received(instruction), seed=node, scale=DP_SCALES[node])
    metrics = MetricRecord({"num-examples": WEIGHTS[node], "train-loss": float(node)})
    return RecordDict({"arrays": to_array_record(update), "metrics": metrics})


def update_norm(a, b) -> float:
    return math.sqrt(sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in b))


def dp_round(wrapper_cls, noise, *, streaming, order=NODES, **options):
    """One DP round of the five nodes (numpy's RNG seeded as a run would); the wrapper and the pre-round model."""
    inner = build(**options)
    before = OrderedDict((k, v.clone()) for k, v in canonical(inner.model.network).items())
    norms = sorted(update_norm(perturbed(before, n, scale=DP_SCALES[n]), before) for n in NODES)
    wrapper = wrapper_cls(
        inner, noise_multiplier=noise, clipping_norm=(norms[2] + norms[3]) / 2, num_sampled_clients=len(NODES)
    )
    np.random.seed(5)
    grid = ScriptedGrid(NODES, dp_content, order=order)
    wrapper.start(grid, num_rounds=1, streaming=streaming, poll_interval=0.01, timeout=30)
    assert grid.used_send_and_receive is not streaming
    return wrapper, before


@pytest.mark.parametrize(
    ("wrapper_cls", "noise"),
    [
        (NnUNetDPServerSideFixedClipping, 0.0),
        (NnUNetDPServerSideFixedClipping, 2.0),
        (NnUNetDPClientSideFixedClipping, 2.0),
    ],
    ids=["server-clipping-no-noise", "server-clipping-noise", "client-clipping-noise"],
)
def test_streamed_dp_fixed_clipping_equals_the_batch_path(wrapper_cls, noise, flwr_log):
    batch, before = dp_round(wrapper_cls, noise, streaming=False, accumulate_dtype=torch.float64)
    stream, _ = dp_round(wrapper_cls, noise, streaming=True, order=list(reversed(NODES)))
    streamed, batched = state(stream.strategy), state(batch.strategy)
    text = messages(flwr_log)
    clipped = [m for m in text if "clipped to" in m]
    assert len(clipped) == (2 if wrapper_cls is NnUNetDPServerSideFixedClipping else 0)  # nodes 14 and 15
    assert any("streamed 5 replies" in m for m in text)
    stdv = noise * stream.clipping_norm / len(NODES)
    assert any(f"central DP noise with {stdv:.4f} stdev added" in m for m in text)
    assert update_norm(canonical(stream.strategy.model.network), before) > 0
    if noise == 0.0:
        assert_float32_close(streamed, batched, max_ulps=1)
        return
    # the same noise (numpy's RNG in the same state), on means equal to float32 rounding
    assert_float32_close(streamed, batched, rtol=1e-5, atol=1e-6)
    quiet, _ = dp_round(wrapper_cls, 0.0, streaming=True)
    drawn = torch.cat([(streamed[k] - v).view(-1) for k, v in state(quiet.strategy).items()])
    assert float(drawn.std()) == pytest.approx(stdv, rel=0.05) and abs(float(drawn.mean())) < stdv / 20


def test_streamed_dp_scales_a_reply_over_the_clip_once_per_alias_group():
    network = tiny_network()
    amap = AliasMap.from_module(network)
    clipping = 0.5
    dp = NnUNetDPServerSideFixedClipping(
        NnUNetFedAvg(network, min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0),
        noise_multiplier=0.0,
        clipping_norm=clipping,
        num_sampled_clients=1,
    )
    sent = received(next(iter(dp.configure_train(1, None, ConfigRecord(), LoopbackGrid([21], lambda n, m: None)))))
    update = perturbed(sent, 5, scale=0.05)
    delta = {k: update[k].double() - sent[k].double() for k in sent}
    unique_norm = math.sqrt(sum(float((d**2).sum()) for d in delta.values()))
    per_key_norm = math.sqrt(sum(float((delta[amap.canonical_of(k)] ** 2).sum()) for k in amap.keys))
    assert per_key_norm**2 > 2.5 * unique_norm**2 and unique_norm > clipping  # aliases would count ~3x

    stream = dp.train_stream(1)
    assert stream.offer(reply(21, update, 8))
    arrays, _ = stream.finish()

    assert arrays is not None
    applied = {k: v.double() - sent[k].double() for k, v in canonical(network).items()}
    assert math.sqrt(sum(float((a**2).sum()) for a in applied.values())) == pytest.approx(clipping, rel=1e-5)
    for key, value in applied.items():
        torch.testing.assert_close(value, delta[key] * clipping / unique_norm, rtol=1e-4, atol=1e-7)
    assert len({v.untyped_storage().data_ptr() for v in network.state_dict().values()}) == len(amap.groups)


def test_a_reply_that_cannot_be_clipped_is_rejected_and_the_model_kept(flwr_log):
    network = tiny_network("batch")  # BatchNorm: int64 num_batches_tracked, which numpy cannot scale in place
    dp = NnUNetDPServerSideFixedClipping(
        NnUNetFedAvg(network, min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0),
        noise_multiplier=0.0,
        clipping_norm=0.01,
        num_sampled_clients=1,
    )
    before = OrderedDict((k, v.clone()) for k, v in network.state_dict().items())
    sent = received(next(iter(dp.configure_train(1, None, ConfigRecord(), LoopbackGrid([21], lambda n, m: None)))))
    stream = dp.train_stream(1)
    assert not stream.offer(reply(21, perturbed(sent, 5), 8))
    assert stream.finish() == (None, None)
    assert all(torch.equal(v, before[k]) for k, v in network.state_dict().items())
    assert any("rejected reply from node 21" in m and "FixedClippingStream" in m for m in messages(flwr_log))


# --------------------------------------------------------- Flower simulation

sim_client = ClientApp()


@sim_client.train()
def _sim_train(message: Message, context: Context) -> Message:
    """The received model perturbed by a site-seeded amount (no training: the server side is under test)."""
    node = int(context.node_config["partition-id"]) + 1
    return Message(site_content(node, message), reply_to=message)


sim_server = ServerApp()


@sim_server.main()
def _sim_main(grid: Grid, context: Context) -> None:
    """Two streaming rounds on Flower's InMemoryGrid; the final model and metrics go to a file."""
    strategy = build(min_available_nodes=3)
    result = strategy.start(grid, num_rounds=2, streaming=True, poll_interval=0.05, timeout=120)
    state_dict = strategy.model.network.state_dict()
    torch.save(
        {"model": state_dict, "train": {r: dict(m) for r, m in result.train_metrics_clientapp.items()}},
        os.environ[SIM_OUT_ENV],
    )


SIM_OUT_ENV = "FLWR_NNUNET_TEST_STREAM_OUT"


@pytest.mark.slow
def test_streaming_rounds_in_a_flower_simulation(tmp_path, monkeypatch):
    out = tmp_path / "streamed.pt"
    monkeypatch.setenv(SIM_OUT_ENV, str(out))
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")
    run_simulation(
        sim_server, sim_client, num_supernodes=3, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    )
    saved = torch.load(out, weights_only=True)
    assert sorted(saved["train"]) == [1, 2]
    # the same two rounds as a batch run over the same site replies
    batch = build()
    batch.start(ScriptedGrid([1, 2, 3], site_content), num_rounds=2)
    assert_float32_close(saved["model"], state(batch))


def test_a_failure_mid_stream_rolls_the_network_back_bit_for_bit():
    strategy = build()
    before = state(strategy)

    class Failing(ScriptedGrid):
        def pull_messages(self, message_ids):
            if self.pulls == 2:
                raise ConnectionError("the SuperLink went away")
            self.pulls += 1
            return super().pull_messages(message_ids)

    grid = Failing(NODES, site_content)
    grid.pulls = 0
    with pytest.raises(ConnectionError):
        strategy.start(grid, num_rounds=1, streaming=True, poll_interval=0.01)
    after = state(strategy)
    assert all(torch.equal(after[k], v) for k, v in before.items())
