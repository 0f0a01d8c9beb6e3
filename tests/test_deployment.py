"""End to end, as a hospital deployment runs: a SuperLink, one SuperNode per site, `flwr run`, real processes.

Everything binds to 127.0.0.1 on free ports; FLWR_HOME and all data live in the test's tmp folder. Each
message runs in a fresh ``flwr-clientapp`` process, so the sites must rebuild their trainer from disk every round.
The process helpers are in ``deployment_support.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from deployment_support import Deployment, model_folder, run_config, running_deployment, site_spec

from flwr_nnunet import AliasMap
from flwr_nnunet.apps.history import HISTORY_FILE
from flwr_nnunet.demo.data import make_demo_dataset
from flwr_nnunet.nnunet.checkpoint_io import load_checkpoint
from flwr_nnunet.nnunet.networks import build_trainer_network
from flwr_nnunet.site.spec import STATE_FILE, STATE_TOKEN_FILE

ROUNDS = 2


@pytest.fixture
def deployment(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """A running insecure SuperLink; always stopped with everything it started, its logs printed on failure."""
    with running_deployment(tmp_path, request) as deployment:
        deployment.start_superlink()
        yield deployment


@pytest.mark.slow
def test_superlink_two_supernodes_flwr_run(tmp_path: Path, deployment: Deployment) -> None:
    """2 hospitals, 2 rounds through `flwr run`: global model, per-site round state rebuilt from disk, history."""
    demo = make_demo_dataset(tmp_path / "data", num_sites=2)
    for site in demo.sites:
        deployment.start_supernode(site)
    deployment.write_connection()
    run_id = deployment.submit(run_config(demo, num_server_rounds=ROUNDS))
    assert deployment.wait_until_finished(run_id) == "finished:completed"

    folder = model_folder(demo)
    plans, dataset_json = folder.plans, folder.dataset_json
    final = folder.checkpoint_path("final")
    assert final.is_file(), f"no {final}"
    checkpoint = torch.load(final, weights_only=True, map_location="cpu")
    assert checkpoint["flwr_nnunet"]["server_round"] == ROUNDS
    weights = checkpoint["network_weights"]
    network = build_trainer_network(plans, dataset_json, demo.configuration)
    assert set(weights) == set(network.state_dict())
    amap = AliasMap.from_module(network)
    shared = [group for group in amap.groups.values() if len(group) > 1]
    assert shared, "the nnU-Net network should have aliased keys"
    for group in shared:
        assert len({weights[key].untyped_storage().data_ptr() for key in group}) == 1, f"aliases split: {group}"

    for site in demo.sites:
        spec = site_spec(deployment, demo, site)
        assert spec.state_file.name == STATE_FILE and spec.state_file.is_file(), f"no {spec.state_file}"
        state = load_checkpoint(spec.state_file)
        assert state["current_epoch"] == ROUNDS, f"{site.name}: epoch {state['current_epoch']} after {ROUNDS} rounds"
        token = json.loads((spec.output_folder / STATE_TOKEN_FILE).read_text())
        assert token["epoch"] == ROUNDS
        log = (tmp_path / f"{site.name}.log").read_text()
        assert log.count("Start `flwr-clientapp` process") == 2 * ROUNDS, f"{site.name}: not one process per message"
        assert f"{site.name}: trainer rebuilt from {spec.state_file}" in log

    history = json.loads((folder.path / HISTORY_FILE).read_text())
    assert sorted(history["rounds"]) == [str(r) for r in range(1, ROUNDS + 1)]
