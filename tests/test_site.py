"""A site: real nnU-Net trainers on the synthetic demo data (tiny plans, a few iterations)."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch

from flwr_nnunet.apps.client import dp_clipping_mod, site_spec
from flwr_nnunet.core.aliasing import AliasMap
from flwr_nnunet.core.codec import from_array_record, to_array_record
from flwr_nnunet.demo.data import make_demo_dataset
from flwr_nnunet.nnunet.digests import plans_sha256
from flwr_nnunet.nnunet.networks import build_trainer_network
from flwr_nnunet.site.site import Site
from flwr_nnunet.site.spec import SiteError, SiteSpec, TrainOptions


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("site") / "data", num_sites=2)


def spec_for(demo, results, *, site=0, trainer="nnUNetTrainer", preprocessed=None):
    return SiteSpec(
        name=f"site-{site}",
        dataset=demo.dataset_name,
        nnunet_preprocessed=preprocessed or demo.sites[site].nnunet_preprocessed,
        nnunet_results=results,
        configuration=demo.configuration,
        trainer=trainer,
        device="cpu",
    )


def initial_weights(demo, trainer="nnUNetTrainer", seed=0):
    folder = demo.server.preprocessed_dataset_folder
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    torch.manual_seed(seed)
    network = build_trainer_network(plans, dataset_json, demo.configuration, trainer)
    return AliasMap.from_module(network).collapse(network.state_dict())


def options(server_round, *, mu=0.0, num_epochs=4, iterations=4):
    return TrainOptions(
        local_epochs=1,
        num_epochs=num_epochs,
        iterations_per_epoch=iterations,
        val_iterations_per_epoch=2,
        proximal_mu=mu,
        seed=7,
        server_round=server_round,
    )


def copies(tensors):
    return {key: tensor.detach().clone() for key, tensor in tensors.items()}


def optimizer_state(site):
    return site.trainer.optimizer.state_dict()


@pytest.mark.slow
def test_rebuilt_site_continues_exactly_like_the_live_one(demo, tmp_path):
    spec = spec_for(demo, tmp_path / "results")
    live = Site(spec)
    global_1 = initial_weights(demo)
    returned, metrics = live.train(global_1, options(1), plans_sha256(live.check()))
    assert metrics["num-examples"] == len(demo.sites[0].training_cases) - len(demo.sites[0].validation_cases)
    assert spec.state_file.is_file()
    global_2 = copies(returned)

    # What a fresh SuperNode process does in round 2 (on a copy of the state, so both can go on independently).
    shutil.copytree(tmp_path / "results", tmp_path / "copy")
    rebuilt = Site(spec_for(demo, tmp_path / "copy"))
    rebuilt.start(options(2))
    assert rebuilt.trainer.current_epoch == live.trainer.current_epoch == 1
    assert rebuilt.trainer.optimizer.param_groups[0]["lr"] == live.trainer.optimizer.param_groups[0]["lr"]
    live_state, rebuilt_state = optimizer_state(live), optimizer_state(rebuilt)
    assert live_state["state"].keys() == rebuilt_state["state"].keys() and live_state["state"]
    for key, state in live_state["state"].items():
        assert torch.equal(state["momentum_buffer"], rebuilt_state["state"][key]["momentum_buffer"])
    assert rebuilt.trainer.logger.get_checkpoint() == live.trainer.logger.get_checkpoint()

    after_live, _ = live.train(global_2, options(2))
    after_live = copies(after_live)
    after_rebuilt, _ = rebuilt.train(global_2, options(2))
    assert after_live.keys() == after_rebuilt.keys()
    for key in after_live:
        assert torch.equal(after_live[key], after_rebuilt[key]), key
    assert live.trainer.current_epoch == rebuilt.trainer.current_epoch == 2
    # PolyLR over the federation's 4 epochs: epoch 1 runs at 0.01 * (1 - 1/4) ** 0.9.
    assert rebuilt.trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.75**0.9)

    evaluation = rebuilt.evaluate(global_2, options(2))
    assert evaluation["num-examples"] == len(demo.sites[0].validation_cases)
    assert 0.0 <= evaluation["dice"] <= 1.0 and len(evaluation["dice-per-class"]) == 2


@pytest.mark.slow
def test_learning_rate_never_passes_the_end_of_the_schedule(demo, tmp_path):
    site = Site(spec_for(demo, tmp_path / "results"))
    weights = initial_weights(demo)
    for server_round in (1, 2, 3):  # a third round on a 2-epoch schedule (e.g. a resumed run with more rounds)
        weights, metrics = site.train(copies(weights), options(server_round, num_epochs=2, iterations=1))
        assert isinstance(metrics["learning-rate"], float) and metrics["learning-rate"] >= 0.0
    assert site.trainer.current_epoch == 3 and site.trainer.num_epochs == 3


def update_distance(update, anchor):
    return sum(((update[k].float() - anchor[k].float()) ** 2).sum() for k in anchor).sqrt().item()


@pytest.mark.slow
def test_fedprox_pulls_the_local_update_toward_the_global_weights(demo, tmp_path):
    start = initial_weights(demo)
    parameters = [k for k in start if start[k].is_floating_point()]
    distances, updates = [], []
    for mu in (0.0, 10.0, 50.0):
        update, _ = Site(spec_for(demo, tmp_path / f"mu{mu}")).train(copies(start), options(1, mu=mu, iterations=6))
        updates.append(update)
        distances.append(update_distance({k: update[k] for k in parameters}, {k: start[k] for k in parameters}))
    # Same data, seed and start: only the proximal term differs, and a larger mu stays closer to the global model.
    assert distances[2] < distances[1] < 0.8 * distances[0]
    assert any(not torch.equal(updates[0][k], updates[1][k]) for k in parameters)


def test_missing_dataset_is_refused_with_the_fix(demo, tmp_path):
    site = Site(spec_for(demo, tmp_path / "results", preprocessed=tmp_path / "nowhere"))
    with pytest.raises(SiteError, match="not found") as error:
        site.check()
    assert "nnunet-preprocessed" in str(error.value) and "data-root" in str(error.value)
    assert "node-config 'dataset'" in str(error.value)
    assert "nnUNetv2_preprocess -d 987 -plans_name nnUNetPlans -c 2d" in str(error.value)


def test_dataset_that_is_not_preprocessed_is_refused_with_the_fix(demo, tmp_path):
    source = demo.sites[0].preprocessed_dataset_folder
    copy = tmp_path / "pp" / demo.dataset_name
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("nnUNetPlans_2d"))
    site = Site(spec_for(demo, tmp_path / "results", preprocessed=tmp_path / "pp"))
    with pytest.raises(SiteError, match="holds no preprocessed cases; run nnUNetv2_preprocess -d 987"):
        site.check()


def test_site_planned_with_other_plans_is_refused_with_the_fix(demo, tmp_path):
    site = Site(spec_for(demo, tmp_path / "results"))
    plans = site.check()
    other = json.loads(json.dumps(plans))
    other["configurations"]["2d"]["batch_size"] = 5
    assert site.check(plans_sha256(plans)) == plans
    with pytest.raises(SiteError, match="differs from the server's plans") as error:
        site.check(plans_sha256(other))
    assert "nnUNetv2_move_plans_between_datasets" in str(error.value)


def test_server_network_matches_the_site_network_of_a_trainer_variant(demo, tmp_path):
    received = initial_weights(demo, trainer="nnUNetTrainerBN")
    assert any("running_mean" in key for key in received)
    site = Site(spec_for(demo, tmp_path / "results", trainer="nnUNetTrainerBN"))
    site.start(options(1))
    site.load_global_(received)
    for key, tensor in site.canonical().items():
        assert torch.equal(tensor, received[key]) and tensor.dtype == received[key].dtype


def test_local_groups_keep_the_site_values(demo, tmp_path):
    site = Site(spec_for(demo, tmp_path / "results"))
    site.start(options(1))
    local = site.alias_map.select(lambda key: ".norm." in key)
    before = copies(site.canonical())
    received = {k: torch.full_like(v, 0.5) for k, v in initial_weights(demo).items() if k not in local}
    site.load_global_(received, local)
    after = site.canonical()
    assert all(torch.equal(after[k], before[k]) for k in local)
    assert all(torch.equal(after[k], received[k]) for k in received)
    with pytest.raises(SiteError, match="does not fit this site's network"):
        site.load_global_(received)


def test_site_spec_from_simulation_and_deployment_configs(tmp_path, monkeypatch):
    run_config = {"data-root": str(tmp_path), "dataset": "Dataset987_FedDemo", "configuration": "2d", "fold": "0"}
    simulated = site_spec(run_config, {"partition-id": 1, "num-partitions": 2})
    assert simulated.name == "site-1" and simulated.nnunet_preprocessed == tmp_path / "site-1" / "nnUNet_preprocessed"
    assert simulated.fold == 0
    node = {"nnunet-preprocessed": str(tmp_path / "pp"), "nnunet-results": str(tmp_path / "res"), "site-name": "h1"}
    deployed = site_spec(run_config, node, node_id=5)
    assert (deployed.name, deployed.nnunet_results) == ("h1", tmp_path / "res")
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    with pytest.raises(SiteError, match="--node-config"):
        site_spec(run_config, {}, node_id=5)


def _message(kind, content, reply=False):
    from flwr.app import Metadata
    from flwr.app.message.message import make_message

    metadata = Metadata(
        run_id=1,
        message_id="reply" if reply else "instruction",
        src_node_id=2 if reply else 1,
        dst_node_id=1 if reply else 2,
        reply_to_message_id="instruction" if reply else "",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )
    return make_message(metadata, content=content)


def test_client_side_dp_clips_the_canonical_update():
    from flwr.app import ConfigRecord, Context, MessageType, MetricRecord, RecordDict

    start = {"encoder.w": torch.zeros(3), "decoder.w": torch.zeros(4)}
    update = {"encoder.w": torch.full((3,), 3.0), "decoder.w": torch.full((4,), 4.0)}  # norm sqrt(91)

    def reply(message, context):
        content = RecordDict({"arrays": to_array_record(update), "metrics": MetricRecord({"num-examples": 2})})
        return _message(message.metadata.message_type, content, reply=True)

    for kind, dp, expected in [
        (MessageType.TRAIN, "client-fixed", 1.0),
        (MessageType.TRAIN, "", 91**0.5),
        (MessageType.EVALUATE, "client-fixed", 91**0.5),
    ]:
        content = RecordDict({"arrays": to_array_record(start), "config": ConfigRecord({"clipping_norm": 1.0})})
        context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={"dp": dp})
        out = dp_clipping_mod(_message(kind, content), context, reply)
        clipped = from_array_record(out.content["arrays"])
        assert sum((t.double() ** 2).sum() for t in clipped.values()).sqrt().item() == pytest.approx(expected)


@pytest.mark.slow
def test_a_site_trained_by_another_process_meanwhile_is_rebuilt_from_disk(demo, tmp_path):
    spec = spec_for(demo, tmp_path / "results")
    first, second = Site(spec), Site(spec)  # two simulation actors that both serve this site
    weights, _ = first.train(initial_weights(demo), options(1, iterations=1))
    weights, _ = second.train(copies(weights), options(2, iterations=1))
    _, metrics = first.train(copies(weights), options(3, iterations=1))
    assert metrics["epoch"] == first.trainer.current_epoch == 3
    assert len(first.trainer.logger.get_value("train_losses", step=None)) == 3
