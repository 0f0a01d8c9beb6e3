"""Global checkpoints in nnU-Net's layout, the predictor loading them, damaged files, and resume."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import MessageType, MetricRecord, RecordDict
from strategy_support import (
    DATASET_JSON,
    FINGERPRINT,
    LoopbackGrid,
    canonical,
    perturbed,
    received,
    set_task_identity,
    tiny_network,
    tiny_plans,
)

from flwr_nnunet import AliasMap, CheckpointError, NnUNetModelFolder, ResumeError, strategy_from_name, to_array_record
from flwr_nnunet.nnunet.model_folder import STATE_KEY

PLANS = tiny_plans()
DICE = {1: 0.3, 2: 0.5, 3: 0.4, 4: 0.6}
RUN_CONFIG = {"num-server-rounds": 4, "strategy": "fedadam", "local-epochs": 1}


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def site(node: int, message) -> RecordDict:
    """A deterministic site: moves the received model by a (node, round)-seeded step; Dice by round."""
    server_round = message.content["config"]["server-round"]
    if message.metadata.message_type == MessageType.EVALUATE:
        return RecordDict({"metrics": MetricRecord({"num-examples": 4, "dice": DICE[server_round]})})
    update = perturbed(received(message), 1000 * server_round + node, scale=0.02)
    return RecordDict({"arrays": to_array_record(update), "metrics": MetricRecord({"num-examples": node})})


def folder_for(tmp_path, plans=PLANS) -> NnUNetModelFolder:
    return NnUNetModelFolder.in_results(tmp_path / "results", plans, DATASET_JSON, FINGERPRINT, "2d")


def fedadam(tmp_path, seed: int = 0, run_config=RUN_CONFIG, plans=PLANS, name="fedadam"):
    folder = folder_for(tmp_path, plans)
    return strategy_from_name(name, network=tiny_network(seed=seed), model_folder=folder, run_config=run_config)


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_start_writes_an_nnunet_model_folder_the_predictor_uses(tmp_path):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    strategy = fedadam(tmp_path)
    grid = LoopbackGrid([1, 2], site)

    result = strategy.start(grid, num_rounds=2)

    folder = strategy.model_folder
    assert folder.path == tmp_path / "results" / "Dataset901_Toy" / "nnUNetTrainer__nnUNetPlans__2d"
    assert json.loads((folder.path / "plans.json").read_text()) == PLANS
    assert json.loads((folder.path / "dataset.json").read_text()) == DATASET_JSON
    assert (folder.path / "dataset_fingerprint.json").is_file()
    assert sorted(p.name for p in folder.fold_dir.iterdir()) == [
        "checkpoint_best.pth",
        "checkpoint_final.pth",
        "checkpoint_latest.pth",
        "checkpoint_previous.pth",
    ]
    final = load(folder.checkpoint_path("final"))
    amap = strategy.model.alias_map
    assert list(final["network_weights"]) == list(amap.keys)
    assert AliasMap.from_state_dict(final["network_weights"]) == amap  # aliases share storage again
    assert all(torch.equal(final["network_weights"][k], v) for k, v in strategy.model.network.state_dict().items())
    assert final[STATE_KEY]["server_round"] == 2 and final[STATE_KEY]["strategy_state"] == {}
    assert set(load(folder.checkpoint_path("latest"))[STATE_KEY]["strategy_state"]) == {"m", "v", "site-diagnostics"}
    best = load(folder.checkpoint_path("best"))
    assert (best[STATE_KEY]["server_round"], best[STATE_KEY]["best_dice"]) == (2, 0.5)
    assert list(result.arrays.keys()) == list(amap.canonical_keys)

    predictor = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=False, device=torch.device("cpu"))
    predictor.initialize_from_trained_model_folder(str(folder.path), use_folds=("all",))
    image = np.random.default_rng(0).random((1, 1, 32, 32), dtype=np.float32)
    segmentation = predictor.predict_single_npy_array(image, {"spacing": [999.0, 1.0, 1.0]})
    assert segmentation.shape == (1, 32, 32) and set(np.unique(segmentation)) <= {0, 1}
    assert all(
        torch.equal(predictor.network.state_dict()[k], v) for k, v in strategy.model.network.state_dict().items()
    )


def test_resume_continues_with_round_counter_and_fedadam_moments(tmp_path):
    uninterrupted = fedadam(tmp_path / "a")
    uninterrupted.start(LoopbackGrid([1, 2], site), num_rounds=4)

    first = fedadam(tmp_path / "b")
    first.start(LoopbackGrid([1, 2], site), num_rounds=2)
    resumed = fedadam(tmp_path / "b", seed=5)  # a fresh server process: other initial weights
    assert resumed.resume() == 2
    rounds = []

    def recording_site(node: int, message) -> RecordDict:
        rounds.append((message.metadata.message_type, message.content["config"]["server-round"]))
        return site(node, message)

    ignored = to_array_record(tiny_network(seed=9).state_dict())  # a resumed run keeps its own model
    resumed.start(LoopbackGrid([1, 2], recording_site), initial_arrays=ignored, num_rounds=4)

    assert [r for kind, r in rounds if kind == MessageType.TRAIN] == [3, 3, 4, 4]
    assert resumed.checkpoints.completed_rounds == 4 and resumed.checkpoints.best_dice == 0.6
    for key, value in canonical(uninterrupted.model.network).items():
        assert torch.equal(canonical(resumed.model.network)[key], value), key
        for moment in ("m", "v"):
            assert torch.equal(resumed.buffers[moment][key], uninterrupted.buffers[moment][key]), (moment, key)


def test_resume_refuses_other_plans_run_config_or_strategy(tmp_path):
    fedadam(tmp_path).start(LoopbackGrid([1, 2], site), num_rounds=1)

    other_plans = tiny_plans(dataset_name="Dataset901_Toy")
    other_plans["configurations"]["2d"]["batch_size"] = 4
    with pytest.raises(ResumeError, match="other plans"):
        fedadam(tmp_path, plans=other_plans).resume()
    with pytest.raises(ResumeError, match=r"local-epochs: 1 -> 3"):
        fedadam(tmp_path, run_config={**RUN_CONFIG, "local-epochs": 3}).resume()
    with pytest.raises(ResumeError, match="written by NnUNetFedAdam, not NnUNetFedYogi"):
        fedadam(tmp_path, name="fedyogi").resume()
    assert fedadam(tmp_path, run_config={**RUN_CONFIG, "num-server-rounds": 9}).resume() == 1
    assert fedadam(tmp_path / "empty").resume() == 0


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, damage):
    strategy = fedadam(tmp_path)
    strategy.start(LoopbackGrid([1, 2], site), num_rounds=3)
    folder = strategy.model_folder
    latest = folder.checkpoint_path("latest")
    data = bytearray(latest.read_bytes())
    if damage == "truncate":
        latest.write_bytes(bytes(data[: len(data) // 2]))
    else:
        largest = max(canonical(strategy.model.network).values(), key=torch.Tensor.numel)
        data[data.index(largest.numpy().tobytes()) + 100] ^= 0xFF
        latest.write_bytes(bytes(data))

    with pytest.raises(CheckpointError):
        folder.load_checkpoint(latest)
    resumed = fedadam(tmp_path, seed=3)
    assert resumed.resume() == 2
    previous = load(folder.checkpoint_path("previous"))["network_weights"]
    assert all(torch.equal(v, previous[k]) for k, v in resumed.model.network.state_dict().items())

    for name in ("latest", "previous", "best", "final"):
        folder.checkpoint_path(name).write_bytes(b"not a checkpoint" if name == "previous" else b"")
    with pytest.raises(ResumeError, match="no intact checkpoint"):
        fedadam(tmp_path).resume()


def test_resume_with_latest_and_previous_damaged_uses_best_or_final_whichever_is_later(tmp_path, caplog):
    strategy = fedadam(tmp_path)
    strategy.start(LoopbackGrid([1, 2], site), num_rounds=3)  # best: round 2 (Dice 0.5); final: round 3
    folder = strategy.model_folder
    assert load(folder.checkpoint_path("best"))[STATE_KEY]["server_round"] == 2
    for name in ("latest", "previous"):
        path = folder.checkpoint_path(name)
        path.write_bytes(path.read_bytes()[:1000])

    with caplog.at_level("INFO"):
        resumed = fedadam(tmp_path, seed=3)
        assert resumed.resume() == 3
    assert "using checkpoint_final.pth (round 3): 2 newer checkpoint(s) damaged" in caplog.text
    final = load(folder.checkpoint_path("final"))["network_weights"]
    assert all(torch.equal(v, final[k]) for k, v in resumed.model.network.state_dict().items())
    assert "holds no strategy state" in caplog.text  # best and final keep only the weights: moments start afresh

    folder.checkpoint_path("final").write_bytes(b"")
    caplog.clear()
    with caplog.at_level("INFO"):
        assert fedadam(tmp_path, seed=3).resume() == 2
    assert "using checkpoint_best.pth (round 2): 3 newer checkpoint(s) damaged" in caplog.text


def test_checkpoint_writes_are_atomic_and_sized_by_unique_bytes(tmp_path):
    folder = folder_for(tmp_path)
    network = tiny_network()
    amap = AliasMap.from_module(network)
    weights = amap.expand(OrderedDict((k, v.detach().clone()) for k, v in canonical(network).items()))
    state = {"server_round": 1, "weights_sha256": "x"}
    folder.save_checkpoint("final", weights, state)
    folder.save_checkpoint("latest", weights, state)
    folder.save_checkpoint("latest", weights, state)

    assert sorted(p.name for p in folder.fold_dir.iterdir()) == [
        "checkpoint_final.pth",
        "checkpoint_latest.pth",
        "checkpoint_previous.pth",
    ]
    with pytest.raises(CheckpointError, match="do not match their stored digest"):
        folder.load_checkpoint(folder.checkpoint_path("final"))
    with pytest.raises(ValueError, match="checkpoint name must be one of"):
        folder.checkpoint_path("last")
    with pytest.raises(ValueError, match="configuration '3d_fullres' is not in the plans"):
        NnUNetModelFolder(tmp_path, PLANS, DATASET_JSON, None, "3d_fullres")


def test_resume_restores_a_dp_wrappers_clipping_norm(tmp_path):
    options = {"noise_multiplier": 0.0, "num_sampled_clients": 2, "initial_clipping_norm": 0.5}
    folder = folder_for(tmp_path)

    def wrapped(seed: int):
        return strategy_from_name(
            "fedadam", network=tiny_network(seed=seed), model_folder=folder, dp="server-adaptive", dp_options=options
        )

    first = wrapped(0)
    first.start(LoopbackGrid([1, 2], site), num_rounds=2)
    resumed = wrapped(4)

    assert resumed.resume() == 2
    assert resumed.clipping_norm == first.clipping_norm != 0.5
    for moment in ("m", "v"):
        assert all(
            torch.equal(t, first.strategy.buffers[moment][k]) for k, t in resumed.strategy.buffers[moment].items()
        )
    assert all(
        torch.equal(v, first.strategy.model.network.state_dict()[k])
        for k, v in resumed.strategy.model.network.state_dict().items()
    )


def test_from_model_folder_builds_the_network_nnunet_builds(tmp_path):
    from flwr_nnunet.strategy.server_optimizers import NnUNetFedYogi

    strategy = NnUNetFedYogi.from_model_folder(folder_for(tmp_path), eta=0.05)

    assert strategy.model.alias_map == AliasMap.from_module(tiny_network())
    assert (strategy.plans, strategy.eta, strategy.model_folder.configuration) == (PLANS, 0.05, "2d")
