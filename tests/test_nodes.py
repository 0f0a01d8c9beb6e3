"""The server never waits forever for nodes: run-config node-wait bounds Flower's node sampling."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, MessageType, MetricRecord, RecordDict
from strategy_support import (
    DATASET_JSON,
    FINGERPRINT,
    LoopbackGrid,
    perturbed,
    received,
    reply,
    set_task_identity,
    tiny_network,
    tiny_plans,
)

from flwr_nnunet import NnUNetFedAvg, NnUNetModelFolder, to_array_record
from flwr_nnunet.strategy.nodes import NodesUnavailableError, enough_nodes, wait_for_nodes


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


class FakeClock:
    """A clock that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def site(node: int, message) -> RecordDict:
    if message.metadata.message_type == MessageType.EVALUATE:
        return RecordDict({"metrics": MetricRecord({"num-examples": 2, "dice": 0.5})})
    update = perturbed(received(message), node, scale=0.01)
    return RecordDict({"arrays": to_array_record(update), "metrics": MetricRecord({"num-examples": 2})})


def strategy(tmp_path, **kwargs) -> NnUNetFedAvg:
    folder = NnUNetModelFolder.in_results(tmp_path / "results", tiny_plans(), DATASET_JSON, FINGERPRINT, "2d")
    return NnUNetFedAvg(tiny_network(), model_folder=folder, **kwargs)


def test_wait_for_nodes_ends_after_the_timeout_with_the_nodes_it_has(caplog):
    grid, clock = LoopbackGrid([1], site), FakeClock()
    with caplog.at_level("INFO"):
        nodes = wait_for_nodes(grid, 3, 30.0, what="configure_train: round 2", sleep=clock.sleep, clock=clock)
    assert nodes == [1] and clock.now == pytest.approx(30.0)
    assert "configure_train: round 2: 1 of 3 wanted nodes connected after waiting 30 s (run-config node-wait)" in (
        caplog.text
    )
    assert wait_for_nodes(LoopbackGrid([1, 2, 3], site), 3, 30.0, what="x", sleep=clock.sleep, clock=clock) == [1, 2, 3]


def test_enough_nodes_goes_on_with_the_minimum_and_refuses_fewer(tmp_path):
    fedavg = strategy(tmp_path, min_available_nodes=3, min_train_nodes=2, min_evaluate_nodes=2)
    with enough_nodes(fedavg, LoopbackGrid([1, 2], site), 0.0, server_round=1, train=True):
        assert fedavg.min_available_nodes == 2  # Flower's sample_nodes would wait for 3 without end
        messages = fedavg.configure_train(1, None, ConfigRecord(), LoopbackGrid([1, 2], site))
    assert fedavg.min_available_nodes == 3
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2]
    with (
        pytest.raises(NodesUnavailableError, match=r"1 node\(s\) connected, fewer than the round's minimum of 2"),
        enough_nodes(fedavg, LoopbackGrid([1], site), 0.0, server_round=4, train=False),
    ):
        pass


def test_a_run_without_enough_nodes_stops_cleanly_with_its_checkpoints(tmp_path, caplog):
    class LosingGrid(LoopbackGrid):
        """Node 2 is gone for good after round 1's evaluation."""

        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            if any(m.metadata.message_type == MessageType.EVALUATE for m in self.sent):
                self.node_ids = [1]
            return replies

    fedavg = strategy(tmp_path, min_available_nodes=2, min_train_nodes=2, min_evaluate_nodes=2)
    with caplog.at_level("INFO"):
        fedavg.start(LosingGrid([1, 2], site), num_rounds=3, node_wait=0.2)
    folder = fedavg.model_folder
    assert fedavg.checkpoints.completed_rounds == 1
    assert folder.load_checkpoint(folder.checkpoint_path("latest"))["flwr_nnunet"]["server_round"] == 1
    assert not folder.checkpoint_path("final").exists()
    assert "round 2: 1 node(s) connected, fewer than the round's minimum of 2 (min-train-nodes)" in caplog.text
    assert "the run stops; the checkpoints of the completed rounds are intact" in caplog.text
    assert "stopped after round 1 of 3" in caplog.text


def test_a_node_whose_reply_never_comes_is_named(tmp_path, caplog):
    fedavg = strategy(tmp_path, min_train_nodes=1, min_available_nodes=2)
    fedavg.configure_train(1, None, ConfigRecord(), LoopbackGrid([11, 12], site))
    only = reply(11, perturbed(fedavg.model.tensors, 1, scale=0.01))  # (node id 1 is the SuperLink's)
    with caplog.at_level("INFO"):
        arrays, _ = fedavg.aggregate_train(1, [only])
    assert arrays is not None
    assert "aggregate_train: round 1: no reply from node(s) [12] before the round timeout" in caplog.text
