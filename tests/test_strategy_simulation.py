"""A real Flower simulation (2 nodes, 2 rounds) running NnUNetFedAvg through ``start()``.

The ClientApp here trains a small nnU-Net network with plain torch on random
tensors (the nnU-Net-trainer ClientApp lives in client_app.py); the server side
is the real strategy writing a real nnU-Net model folder, which nnU-Net's
predictor then loads and predicts with.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from strategy_support import DATASET_JSON, FINGERPRINT, tiny_plans

from flwr_nnunet import AliasMap, NnUNetFedAvg, NnUNetModelFolder, from_array_record, to_array_record
from flwr_nnunet.core.reduce import assign_
from flwr_nnunet.nnunet.digests import plans_sha256
from flwr_nnunet.nnunet.model_folder import STATE_KEY
from flwr_nnunet.nnunet.networks import build_network

PLANS = tiny_plans(features=(32, 64, 128, 256))
RESULTS_ENV = "FLWR_NNUNET_TEST_RESULTS"


def _network() -> torch.nn.Module:
    return build_network(PLANS["configurations"]["2d"]["architecture"], 1, 2)


def _batch(site: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images whose label is the bright region; sites differ in intensity offset."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 1, 32, 32, generator=generator) + 0.2 * site
    return image, (image[:, 0] > 0.5 + 0.2 * site).long()


def _local_model(message: Message) -> tuple[torch.nn.Module, AliasMap]:
    network = _network()
    amap = AliasMap.from_json(message.content["config"]["alias-map"])
    with torch.no_grad():
        assign_(amap.collapse(network.state_dict()), from_array_record(message.content["arrays"]))
    return network, amap


client_app = ClientApp()


@client_app.train()
def train(message: Message, context: Context) -> Message:
    """Three SGD steps on the site's random batches; reply canonical tensors as the wire format says."""
    site = int(context.node_config["partition-id"])
    network, amap = _local_model(message)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.05)
    for step in range(3):
        image, label = _batch(site, 100 * message.content["config"]["server-round"] + step)
        loss = F.cross_entropy(network(image)[0], label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    content = RecordDict(
        {
            "arrays": to_array_record(amap.collapse(network.state_dict())),
            "metrics": MetricRecord({"num-examples": 6 + 2 * site, "train-loss": float(loss)}),
            "config": ConfigRecord({"plans-sha256": message.content["config"]["plans-sha256"]}),
        }
    )
    return Message(content, reply_to=message)


@client_app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Foreground Dice of the global model on one random batch."""
    site = int(context.node_config["partition-id"])
    network, _ = _local_model(message)
    image, label = _batch(site, 7)
    with torch.no_grad():
        predicted = network(image)[0].argmax(1)
    overlap = float(((predicted == 1) & (label == 1)).sum())
    dice = 2 * overlap / max(float((predicted == 1).sum() + (label == 1).sum()), 1.0)
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 2, "dice": dice})}), reply_to=message)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Build the global network from the plans, run two rounds, write the nnU-Net model folder."""
    folder = NnUNetModelFolder.in_results(os.environ[RESULTS_ENV], PLANS, DATASET_JSON, FINGERPRINT, "2d")
    strategy = NnUNetFedAvg(_network(), plans=PLANS, model_folder=folder)
    result = strategy.start(grid, num_rounds=2)
    summary = {
        "train": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
        "evaluate": {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
        "best_dice": strategy.checkpoints.best_dice,
    }
    (folder.path / "history.json").write_text(json.dumps(summary))


@pytest.mark.slow
def test_simulation_writes_a_model_folder_nnunet_predicts_with(tmp_path, monkeypatch):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    monkeypatch.setenv(RESULTS_ENV, str(tmp_path))
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")
    run_simulation(
        server_app, client_app, num_supernodes=2, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    )

    folder = NnUNetModelFolder.in_results(tmp_path, PLANS, DATASET_JSON, FINGERPRINT, "2d")
    history = json.loads((folder.path / "history.json").read_text())
    assert sorted(history["train"]) == ["1", "2"] and sorted(history["evaluate"]) == ["1", "2"]
    assert all(np.isfinite(m["train-loss"]) for m in history["train"].values())
    assert history["best_dice"] == max(m["dice"] for m in history["evaluate"].values())

    final_path = folder.checkpoint_path("final")
    final = torch.load(final_path, map_location="cpu", weights_only=True)
    network = _network()
    amap = AliasMap.from_module(network)
    assert AliasMap.from_state_dict(final["network_weights"]) == amap
    assert final[STATE_KEY]["server_round"] == 2 and final[STATE_KEY]["plans_sha256"] == plans_sha256(PLANS)
    unique = sum(t.numel() * t.element_size() for t in amap.collapse(network.state_dict()).values())
    assert abs(final_path.stat().st_size - unique) < 0.01 * unique
    trained = {
        k for k, v in amap.collapse(final["network_weights"]).items() if not torch.equal(v, network.state_dict()[k])
    }
    assert trained and trained <= set(amap.canonical_keys)  # the weights moved during the run

    predictor = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=False, device=torch.device("cpu"))
    predictor.initialize_from_trained_model_folder(str(folder.path), use_folds=("all",))
    image = np.random.default_rng(1).random((1, 1, 32, 32), dtype=np.float32)
    segmentation = predictor.predict_single_npy_array(image, {"spacing": [999.0, 1.0, 1.0]})
    assert segmentation.shape == (1, 32, 32)
