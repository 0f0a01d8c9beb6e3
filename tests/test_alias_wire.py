"""The alias map on the wire: a site refuses a server whose alias map differs from its own network's."""

from __future__ import annotations

import json
import time

import pytest
import torch

from flwr_nnunet.apps.client import handle_message
from flwr_nnunet.core.aliasing import AliasMap
from flwr_nnunet.core.codec import to_array_record
from flwr_nnunet.demo.data import make_demo_dataset
from flwr_nnunet.nnunet.networks import build_trainer_network
from flwr_nnunet.site.site import Site
from flwr_nnunet.site.spec import SiteError, SiteSpec, TrainOptions


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("wire") / "data", num_sites=2)


def server_network(demo, trainer="nnUNetTrainer"):
    """The global network the server builds from the shared plans."""
    folder = demo.server.preprocessed_dataset_folder
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    torch.manual_seed(0)
    return build_trainer_network(plans, dataset_json, demo.configuration, trainer)


def server_record(demo, trainer="nnUNetTrainer"):
    """(canonical tensors, alias-map JSON) as the server sends them."""
    network = server_network(demo, trainer)
    amap = AliasMap.from_module(network)
    return amap.collapse(network.state_dict()), amap.to_json()


@pytest.fixture
def site(demo, tmp_path):
    spec = SiteSpec(
        name="site-0",
        dataset=demo.dataset_name,
        nnunet_preprocessed=demo.sites[0].nnunet_preprocessed,
        nnunet_results=tmp_path / "results",
        configuration=demo.configuration,
        device="cpu",
    )
    site = Site(spec)
    site.start(TrainOptions(local_epochs=1, num_epochs=2, server_round=1))
    return site


def snapshot(site):
    return {key: tensor.detach().clone() for key, tensor in site.network.state_dict().items()}


def assert_unchanged(site, before):
    after = site.network.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)


def halves(tensors):
    """The server's tensors with other values, so that a load would show."""
    return {key: torch.full_like(t, 0.5) if t.is_floating_point() else t + 3 for key, t in tensors.items()}


def test_the_alias_map_of_the_same_plans_and_trainer_is_accepted(demo, site):
    tensors, alias_map = server_record(demo)
    assert site.alias_map.difference(AliasMap.from_json(alias_map)) is None
    received = halves(tensors)
    site.load_global_(received, alias_map_json=alias_map)
    for key, tensor in site.canonical().items():
        assert torch.equal(tensor, received[key])


def test_the_alias_map_of_another_trainer_is_refused_before_any_weight_changes(demo, site):
    _, alias_map = server_record(demo, trainer="nnUNetTrainerBN")
    tensors, _ = server_record(demo)  # tensors that would fit: only the alias map is wrong
    before = snapshot(site)
    with pytest.raises(SiteError) as error:
        site.load_global_(halves(tensors), alias_map_json=alias_map)
    message = str(error.value)
    assert message.startswith("site-0: the server's alias map differs from this site's network")
    assert "running_mean" in message  # the first group the BatchNorm network has and this one lacks
    assert "same plans AND the same trainer class" in message and "'nnUNetTrainer'" in message
    assert_unchanged(site, before)


@pytest.mark.parametrize("edit", ["drop an alias", "rename an alias", "drop a group"])
def test_an_alias_map_edited_on_the_wire_is_refused_naming_the_group(demo, site, edit):
    tensors, alias_map = server_record(demo)
    document = json.loads(alias_map)
    group = document["groups"][5]
    canonical, alias = group[0], group[-1]
    if edit == "drop an alias":
        group.remove(alias)
    elif edit == "rename an alias":
        document["keys"] = [key + ".renamed" if key == alias else key for key in document["keys"]]
        group[-1] = alias + ".renamed"
    else:
        document["groups"].remove(group)  # every key of it becomes a group of its own
    before = snapshot(site)
    with pytest.raises(SiteError, match="differs from this site's network") as error:
        site.load_global_(halves(tensors), alias_map_json=json.dumps(document))
    assert f"group {canonical!r}" in str(error.value)
    assert_unchanged(site, before)


def test_an_unreadable_alias_map_is_refused(demo, site):
    tensors, _ = server_record(demo)
    before = snapshot(site)
    with pytest.raises(SiteError, match="'alias-map' cannot be read"):
        site.load_global_(halves(tensors), alias_map_json="{not json")
    assert_unchanged(site, before)


def _instruction(kind, content):
    from flwr.app import Metadata
    from flwr.app.message.message import make_message

    metadata = Metadata(
        run_id=71,
        message_id="instruction",
        src_node_id=1,
        dst_node_id=2,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )
    return make_message(metadata, content=content)


def test_the_client_replies_with_an_error_to_a_mismatched_alias_map(demo):
    from flwr.app import ConfigRecord, Context, MessageType, RecordDict

    tensors, _ = server_record(demo)
    _, alias_map = server_record(demo, trainer="nnUNetTrainerBN")
    run_config = {
        "data-root": str(demo.root),
        "dataset": demo.dataset_name,
        "configuration": demo.configuration,
        "trainer": "nnUNetTrainer",
        "fold": "0",
        "device": "cpu",
    }
    context = Context(run_id=71, node_id=2, node_config={"partition-id": 0}, state=RecordDict(), run_config=run_config)
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        config = ConfigRecord({"alias-map": alias_map, "server-round": 1, "num-epochs": 1})
        content = RecordDict({"arrays": to_array_record(tensors), "config": config})
        reply = handle_message(_instruction(kind, content), context, train=kind == MessageType.TRAIN)
        assert reply.has_error(), kind
        assert "the server's alias map differs from this site's network" in reply.error.reason
        assert "running_mean" in reply.error.reason


@pytest.mark.slow
def test_the_client_trains_with_the_matching_alias_map(demo):
    from flwr.app import ConfigRecord, Context, MessageType, RecordDict

    tensors, alias_map = server_record(demo)
    run_config = {"data-root": str(demo.root), "dataset": demo.dataset_name, "fold": "0", "device": "cpu"}
    context = Context(run_id=72, node_id=2, node_config={"partition-id": 1}, state=RecordDict(), run_config=run_config)
    config = ConfigRecord(
        {
            "alias-map": alias_map,
            "server-round": 1,
            "num-epochs": 1,
            "iterations-per-epoch": 1,
            "val-iterations-per-epoch": 1,
        }
    )
    content = RecordDict({"arrays": to_array_record(tensors), "config": config})
    reply = handle_message(_instruction(MessageType.TRAIN, content), context, train=True)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert set(reply.content["arrays"]) == set(tensors) and reply.content["metrics"]["num-examples"] > 0
