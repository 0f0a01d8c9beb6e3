"""The deployment guide, run as written: TLS, SuperNode authentication, persistent SuperLink state, a lost hospital.

``scripts/make_test_certificates.sh`` makes a throw-away CA, the SuperLink's certificate for 127.0.0.1 and one
key pair per hospital; ``configs/deployment/superlink.sh`` starts the coordinator's SuperLink with TLS,
``--enable-supernode-auth`` and ``--database``; ``register_supernodes.sh`` registers the hospitals' public keys;
``supernode.sh`` starts each hospital; the researcher's connection is ``configs/deployment/flwr-config.toml``.
A SuperNode with an unregistered key and one without the CA certificate must not get in; a hospital SIGKILLed
mid-round (its machine dies) is named in the server's log and the run completes with the others. Each message
runs in a fresh ``flwr-clientapp`` process, so the sites rebuild their trainer from disk every round.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from deployment_support import Deployment, model_folder, run_config, running_deployment, site_spec, wait_for

from flwr_nnunet import AliasMap
from flwr_nnunet.apps.history import HISTORY_FILE
from flwr_nnunet.demo.data import make_demo_dataset
from flwr_nnunet.demo.heldout import predict_test_cases
from flwr_nnunet.nnunet.checkpoint_io import load_checkpoint
from flwr_nnunet.nnunet.networks import build_trainer_network
from flwr_nnunet.site.spec import STATE_FILE, STATE_TOKEN_FILE

ROUNDS = 2
SITES = ("site-0", "site-1", "site-2")
REFUSED_WITHIN_S = 60.0
NODE_WAIT_S = 5.0
RECEIVED, TRAIN, PROCESS = "Receiving: ", "Receiving: train message", "Start `flwr-clientapp` process"
FORKED = "forked as pid"
"""A message's ClientApp forked by the site's executor (``flwr-nnunet clientapp-exec``), not started by Flower."""
"""A SuperNode's log lines: a message arrived, a training one, the process that handles it."""


@pytest.fixture
def deployment(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """The guide's secure deployment (certificates for the 3 demo sites and an intruder), SuperLink running."""
    with running_deployment(tmp_path, request, secure=True) as deployment:
        deployment.make_certificates(*SITES, "intruder")
        deployment.start_superlink()
        deployment.write_connection()
        yield deployment


def orphan_temp_file(folder: Path, target: str) -> Path:
    """A temp file as a writer killed mid-write leaves it (the project's pattern, the pid of an ended process)."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    folder.mkdir(parents=True, exist_ok=True)
    orphan = folder / f".{target}.{ended.pid}-k1lled0.tmp"
    orphan.write_bytes(b"half a checkpoint")
    return orphan


def round_2_training_started(log: str) -> bool:
    """Whether a SuperNode's log shows the process of its second training message (Flower's or forked)."""
    return log.count(TRAIN) == 2 and max(log.rfind(PROCESS), log.rfind(FORKED)) > log.rfind(TRAIN)


@pytest.mark.slow
def test_tls_auth_run_loses_a_node_mid_round_completes_predicts_and_refuses_strangers(
    tmp_path: Path, deployment: Deployment
) -> None:
    """3 registered hospitals over TLS; site-2 is SIGKILLed as round 2 reaches it: its instruction comes back as
    the SuperLink's error reply (after Flower's heartbeat, 30 s x 2), logged under site-2's node id; round 2 and
    its evaluation go on with the 2 others (min 2, after node-wait). The global model keeps nnU-Net's shared
    tensors, loads, and predicts with nnUNetv2_predict; the survivors rebuilt their trainer from disk in every
    process and end at epoch 2; temp files killed writers left are removed when server and sites start. An
    unregistered key is refused (exit 305) and a node without the CA certificate never connects."""
    started = time.monotonic()
    demo = make_demo_dataset(tmp_path / "data", num_sites=len(SITES))
    folder = model_folder(demo)
    orphans = [orphan_temp_file(folder.fold_dir, "checkpoint_latest.pth")]
    orphans += [orphan_temp_file(site_spec(deployment, demo, demo.sites[0]).output_folder, STATE_FILE)]
    ids = deployment.register(*SITES)
    assert set(SITES) <= set(ids), f"registered: {ids}"
    services = deployment.start_supernodes(demo.sites)
    lost = services[2].node_id()

    intruder = deployment.start_supernode(demo.sites[0], name="intruder", wait=False)
    no_ca = deployment.start_supernode(demo.sites[1], name="no-ca", key="site-1", root_certificates=False, wait=False)
    for name in ("intruder", "no-ca"):
        deployment.supernodes.pop(name)

    config = run_config(demo, num_server_rounds=ROUNDS, min_available_nodes=3, node_wait=NODE_WAIT_S)
    run_id = deployment.submit(config)
    wait_for(lambda: round_2_training_started(services[2].text()), 600, "site-2 starting round 2's training")
    services[2].kill()
    deployment.supernodes.pop("site-2")

    for refused in (intruder, no_ca):
        wait_for(
            lambda refused=refused: refused.process.poll() is not None, REFUSED_WITHIN_S, f"{refused.name} refused"
        )
        assert refused.process.returncode != 0, refused.tail()
        assert "Exit Code: 305" in refused.text(), refused.tail()
    assert "Failed to activate SuperNode" in intruder.text(), intruder.tail()
    assert "CERTIFICATE_VERIFY_FAILED" in no_ca.text(), no_ca.tail()

    assert deployment.wait_until_finished(run_id, folder.checkpoint_path("final")) == "finished:completed"
    for name in ("intruder", "no-ca"):  # a refused SuperNode trained nothing: at most its warm worker's own files
        results = tmp_path / f"{name}-results"
        left = sorted(p.name for p in results.iterdir()) if results.exists() else []
        assert all(file.startswith("flwr_warm_site.") for file in left), left
    log = deployment.server_log(run_id)
    assert f"the SuperLink answered for node {lost}" in log, log[-3000:]
    assert f"of 3 wanted nodes connected after waiting {NODE_WAIT_S:.0f} s (run-config node-wait)" in log, log[-3000:]
    assert not any(orphan.exists() for orphan in orphans), [orphan for orphan in orphans if orphan.exists()]

    for name in ("latest", "final"):
        checkpoint = folder.load_checkpoint(folder.checkpoint_path(name))  # verifies the weights digest
        assert checkpoint["flwr_nnunet"]["server_round"] == ROUNDS
    weights = torch.load(folder.checkpoint_path("final"), weights_only=True, map_location="cpu")["network_weights"]
    network = build_trainer_network(folder.plans, folder.dataset_json, demo.configuration)
    assert set(weights) == set(network.state_dict())
    shared = [group for group in AliasMap.from_module(network).groups.values() if len(group) > 1]
    assert shared, "the nnU-Net network should have aliased keys"
    for group in shared:
        assert len({weights[key].untyped_storage().data_ptr() for key in group}) == 1, f"aliases split: {group}"
    history = json.loads((folder.path / HISTORY_FILE).read_text())
    assert sorted(history["rounds"], key=int) == [str(r) for r in range(1, ROUNDS + 1)]

    for site, service in zip(demo.sites[:2], services[:2], strict=True):
        spec = site_spec(deployment, demo, site)
        assert spec.state_file.name == STATE_FILE and spec.state_file.is_file(), f"no {spec.state_file}"
        state = load_checkpoint(spec.state_file)
        assert state["current_epoch"] == ROUNDS, f"{site.name}: epoch {state['current_epoch']} after {ROUNDS} rounds"
        assert json.loads((spec.output_folder / STATE_TOKEN_FILE).read_text())["epoch"] == ROUNDS
        text = service.text()
        assert text.count(TRAIN) == ROUNDS, service.tail()
        assert text.count(PROCESS) + text.count(FORKED) == text.count(RECEIVED), f"{site.name}: not one per message"
        # supernode.sh started the site's ClientApp executor: it claims most messages ahead of Flower's SuperExec
        assert text.count(FORKED) > text.count(PROCESS), service.tail()
        # supernode.sh started the site's warm worker: one trainer for the run, kept across its messages
        assert text.count(f"{site.name}: warm site: a fresh trainer for run") == 1, service.tail()
        assert f"{site.name}: trainer rebuilt from" not in text, service.tail()

    predicted = tmp_path / "predicted"
    dice = predict_test_cases(demo, demo.sites[0], demo.server.nnunet_results, predicted, device="cpu")
    assert len(list(predicted.glob(f"*{demo.file_ending}"))) == len(demo.sites[0].test_cases), "no predictions"
    assert "mean" in dice and all(0.0 <= value <= 1.0 for value in dice.values()), dice
    print(f"\nwall time: {time.monotonic() - started:.0f} s")
