"""The coordinator of a real deployment on 127.0.0.1 killed mid-run and restarted with its database.

It runs the guide's secure deployment (``configs/deployment/*.sh``: TLS, SuperNode authentication, the
SuperLink's state in SQLite). Processes are killed by their process ids with SIGKILL (a machine that dies).
A hospital lost mid-round is in ``test_deployment_secure.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from deployment_support import Deployment, model_folder, run_config, running_deployment, site_spec, wait_for

from flwr_nnunet.apps.history import HISTORY_FILE
from flwr_nnunet.demo.data import DemoDataset, make_demo_dataset
from flwr_nnunet.nnunet.checkpoint_io import load_checkpoint

SITES = ("site-0", "site-1")
ROUNDS = 2


@pytest.fixture
def deployment(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """The guide's secure deployment with both demo sites registered."""
    with running_deployment(tmp_path, request, secure=True) as deployment:
        deployment.make_certificates(*SITES)
        deployment.start_superlink()
        deployment.write_connection()
        deployment.register(*SITES)
        yield deployment


def site_round(deployment: Deployment, demo: DemoDataset, index: int) -> int:
    """The last round the site saved (its ``flwr_site_state.json``), 0 before the first."""
    token = site_spec(deployment, demo, demo.sites[index]).state_token_file
    return int(json.loads(token.read_text()).get("round", 0)) if token.is_file() else 0


@pytest.mark.slow
def test_the_superlink_killed_and_restarted_with_its_database_resumes_every_round_once(
    tmp_path: Path, deployment: Deployment
) -> None:
    """The coordinator dies right after both sites trained round 2 (the server's checkpoint is round 1's):
    restarted with its database, the SuperNodes reconnect by themselves; `flwr run ... resume=true` sends round 2
    again, the sites roll back to their state after round 1, and every site ends at epoch 2 = rounds x local
    epochs with every round once in flwr_history.json (no evaluation rounds: fewer processes). The rounds stream
    (run-config streaming=true: push_messages / pull_messages through Flower's gRPC grid; the secure test keeps the
    batch path)."""
    started = time.monotonic()
    demo = make_demo_dataset(tmp_path / "data", num_sites=len(SITES))
    services = deployment.start_supernodes(demo.sites)
    config = run_config(demo, num_server_rounds=ROUNDS, fraction_evaluate=0.0, streaming=True)
    run_id = deployment.submit(config)
    wait_for(
        lambda: all(site_round(deployment, demo, i) == ROUNDS for i in range(len(SITES))),
        900,
        f"both sites trained round {ROUNDS}",
    )
    deployment.kill_superlink()
    folder = model_folder(demo)
    killed_at = folder.load_checkpoint(folder.checkpoint_path("latest"))["flwr_nnunet"]["server_round"]

    deployment.start_superlink()  # same port, same database
    for service in services:
        node = service.node_id()
        wait_for(
            lambda node=node: deployment.node_status().get(node) == "online", 120, f"{service.name} back online", 2.0
        )
    assert all(service.process.poll() is None for service in services), "a SuperNode exited"
    resumed = deployment.submit({**config, "resume": True})
    assert resumed != run_id
    assert deployment.wait_until_finished(resumed, folder.checkpoint_path("final")) == "finished:completed"

    assert killed_at == ROUNDS - 1, f"killed after the server's round {killed_at}, not after round {ROUNDS - 1}"
    log = deployment.server_log(resumed)
    assert f"resume: loaded round {ROUNDS - 1}" in log, log[-3000:]
    assert f"round {ROUNDS}: {len(SITES)} of {len(SITES)} replies accepted (streamed)" in log, log[-3000:]
    history = json.loads((folder.path / HISTORY_FILE).read_text())
    assert sorted(history["rounds"], key=int) == [str(r) for r in range(1, ROUNDS + 1)]
    assert folder.load_checkpoint(folder.checkpoint_path("final"))["flwr_nnunet"]["server_round"] == ROUNDS
    for site, service in zip(demo.sites, services, strict=True):
        state = load_checkpoint(site_spec(deployment, demo, site).state_file)
        assert state["current_epoch"] == ROUNDS * 1, f"{site.name}: epoch {state['current_epoch']}"
        assert f"round {ROUNDS} again (the server resumed)" in service.text(), service.tail()
    print(f"\nwall time: {time.monotonic() - started:.0f} s")
