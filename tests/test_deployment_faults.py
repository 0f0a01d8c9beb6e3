"""Faults of a real deployment on 127.0.0.1: a hospital lost mid-round, the coordinator killed and restarted.

Both run the guide's secure deployment (``configs/deployment/*.sh``: TLS, SuperNode authentication, the
SuperLink's state in SQLite). Processes are killed by their process ids with SIGKILL (a machine that dies).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from deployment_support import Deployment, model_folder, run_config, running_deployment, site_spec, wait_for

from flwr_nnunet.apps.history import HISTORY_FILE
from flwr_nnunet.demo.data import make_demo_dataset
from flwr_nnunet.nnunet.checkpoint_io import load_checkpoint

SITES = ("site-0", "site-1")


@pytest.fixture
def deployment(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """The guide's secure deployment with both demo sites registered."""
    with running_deployment(tmp_path, request, secure=True) as deployment:
        deployment.make_certificates(*SITES)
        deployment.start_superlink()
        deployment.write_connection()
        deployment.register(*SITES)
        yield deployment


def site_round(deployment: Deployment, demo, index: int) -> int:
    """The last round the site saved (its ``flwr_site_state.json``), 0 before the first."""
    token = site_spec(deployment, demo, demo.sites[index]).state_token_file
    return int(json.loads(token.read_text()).get("round", 0)) if token.is_file() else 0


@pytest.mark.slow
def test_a_supernode_killed_mid_round_is_named_and_the_run_completes(tmp_path: Path, deployment: Deployment) -> None:
    """site-1 is SIGKILLed while it trains round 1: its instruction comes back as the SuperLink's error reply
    (after Flower's ~60 s heartbeat), logged under site-1's node id; the rounds go on with site-0 (minimum 1)
    after node-wait, and the checkpoints are intact (no evaluation rounds: fewer processes)."""
    started = time.monotonic()
    demo = make_demo_dataset(tmp_path / "data", num_sites=2)
    services = [deployment.start_supernode(site) for site in demo.sites]
    lost = services[1].node_id()
    config = run_config(demo, num_server_rounds=2, min_train_nodes=1, fraction_evaluate=0.0, node_wait=5.0)
    run_id = deployment.submit(config)
    wait_for(lambda: "Start `flwr-clientapp` process" in services[1].text(), 600, "site-1 receiving round 1")
    services[1].kill()
    deployment.supernodes.pop("site-1")

    assert deployment.wait_until_finished(run_id) == "finished:completed"
    log = deployment.server_log(run_id)
    assert f"the SuperLink answered for node {lost}" in log, log[-3000:]
    assert "of 2 wanted nodes connected after waiting 5 s (run-config node-wait)" in log, log[-3000:]
    folder = model_folder(demo)
    for name in ("latest", "final"):
        checkpoint = folder.load_checkpoint(folder.checkpoint_path(name))  # verifies the weights digest
        assert checkpoint["flwr_nnunet"]["server_round"] == 2
    assert site_round(deployment, demo, 0) == 2
    print(f"\nwall time: {time.monotonic() - started:.0f} s")


@pytest.mark.slow
def test_the_superlink_killed_and_restarted_with_its_database_resumes_every_round_once(
    tmp_path: Path, deployment: Deployment
) -> None:
    """The coordinator dies right after both sites trained round 2 (the server's checkpoint is round 1's):
    restarted with its database, the SuperNodes reconnect by themselves; `flwr run ... resume=true` sends round 2
    again, the sites roll back to their state after round 1, and every site ends at epoch 2 = rounds x local
    epochs with every round once in flwr_history.json."""
    started = time.monotonic()
    rounds = 2
    demo = make_demo_dataset(tmp_path / "data", num_sites=2)
    services = [deployment.start_supernode(site) for site in demo.sites]
    config = run_config(demo, num_server_rounds=rounds)
    run_id = deployment.submit(config)
    wait_for(lambda: all(site_round(deployment, demo, i) == 2 for i in (0, 1)), 900, "both sites trained round 2")
    deployment.kill_superlink()
    folder = model_folder(demo)
    killed_at = folder.load_checkpoint(folder.checkpoint_path("latest"))["flwr_nnunet"]["server_round"]

    deployment.start_superlink()  # same port, same database
    wait_for(lambda: "online" == deployment.node_status().get(services[0].node_id()), 120, "site-0 back online")
    wait_for(lambda: "online" == deployment.node_status().get(services[1].node_id()), 120, "site-1 back online")
    assert all(service.process.poll() is None for service in services), "a SuperNode exited"
    resumed = deployment.submit({**config, "resume": True})
    assert resumed != run_id
    assert deployment.wait_until_finished(resumed) == "finished:completed"

    assert killed_at == 1, f"killed after the server's round {killed_at}: the test meant to kill it after round 1"
    log = deployment.server_log(resumed)
    assert "resume: loaded round 1" in log, log[-3000:]
    history = json.loads((folder.path / HISTORY_FILE).read_text())
    assert sorted(history["rounds"], key=int) == [str(r) for r in range(1, rounds + 1)]
    assert folder.load_checkpoint(folder.checkpoint_path("final"))["flwr_nnunet"]["server_round"] == rounds
    for site, service in zip(demo.sites, services, strict=True):
        spec = site_spec(deployment, demo, site)
        state = load_checkpoint(spec.state_file)
        assert state["current_epoch"] == rounds * 1, f"{site.name}: epoch {state['current_epoch']}"
        assert "round 2 again (the server resumed)" in service.text(), service.tail()
    print(f"\nwall time: {time.monotonic() - started:.0f} s")
