"""On a CUDA device: the server's global network and a site's nnU-Net training live on the GPU.

Skipped where torch sees no CUDA device (CI); run them on a GPU machine with
``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import shutil
from collections import OrderedDict

import pytest
import torch
from strategy_support import (
    LoopbackGrid,
    canonical,
    perturbed,
    reply,
    set_task_identity,
    tiny_network,
    tiny_plans,
)
from test_checkpoint import RUN_CONFIG, folder_for, load, site

from flwr_nnunet import AliasMap, NnUNetFedAvg, strategy_from_name
from flwr_nnunet.demo.data import make_demo_dataset
from flwr_nnunet.nnunet.digests import plans_sha256
from flwr_nnunet.nnunet.networks import build_trainer_network
from flwr_nnunet.site.site import Site
from flwr_nnunet.site.spec import SiteSpec, TrainOptions

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PLANS = tiny_plans()


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def on_cpu(tensors):
    return OrderedDict((k, v.detach().cpu().clone()) for k, v in tensors.items())


def storages(network: torch.nn.Module) -> int:
    return len({v.untyped_storage().data_ptr() for v in network.state_dict().values()})


def test_aggregation_into_a_cuda_network_is_exact_keeps_aliases_and_drops_a_nan_reply():
    network = tiny_network("batch").cuda()
    amap = AliasMap.from_module(network)
    strategy = NnUNetFedAvg(network, plans=PLANS)
    strategy.model.record()  # what configure_train sent: the roll-back point of the NaN check
    base = on_cpu(canonical(network))
    updates = [perturbed(base, seed) for seed in (1, 2, 3)]
    weights = [3, 1, 4.5]
    poisoned = perturbed(base, 4)
    poisoned[next(k for k, v in poisoned.items() if v.is_floating_point())].view(-1)[7] = float("nan")
    replies = [reply(i + 1, u, w) for i, (u, w) in enumerate(zip(updates, weights))] + [reply(9, poisoned, 50)]

    arrays, _ = strategy.aggregate_train(1, replies)

    after = canonical(network)
    for key, value in after.items():
        assert value.is_cuda, key
        reference = sum(w * u[key].double() for w, u in zip(weights, updates)) / sum(weights)
        if value.is_floating_point():
            torch.testing.assert_close(value.double().cpu(), reference, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(value.cpu(), reference.round().long()), key
    assert storages(network) == len(amap.groups) < len(amap.keys)
    assert all(torch.equal(torch.from_numpy(arrays[k].numpy()), after[k].cpu()) for k in after)

    weights_on_disk = io.BytesIO()
    torch.save(strategy.model.network_weights(), weights_on_disk)
    weights_on_disk.seek(0)
    loaded = torch.load(weights_on_disk, weights_only=True)
    assert all(t.device.type == "cpu" for t in loaded.values())
    assert AliasMap.from_state_dict(loaded) == amap


def test_fedadam_on_a_cuda_network_checkpoints_and_resumes_like_an_uninterrupted_run(tmp_path):
    def fedadam(path, seed=0):
        network = tiny_network(seed=seed).cuda()
        return strategy_from_name("fedadam", network=network, model_folder=folder_for(path), run_config=RUN_CONFIG)

    uninterrupted = fedadam(tmp_path / "a")
    uninterrupted.start(LoopbackGrid([1, 2], site), num_rounds=4)
    first = fedadam(tmp_path / "b")
    first.start(LoopbackGrid([1, 2], site), num_rounds=2)
    latest = load(first.model_folder.checkpoint_path("latest"))
    assert all(t.device.type == "cpu" for t in latest["network_weights"].values())

    resumed = fedadam(tmp_path / "b", seed=5)
    assert resumed.resume() == 2
    resumed.start(LoopbackGrid([1, 2], site), num_rounds=4)

    assert resumed.checkpoints.completed_rounds == 4
    for key, value in canonical(uninterrupted.model.network).items():
        assert value.is_cuda and torch.equal(canonical(resumed.model.network)[key], value), key
        for moment in ("m", "v"):
            assert torch.equal(resumed.buffers[moment][key], uninterrupted.buffers[moment][key]), (moment, key)
    final = load(resumed.model_folder.checkpoint_path("final"))
    assert AliasMap.from_state_dict(final["network_weights"]) == resumed.model.alias_map


@pytest.mark.parametrize(("dims", "compiled"), [(2, True), (3, False)])
def test_a_site_trains_evaluates_and_is_rebuilt_on_cuda(tmp_path, monkeypatch, dims, compiled):
    """nnU-Net compiles the network on CUDA by default (``nnUNet_compile``); both ways must work."""
    monkeypatch.setenv("nnUNet_compile", "true" if compiled else "false")
    demo = make_demo_dataset(tmp_path / "data", num_sites=2, dims=dims)
    spec = SiteSpec(
        name="site-0",
        dataset=demo.dataset_name,
        nnunet_preprocessed=demo.sites[0].nnunet_preprocessed,
        nnunet_results=tmp_path / "results",
        configuration=demo.configuration,
        device="auto",
    )
    folder = demo.server.preprocessed_dataset_folder
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    torch.manual_seed(0)
    network = build_trainer_network(plans, dataset_json, demo.configuration, spec.trainer)
    initial = AliasMap.from_module(network).collapse(network.state_dict())

    def options(server_round):
        return TrainOptions(
            local_epochs=1,
            num_epochs=4,
            iterations_per_epoch=6,
            val_iterations_per_epoch=2,
            seed=3,
            server_round=server_round,
        )

    live = Site(spec)
    returned, metrics = live.train(initial, options(1), plans_sha256(plans))
    assert live.trainer.device.type == "cuda"
    assert hasattr(live.trainer.network, "_orig_mod") == compiled
    assert all(p.is_cuda for p in live.network.parameters())
    assert all(torch.isfinite(t).all() for t in returned.values() if t.is_floating_point())
    assert any(not torch.equal(returned[k].cpu(), initial[k]) for k in initial)
    assert metrics["epoch"] == 1 and math.isfinite(live.trainer.logger.get_value("train_losses", step=-1))
    global_2 = on_cpu(returned)

    shutil.copytree(tmp_path / "results", tmp_path / "copy")
    rebuilt = Site(dataclasses.replace(spec, nnunet_results=tmp_path / "copy"))  # a fresh SuperNode process
    rebuilt.start(options(2))
    assert rebuilt.trainer.device.type == "cuda" and rebuilt.trainer.current_epoch == 1
    for key, state in live.trainer.optimizer.state_dict()["state"].items():
        rebuilt_buffer = rebuilt.trainer.optimizer.state_dict()["state"][key]["momentum_buffer"]
        assert rebuilt_buffer.is_cuda and torch.equal(state["momentum_buffer"], rebuilt_buffer)

    evaluation = rebuilt.evaluate(global_2, options(2))
    assert evaluation["num-examples"] == len(demo.sites[0].validation_cases)
    assert 0.0 <= evaluation["dice"] <= 1.0
