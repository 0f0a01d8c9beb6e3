"""Sites that keep their own plans (run-config layer-matching = "role"), through the ServerApp and the ClientApp.

Two sites of the demo's kind planned on their own data as bench/role_matching.py makes them (64x64: 5 stages,
128x128: 6 stages, 2D), plus a third whose plans the server does not hold; the ServerApp's whole run with every
message delivered in-process to ``client_app.py`` (tests/federation_support.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from federation_support import run_config, run_federation

from flwr_nnunet.core.aliasing import AliasMap
from flwr_nnunet.core.packed_arrays import is_packed, unpack_content
from flwr_nnunet.nnunet.checkpoint_io import load_checkpoint
from flwr_nnunet.nnunet.digests import plans_sha256
from flwr_nnunet.nnunet.layer_roles import match_layers, role_keys
from flwr_nnunet.nnunet.networks import build_trainer_network

MAIN, DEEP, UNKNOWN = "nnUNetPlans", "nnUNetPlans128", "nnUNetPlansOther"
NODE_PLANS = {1: {"plans": DEEP}, 2: {"plans": UNKNOWN}}
"""Site K's node config besides its partition id: site-0 trains the run's plans."""


def _renamed(plans: dict, name: str) -> dict:
    return {**plans, "plans_name": name}


def _site_folder(source: Path, target: Path, plans_name: str) -> None:
    """The site's preprocessed dataset folder copied, its plans file named (and its plans_name set) ``plans_name``."""
    shutil.copytree(source, target)
    plans = json.loads((target / "nnUNetPlans.json").read_text())
    (target / "nnUNetPlans.json").unlink()
    (target / f"{plans_name}.json").write_text(json.dumps(_renamed(plans, plans_name)))


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory):
    """``<root>``: site-0 the 64x64 demo's first site (its plans: the run's), site-1 the 128x128 demo's second site
    (its own plans, ``nnUNetPlans128``, 6 stages), site-2 the 64x64 demo's second site with plans the server lacks."""
    from flwr_nnunet.demo.data import make_demo_dataset

    work = tmp_path_factory.mktemp("role-federation")
    small = make_demo_dataset(work / "demo-64", num_sites=2, size=64)
    large = make_demo_dataset(work / "demo-128", num_sites=2, size=128)
    root, dataset = work / "data", small.dataset_name
    server = root / "server" / "nnUNet_preprocessed" / dataset
    server.mkdir(parents=True)
    for name in ("nnUNetPlans.json", "dataset.json", "dataset_fingerprint.json"):
        shutil.copyfile(small.server.preprocessed_dataset_folder / name, server / name)
    deep = _renamed(json.loads(large.plans_file.read_text()), DEEP)
    (server / f"{DEEP}.json").write_text(json.dumps(deep))
    for k, (source, plans_name) in enumerate(
        ((small.sites[0], MAIN), (large.sites[1], DEEP), (small.sites[1], UNKNOWN))
    ):
        target = root / f"site-{k}" / "nnUNet_preprocessed" / dataset
        if plans_name == MAIN:
            shutil.copytree(source.preprocessed_dataset_folder, target)
        else:
            _site_folder(source.preprocessed_dataset_folder, target, plans_name)
    plans = {name: json.loads((server / f"{name}.json").read_text()) for name in (MAIN, DEEP)}
    return {
        "root": root,
        "dataset": dataset,
        "plans": plans,
        "dataset_json": json.loads((server / "dataset.json").read_text()),
    }


def _config(hospitals, **overrides):
    values = {
        "planning": "fixed",
        "layer-matching": "role",
        "min-train-nodes": 2,
        "min-evaluate-nodes": 2,
        "min-available-nodes": 3,
        **overrides,
    }
    return run_config(hospitals["root"], hospitals["dataset"], "2d", 3, **values)


def _canonical(plans: dict, dataset_json: dict) -> dict[str, tuple[int, ...]]:
    network = build_trainer_network(plans, dataset_json, "2d")
    return {k: tuple(t.shape) for k, t in AliasMap.from_module(network).collapse(network.state_dict()).items()}


@pytest.fixture(scope="module")
def federation(hospitals):
    """One round of the three sites (site-2 refused), every instruction recorded; the Flower log kept."""
    import logging

    from test_federated_planning import QueryGrid

    sent, records = [], []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("flwr").addHandler(handler)
    deliver = QueryGrid.send_and_receive

    def recording(self, messages, *, timeout=None):
        messages = list(messages)
        sent.extend(messages)
        return deliver(self, messages, timeout=timeout)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(QueryGrid, "send_and_receive", recording)
            run = run_federation(_config(hospitals), 3)  # simulation: each site's plans found in its folder
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    lines = [record.getMessage() for record in records]
    return {**run, "sent": sent, "log": lines, "results": run["model"].parent}


def _folder(federation, plans_name):
    return federation["results"] / f"nnUNetTrainer__{plans_name}__2d" / "fold_all"


def test_each_site_receives_exactly_its_own_plans_model(federation, hospitals):
    from flwr.app import MessageType

    expected = {100: MAIN, 101: DEEP}
    train = [m for m in federation["sent"] if m.metadata.message_type == MessageType.TRAIN]
    assert sorted(m.metadata.dst_node_id for m in train) == [100, 101]  # site-2 (plans the server lacks) left out
    for message in train:
        plans = hospitals["plans"][expected[message.metadata.dst_node_id]]
        assert is_packed(message.content["arrays"])  # as it went out: two Arrays, the whole model packed
        arrays = unpack_content(message.content)["arrays"]
        shapes = {key: tuple(array.shape) for key, array in arrays.items()}
        assert shapes == _canonical(plans, hospitals["dataset_json"])
        assert message.content["config"]["plans-sha256"] == plans_sha256(plans)
    evaluate = [m for m in federation["sent"] if m.metadata.message_type == MessageType.EVALUATE]
    assert sorted(m.metadata.dst_node_id for m in evaluate) == [100, 101]


def test_the_run_completes_and_every_site_trained(federation):
    history = federation["history"]
    assert sorted(history) == ["1"]
    assert any(
        "by role: nnUNetPlans 1 reply (nodes [100]" in line and "nnUNetPlans128 1 reply (nodes [101]" in line
        for line in federation["log"]
    )
    for plans_name in (MAIN, DEEP):
        assert (_folder(federation, plans_name) / "checkpoint_final.pth").is_file()
    assert not (federation["results"] / f"nnUNetTrainer__{UNKNOWN}__2d").exists()


def test_a_site_whose_plans_the_server_lacks_is_refused_by_name(federation):
    refused = [line for line in federation["log"] if "node 102 is left out" in line]
    assert refused and "site-2" in refused[0] and UNKNOWN in refused[0] and "does not hold" in refused[0]


def test_matched_units_are_equal_across_the_plans_checkpoints_and_name_twins_differ(federation, hospitals):
    """Each plans' final checkpoint loads with the safe loader, its aliases share storage; the units matched by role
    hold one value in both, and layers of one name and shape that are not one role (other resolutions) differ."""
    weights, canonical = {}, {}
    for plans_name in (MAIN, DEEP):
        checkpoint = load_checkpoint(_folder(federation, plans_name) / "checkpoint_final.pth")
        network = build_trainer_network(hospitals["plans"][plans_name], hospitals["dataset_json"], "2d")
        weights[plans_name] = checkpoint["network_weights"]
        assert AliasMap.from_state_dict(weights[plans_name]).groups == AliasMap.from_module(network).groups
        canonical[plans_name] = AliasMap.from_module(network).collapse(weights[plans_name])
    matching = match_layers({n: {k: t.shape for k, t in c.items()} for n, c in canonical.items()}, role_keys)
    pairs = matching.pairs(MAIN, DEEP)
    assert len(pairs) > 10 and matching.local(DEEP)
    for key, other in pairs.items():
        assert torch.equal(canonical[MAIN][key], canonical[DEEP][other]), key
    twins = [
        k
        for k, t in canonical[MAIN].items()
        if k in canonical[DEEP] and canonical[DEEP][k].shape == t.shape and pairs.get(k) != k
    ]
    assert twins  # e.g. decoder.seg_layers.3: the head one stage below full resolution in one, above in the other
    for key in twins:
        assert not torch.equal(canonical[MAIN][key], canonical[DEEP][key]), key


def test_resume_continues_every_plans_folder_and_refuses_a_missing_one(federation, hospitals, tmp_path):
    from flwr_nnunet.apps.config_errors import ServerConfigError
    from flwr_nnunet.apps.server import _resume, build_strategy, read_settings

    config = _config(hospitals, resume=True)
    strategy = build_strategy(read_settings(config), config)
    _resume(strategy, config)
    assert strategy.checkpoints.completed_rounds == 1
    final = load_checkpoint(_folder(federation, DEEP) / "checkpoint_latest.pth")["network_weights"]
    network = strategy.members[DEEP].model.network.state_dict()
    assert all(torch.equal(network[k], final[k]) for k in final)
    moved = tmp_path / "deep"
    shutil.move(_folder(federation, DEEP), moved)
    try:
        with pytest.raises(
            ServerConfigError, match=rf"{DEEP}: round 0.*{MAIN}: round 1|{MAIN}: round 1.*{DEEP}: round 0"
        ):
            _resume(build_strategy(read_settings(config), config), config)
    finally:
        shutil.rmtree(_folder(federation, DEEP), ignore_errors=True)
        shutil.move(moved, _folder(federation, DEEP))


def test_a_node_not_surveyed_is_asked_before_its_first_instruction(federation, hospitals, tmp_path):
    """Without the survey before round 1 (a node that connects later): configure_train asks each node first, and
    instructs only those whose plans the server holds."""
    from flwr.app import ArrayRecord, ConfigRecord
    from test_federated_planning import query_grid

    from flwr_nnunet.apps.server import build_strategy, read_settings

    config = _config(hospitals, **{"results-dir": str(tmp_path / "results")})
    grid = query_grid(config, 3)
    for site, entries in NODE_PLANS.items():
        grid.contexts[100 + site].node_config.update(entries)
    strategy = build_strategy(read_settings(config), config)
    messages = strategy.configure_train(1, ArrayRecord(), ConfigRecord({"local-epochs": 1}), grid)
    assert {m.metadata.dst_node_id: m.content["config"]["plans-sha256"] for m in messages} == {
        100: plans_sha256(hospitals["plans"][MAIN]),
        101: plans_sha256(hospitals["plans"][DEEP]),
    }
    assert [m.metadata.message_type for m in grid.replies] == ["query"] * 3  # one question each, nothing trained
    assert strategy.site_plans == {100: MAIN, 101: DEEP} and "does not hold" in strategy.refused[102]
    strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord({}), grid)
    assert len(grid.replies) == 3  # asked once


def test_below_min_train_nodes_the_run_stops_before_training_naming_the_site(federation, hospitals, tmp_path):
    from flwr.app import Context, RecordDict
    from test_federated_planning import query_grid

    from flwr_nnunet.apps.config_errors import ServerConfigError
    from flwr_nnunet.apps.server import run_server

    config = _config(hospitals, **{"min-train-nodes": 3, "results-dir": str(tmp_path / "results")})
    grid = query_grid(config, 3)
    for site, entries in NODE_PLANS.items():
        grid.contexts[100 + site].node_config.update(entries)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(config))
    with pytest.raises(ServerConfigError, match=rf"min-train-nodes=3: node 102: site-2 trains plans '{UNKNOWN}'"):
        run_server(grid, context)
    assert not any(m.metadata.message_type == "train" for m in grid.replies)
    assert not list((tmp_path / "results").rglob("*.pth"))


def test_without_layer_matching_a_site_with_its_own_plans_is_refused_naming_the_fix(hospitals):
    """The federation's model sent to the site that names its own plans: refused before its trainer is touched."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
    from test_federated_planning import query_grid

    config = run_config(hospitals["root"], hospitals["dataset"], "2d", 3, planning="fixed")
    grid = query_grid(config, 3)
    grid.contexts[101].node_config.update(NODE_PLANS[1])
    main = hospitals["plans"][MAIN]
    network = build_trainer_network(main, hospitals["dataset_json"], "2d")
    amap = AliasMap.from_module(network)
    instruction = Message(
        RecordDict(
            {
                "arrays": ArrayRecord(amap.collapse(network.state_dict())),
                "config": ConfigRecord(
                    {
                        "server-round": 1,
                        "local-epochs": 1,
                        "num-epochs": 1,
                        "alias-map": amap.to_json(),
                        "plans-sha256": plans_sha256(main),
                    }
                ),
            }
        ),
        dst_node_id=101,
        message_type=MessageType.TRAIN,
    )
    (reply,) = grid.send_and_receive([instruction])
    assert reply.has_error()
    assert "site-1" in reply.error.reason and DEEP in reply.error.reason
    assert "layer-matching='role'" in reply.error.reason and "node-config plans" in reply.error.reason


@pytest.mark.parametrize(
    ("key", "value", "fix"),
    [
        ("compression", "int8-block", "compression='none'"),
        ("dp", "server-fixed", "dp=''"),
        ("streaming", True, "streaming=false"),
        ("personalization", "mr-mtl", "personalization=''"),
        ("crossval", True, "crossval=false"),
        ("fine-tune-epochs", 1, "fine-tune-epochs=0"),
        ("cross-site-evaluation", "global", "cross-site-evaluation=''"),
        ("find-best-configuration", "2d 3d_fullres", "find-best-configuration=''"),
        ("planning", "federated", "planning='fixed'"),
        ("strategy", "fedadam", "strategy='fedavg'"),
    ],
)
def test_combinations_not_supported_yet_are_refused_naming_the_key(key, value, fix):
    from flwr_nnunet.apps.config_errors import ServerConfigError
    from flwr_nnunet.apps.own_plans import check_layer_matching_settings
    from flwr_nnunet.apps.run_config import RunSettings

    base = {"layer-matching": "role", "planning": "fixed", "make-demo": False}
    check_layer_matching_settings(RunSettings.from_run_config(base))
    with pytest.raises(ServerConfigError, match=rf"{key}=.*set {fix}"):
        check_layer_matching_settings(RunSettings.from_run_config({**base, key: value}))
    check_layer_matching_settings(RunSettings.from_run_config({key: value}))  # without layer-matching: not this check


def test_an_unknown_layer_matching_is_refused_naming_the_values():
    from flwr_nnunet.apps.config_errors import ServerConfigError
    from flwr_nnunet.apps.own_plans import check_layer_matching_settings
    from flwr_nnunet.apps.run_config import RunSettings

    with pytest.raises(ServerConfigError, match="layer-matching to '' .* or 'role'"):
        check_layer_matching_settings(RunSettings.from_run_config({"layer-matching": "name"}))


def _two_plans_strategy(**kwargs):
    """A 3-stage plans A (nodes 1 and 3) and a 4-stage plans B (node 2), built from tiny nnU-Net plans."""
    from strategy_support import set_task_identity, tiny_architecture, tiny_plans

    from flwr_nnunet.nnunet.networks import build_network
    from flwr_nnunet.strategy.role_fedavg import RoleMatchedFedAvg

    set_task_identity()
    plans, networks = {}, {}
    for name, features in (("A", (4, 8, 16)), ("B", (4, 8, 16, 32))):
        plans[name] = tiny_plans(features=features)
        torch.manual_seed(0)
        networks[name] = build_network(tiny_architecture(features=features), 1, 2)
    return RoleMatchedFedAvg(networks, plans, site_plans={1: "A", 2: "B", 3: "A"}, **kwargs)


def _values(strategy):
    return {name: {k: t.clone() for k, t in m.model.tensors.items()} for name, m in strategy.members.items()}


def test_each_unit_is_the_case_weighted_mean_over_every_plans_that_has_it():
    from strategy_support import perturbed, reply

    strategy = _two_plans_strategy(min_train_nodes=3)
    before = _values(strategy)
    updates = {1: perturbed(before["A"], 1), 3: perturbed(before["A"], 3), 2: perturbed(before["B"], 2)}
    weights = {1: 10, 3: 30, 2: 20}
    arrays, _ = strategy.aggregate_train(1, [reply(n, updates[n], weights[n]) for n in (2, 1, 3)])
    after = _values(strategy)
    pairs = strategy.matching.pairs("A", "B")
    assert pairs and strategy.matching.local("B") and not strategy.matching.local("A")
    for key, other in pairs.items():
        if not before["A"][key].is_floating_point():
            continue
        expected = (10 * updates[1][key] + 30 * updates[3][key] + 20 * updates[2][other]) / 60
        torch.testing.assert_close(after["A"][key], expected)
        assert torch.equal(after["A"][key], after["B"][other])
    for key in strategy.matching.local("B"):  # the deepest stage: only plans B's one site has it
        torch.testing.assert_close(after["B"][key], updates[2][key])
    assert set(arrays.keys()) == set(before["A"])  # the main plans' record


def test_a_reply_of_the_wrong_plans_is_refused_and_a_refused_round_changes_no_model(flwr_log):
    from strategy_support import perturbed, reply

    strategy = _two_plans_strategy(min_train_nodes=2)
    before = _values(strategy)
    wrong = reply(2, perturbed(before["A"], 2))  # node 2 trains plans B but replies with plans A's tensors
    assert strategy.aggregate_train(1, [reply(1, perturbed(before["A"], 1)), wrong]) == (None, None)
    assert any("rejected reply from node 2" in r.getMessage() for r in flwr_log)
    after = _values(strategy)
    assert all(torch.equal(before[n][k], after[n][k]) for n in before for k in before[n])
    nan = perturbed(before["B"], 2)
    next(t for t in nan.values() if t.is_floating_point()).fill_(float("nan"))
    assert strategy.aggregate_train(2, [reply(1, perturbed(before["A"], 1)), reply(2, nan)]) == (None, None)
    assert all(torch.equal(before[n][k], after[n][k]) for n in before for k in before[n])


def test_local_norms_stay_at_each_site_and_out_of_the_matching():
    from flwr.app import ArrayRecord, ConfigRecord
    from strategy_support import LoopbackGrid

    from flwr_nnunet.nnunet.networks import is_normalization_key

    strategy = _two_plans_strategy(local_keys=is_normalization_key, min_available_nodes=3)
    everything = _two_plans_strategy()
    for name, member in strategy.members.items():
        kept = set(everything.members[name].model.tensors) - set(member.model.tensors)
        assert kept and all(is_normalization_key(key) for key in kept)
        assert set(member.model.local_groups) == kept
    matched = {key for unit in strategy.matching.units for _, key in unit}
    assert matched and not any(is_normalization_key(key) for key in matched)
    messages = strategy.configure_train(1, ArrayRecord(), ConfigRecord({}), LoopbackGrid([1, 2, 3], handler=None))
    for message in messages:
        plans = strategy.site_plans[message.metadata.dst_node_id]
        local = strategy.members[plans].model.local_groups
        assert sorted(json.loads(message.content["config"]["local-keys"])) == sorted(local)
        assert not set(message.content["arrays"].keys()) & set(local)


def test_run_config_local_norms_reaches_every_plans_and_the_single_plans_strategy(hospitals):
    from flwr_nnunet.apps.server import _core, build_strategy, read_settings
    from flwr_nnunet.nnunet.networks import is_normalization_key

    role = _config(hospitals, **{"local-norms": True})
    for member in build_strategy(read_settings(role), role).members.values():
        assert member.model.local_groups and all(map(is_normalization_key, member.model.local_groups))
    single = run_config(hospitals["root"], hospitals["dataset"], "2d", 3, planning="fixed", **{"local-norms": True})
    local = _core(build_strategy(read_settings(single), single)).model.local_groups
    assert local and all(map(is_normalization_key, local))
    default = run_config(hospitals["root"], hospitals["dataset"], "2d", 3, planning="fixed")
    assert _core(build_strategy(read_settings(default), default)).model.local_groups == ()


def test_with_local_norms_two_rounds_train_and_the_server_never_touches_a_norm(hospitals, tmp_path):
    """A role run with run-config local-norms: no reply carries a normalization layer, every plans' global
    checkpoint keeps its initial normalization layers, and each site's personal model is the global one with its
    own."""
    from flwr_nnunet.nnunet.networks import is_normalization_key

    config = _config(hospitals, **{"local-norms": True, "num-server-rounds": 2, "results-dir": str(tmp_path)})
    run = run_federation(config, 3)
    assert sorted(run["history"]) == ["1", "2"]
    trained = [m for m in run["grid"].replies if m.metadata.message_type == "train"]
    assert len(trained) == 4 and not any(is_normalization_key(key) for m in trained for key in m.content["arrays"])
    for plans_name in (MAIN, DEEP):
        torch.manual_seed(config["seed"])
        initial = build_trainer_network(hospitals["plans"][plans_name], hospitals["dataset_json"], "2d").state_dict()
        folder = run["model"].parent / f"nnUNetTrainer__{plans_name}__2d" / "fold_all"
        final = load_checkpoint(folder / "checkpoint_final.pth")["network_weights"]
        amap = AliasMap.from_state_dict(final)
        local = set(amap.select(is_normalization_key))
        norms = {key for key in final if amap.canonical_of(key) in local}  # with their aliases (all_modules.1)
        shared = set(final) - norms
        assert norms and all(torch.equal(final[key], initial[key]) for key in norms)
        assert not all(torch.equal(final[key], initial[key]) for key in shared)
        site = 0 if plans_name == MAIN else 1  # its model: the global one with its own norms, for nnUNetv2_predict
        (personal,) = (hospitals["root"] / f"site-{site}").rglob(f"*__{plans_name}__2d/fold_*/checkpoint_personal.pth")
        own = load_checkpoint(personal)
        assert own["flwr_nnunet_personal"]["kind"] == "local-groups"
        weights = own["network_weights"]
        assert all(torch.equal(weights[key], final[key]) for key in shared)
        assert not all(torch.equal(weights[key], final[key]) for key in norms)


def test_a_simulated_site_trains_the_one_plans_in_its_folder_or_the_federations(tmp_path):
    from flwr_nnunet.site.spec import SiteError, find_site_plans

    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {}}))
    for name in ("A", "B"):
        (tmp_path / f"{name}.json").write_text(json.dumps({"plans_name": name, "configurations": {}}))
    with pytest.raises(SiteError, match=r"site-3: .* several plans \(A, B\) and not the federation's nnUNetPlans"):
        find_site_plans(MAIN, tmp_path, "site-3")
    (tmp_path / "B.json").unlink()
    assert find_site_plans(MAIN, tmp_path, "site-3") == "A"
    (tmp_path / f"{MAIN}.json").write_text(json.dumps({"plans_name": MAIN, "configurations": {}}))
    assert find_site_plans(MAIN, tmp_path, "site-3") == MAIN
