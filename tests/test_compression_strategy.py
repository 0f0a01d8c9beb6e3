"""Compressed rounds between the strategies and sites that keep their held model and residual on disk.

The sites are :mod:`flwr_nnunet.site.compressed_updates` on a temporary folder each, answering through the
in-process grid; their "training" moves the received model a fixed step towards a target of their own.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from strategy_support import (
    LoopbackGrid,
    ScriptedGrid,
    canonical,
    perturbed,
    reply,
    set_task_identity,
    tiny_network,
    tiny_plans,
)

from flwr_nnunet import from_array_record, strategy_from_name
from flwr_nnunet.core.delta_codec import BASE_KEY, COMPRESSION_KEY, MODEL_KEY, SCALES_RECORD, decode_delta
from flwr_nnunet.core.quantize import SCHEMES
from flwr_nnunet.site.compressed_updates import compressed_reply, held_digest, received_model, residual_file
from flwr_nnunet.strategy.streaming import TrainStream

NODES = [11, 12, 13]
PLANS = tiny_plans()
STEP = 0.5


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def target(node: int) -> OrderedDict[str, torch.Tensor]:
    return perturbed(canonical(tiny_network()), node, scale=0.2)


class Sites:
    """Sites answering compressed (or plain) instructions; what they sent and received is recorded."""

    def __init__(self, root: Path) -> None:
        self.folders = {node: root / f"node-{node}" for node in NODES}
        for folder in self.folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        self.instructions: list[Message] = []
        self.updates: dict[int, list[OrderedDict[str, torch.Tensor]]] = {node: [] for node in NODES}

    def __call__(self, node: int, message: Message) -> RecordDict:
        self.instructions.append(message)
        config = message.content["config"]
        folder = self.folders[node]
        if COMPRESSION_KEY in config:
            model = received_model(folder, config, dict(message.content.items()))
        else:
            model = OrderedDict((k, v.clone()) for k, v in from_array_record(message.content["arrays"]).items())
        if message.metadata.message_type == MessageType.EVALUATE:
            about = {BASE_KEY: held_digest(folder)} if COMPRESSION_KEY in config else {}
            return RecordDict(
                {"metrics": MetricRecord({"num-examples": 4, "dice": 0.5}), "config": ConfigRecord(about)}
            )
        goal = target(node)
        trained = OrderedDict(
            (k, v + STEP * (goal[k] - v) if v.is_floating_point() else v + 1) for k, v in model.items()
        )
        self.updates[node].append(OrderedDict((k, trained[k] - v) for k, v in model.items() if v.is_floating_point()))
        metrics = MetricRecord({"num-examples": 4, "train-loss": 0.5})
        if COMPRESSION_KEY not in config:
            return RecordDict({"arrays": reply(node, trained).content["arrays"], "metrics": metrics})
        records, about = compressed_reply(folder, int(config["server-round"]), trained, model, config)
        return RecordDict({**records, "metrics": metrics, "config": ConfigRecord(about)})


def build(compression: str, name: str = "fedavg", **options):
    return strategy_from_name(
        name, network=tiny_network(), plans=PLANS, min_train_nodes=3, compression=compression, **options
    )


def run(strategy, sites: Sites, rounds: int = 4) -> OrderedDict[str, torch.Tensor]:
    grid = LoopbackGrid(NODES, handler=sites)
    strategy.start(grid, num_rounds=rounds)
    core = getattr(strategy, "strategy", strategy)
    return OrderedDict((k, v.detach().clone()) for k, v in core.model.tensors.items())


def distance(a, b) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_what_crosses_each_way(tmp_path):
    sites = Sites(tmp_path)
    run(build("int8-block"), sites, rounds=2)
    by_kind = [
        (m.metadata.message_type, len(m.content["arrays"]), SCALES_RECORD in m.content, BASE_KEY in m.content["config"])
        for m in sites.instructions
    ]
    per_round = len(NODES)
    first_train, first_evaluate, second_train = (by_kind[i * per_round : (i + 1) * per_round] for i in range(3))
    keys = len(canonical(tiny_network()))
    assert set(first_train) == {(MessageType.TRAIN, keys, False, False)}  # nothing held yet: the whole model
    assert set(first_evaluate) == {(MessageType.EVALUATE, keys, True, True)}  # a delta from what they hold
    assert set(second_train) == {(MessageType.TRAIN, 0, False, True)}  # they hold the current model: its digest
    delta = sites.instructions[per_round].content
    codes = delta["arrays"]
    floating = [k for k, v in canonical(tiny_network()).items() if v.is_floating_point()]
    assert all(codes[k].dtype == "int8" for k in floating)


@pytest.mark.parametrize("compression", sorted(SCHEMES))
def test_compressed_rounds_follow_the_uncompressed_ones(tmp_path, compression):
    plain = run(build("none"), Sites(tmp_path / "none"))
    compressed = run(build(compression), Sites(tmp_path / compression))
    start = canonical(tiny_network())
    moved = distance(plain, start)
    bound = {"fp16": 1e-3, "int8-block": 0.02, "int4-block": 0.2, "int3-block": 0.3}[compression]
    assert distance(compressed, plain) < bound * moved


PACKED = [name for name, scheme in sorted(SCHEMES.items()) if scheme.packed]


@pytest.mark.parametrize("compression", PACKED)
def test_error_feedback_sums_to_the_true_updates(tmp_path, compression):
    """What a site sent over its rounds, plus its last residual, is what it trained."""
    sites = Sites(tmp_path)
    scheme = SCHEMES[compression]
    grid = LoopbackGrid(NODES, handler=sites)
    strategy = build(compression)
    sent_sum = None

    def capture(server_round, replies):
        nonlocal sent_sum
        for message in replies:
            if message.metadata.src_node_id == NODES[0]:
                reference = strategy.model_sender.global_values()
                change = decode_delta((message.content["arrays"], message.content[SCALES_RECORD]), reference, scheme)
                floating = {k: v.double() for k, v in change.items() if reference[k].is_floating_point()}
                sent_sum = floating if sent_sum is None else {k: sent_sum[k] + floating[k] for k in floating}
        return original(server_round, replies)

    original, strategy.aggregate_train = strategy.aggregate_train, capture
    strategy.start(grid, num_rounds=5)
    true_sum = {k: sum(u[k].double() for u in sites.updates[NODES[0]]) for k in sent_sum}
    residual = torch.load(residual_file(sites.folders[NODES[0]], 5), weights_only=True)
    for key, value in true_sum.items():
        assert torch.allclose(sent_sum[key] + residual[key].double(), value, atol=1e-6), key
    assert max(float(v.abs().max()) for v in residual.values()) > 0


@pytest.mark.parametrize("compression", PACKED)
def test_a_site_that_trains_a_round_again_adds_the_same_residual(tmp_path, compression):
    """A restarted or rolled-back site: round r adds the residual kept after the round before r, whatever came after."""
    folder = tmp_path / "site"
    folder.mkdir()
    base = OrderedDict((k, v) for k, v in canonical(tiny_network()).items())
    config = ConfigRecord({COMPRESSION_KEY: compression, MODEL_KEY: "m"})
    trained = [perturbed(base, seed, scale=0.01) for seed in (1, 2, 3)]
    first = [compressed_reply(folder, r, trained[r - 1], base, config)[0] for r in (1, 2, 3)]
    again = compressed_reply(folder, 2, trained[1], base, config)[0]  # round 2 again: the server resumed
    for key, array in first[1]["arrays"].items():
        assert array.data == again["arrays"][key].data, key
    assert not residual_file(folder, 3).exists()  # the residual after the round trained no more is dropped
    restarted = compressed_reply(folder, 3, trained[2], base, config)[0]  # a fresh process: from the files
    for key, array in first[2]["arrays"].items():
        assert array.data == restarted["arrays"][key].data, key


def test_a_site_without_the_base_is_refused_and_then_gets_the_whole_model(tmp_path, flwr_log):
    sites = Sites(tmp_path)
    strategy = build("int8-block")
    grid = LoopbackGrid(NODES, handler=sites)
    strategy.start(grid, num_rounds=1)
    (sites.folders[NODES[0]] / "flwr_site_held_model.pth").unlink()  # the site lost what it held

    def answer(node, message):
        try:
            return sites(node, message)
        except Exception as error:  # noqa: BLE001 - the ClientApp answers with an error reply
            return RecordDict(
                {"metrics": MetricRecord({"num-examples": 4, "dice": 0.5}), "error": ConfigRecord({"x": str(error)})}
            )

    sites.instructions.clear()
    grid.handler = answer
    messages = list(strategy.configure_evaluate(1, None, ConfigRecord(), grid))
    replies = grid.send_and_receive(messages)
    strategy.aggregate_evaluate(1, replies)
    assert NODES[0] not in strategy.model_sender.held and all(n in strategy.model_sender.held for n in NODES[1:])
    message = next(
        m for m in strategy.configure_train(2, None, ConfigRecord(), grid) if m.metadata.dst_node_id == NODES[0]
    )
    assert BASE_KEY not in message.content["config"] and len(message.content["arrays"]) > 0


DP = {"dp": "server-fixed", "dp_options": {"noise_multiplier": 0.0, "clipping_norm": 100.0, "num_sampled_clients": 3}}


FOLLOWS = {"int8-block": 0.05, "int3-block": 0.5}
"""How far a compressed run of 3 rounds may end from the plain one, over how far the plain one moved."""


@pytest.mark.parametrize("compression", sorted(FOLLOWS))
@pytest.mark.parametrize(
    ("name", "options"),
    [("fedavg", DP), ("fedadam", {}), ("fedmedian", {}), ("fedtrimmedavg", {}), ("krum", {})],
    ids=["dp-server-fixed", "fedadam", "fedmedian", "fedtrimmedavg", "krum"],
)
def test_strategies_and_dp_see_decompressed_floats(tmp_path, name, options, compression):
    start = canonical(tiny_network())
    plain = run(build("none", name, **options), Sites(tmp_path / "none"), rounds=3)
    compressed = run(build(compression, name, **options), Sites(tmp_path / compression), rounds=3)
    assert all(torch.isfinite(v).all() for v in compressed.values() if v.is_floating_point())
    if name == "krum":  # it picks one reply: compression may change which, so it only has to move as far
        assert distance(compressed, start) > 0.5 * distance(plain, start)
    else:
        assert distance(compressed, plain) < FOLLOWS[compression] * distance(plain, start)


@pytest.mark.parametrize("compression", sorted(FOLLOWS))
def test_dp_clips_the_decompressed_update(tmp_path, flwr_log, compression):
    options = {
        "dp": "server-fixed",
        "dp_options": {"noise_multiplier": 0.0, "clipping_norm": 0.01, "num_sampled_clients": 3},
    }
    start = canonical(tiny_network())
    model = run(build(compression, **options), Sites(tmp_path), rounds=1)
    change = torch.cat([(model[k] - start[k]).reshape(-1) for k in model if model[k].is_floating_point()])
    assert float(change.norm()) <= 0.01 * 1.001


@pytest.mark.parametrize("compression", sorted(FOLLOWS))
def test_streaming_folds_compressed_replies(tmp_path, compression):
    streamed, batch = build(compression), build(compression)
    sites = {name: Sites(tmp_path / name) for name in ("stream", "batch")}
    for strategy, name in ((streamed, "stream"), (batch, "batch")):
        grid = LoopbackGrid(NODES, handler=sites[name])
        messages = list(strategy.configure_train(1, None, ConfigRecord(), grid))
        replies = [Message(sites[name](m.metadata.dst_node_id, m), reply_to=m) for m in messages]
        for message, instruction in zip(replies, messages):
            message.metadata.__dict__["_src_node_id"] = instruction.metadata.dst_node_id
        if strategy is streamed:
            stream = TrainStream(strategy, 1)
            assert all(stream.offer(m) for m in reversed(replies))
            stream.finish()
        else:
            batch.aggregate_train(1, replies)
    a, b = streamed.model.tensors, batch.model.tensors
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    assert distance(a, canonical(tiny_network())) > 1e-3


@pytest.mark.parametrize("dp", [False, True], ids=["fedavg", "server-fixed-dp"])
def test_streaming_rounds_without_evaluation_send_deltas(tmp_path, dp):
    """A streamed training round notes the reference each site holds, as a batch one does (a DP wrapper's stream
    too): with no evaluation half between them, the next round still sends the delta, not the whole model."""
    options = {"fraction_evaluate": 0.0, **(DP if dp else {})}
    sites = Sites(tmp_path / "stream")
    streamed = build("int8-block", **options)
    streamed.start(ScriptedGrid(NODES, sites), num_rounds=3, streaming=True, poll_interval=0.01)
    kinds = [
        (len(m.content["arrays"]), SCALES_RECORD in m.content, BASE_KEY in m.content["config"])
        for m in sites.instructions
    ]
    keys = len(canonical(tiny_network()))
    assert set(kinds[: len(NODES)]) == {(keys, False, False)}
    assert kinds[len(NODES) :] == [(keys, True, True)] * 2 * len(NODES)
    batch = build("int8-block", **options)
    batch.start(ScriptedGrid(NODES, Sites(tmp_path / "batch")), num_rounds=3)
    a, b = (getattr(s, "strategy", s).model.tensors for s in (streamed, batch))
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
