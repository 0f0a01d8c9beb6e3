"""The deployment guide, run as written: TLS, SuperNode authentication, persistent SuperLink state.

``scripts/make_test_certificates.sh`` makes a throw-away CA, the SuperLink's certificate for 127.0.0.1 and one
key pair per hospital; ``configs/deployment/superlink.sh`` starts the coordinator's SuperLink with TLS,
``--enable-supernode-auth`` and ``--database``; ``register_supernodes.sh`` registers the hospitals' public keys;
``supernode.sh`` starts each hospital; the researcher's connection is ``configs/deployment/flwr-config.toml``.
A SuperNode with an unregistered key and one without the CA certificate must not get in.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from deployment_support import Deployment, model_folder, run_config, running_deployment, wait_for

from flwr_nnunet.demo.data import make_demo_dataset
from flwr_nnunet.demo.heldout import predict_test_cases

ROUNDS = 2
REFUSED_WITHIN_S = 60.0


@pytest.fixture
def deployment(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """The guide's secure deployment (certificates for both demo sites and an intruder), SuperLink running."""
    with running_deployment(tmp_path, request, secure=True) as deployment:
        deployment.make_certificates("site-0", "site-1", "intruder")
        deployment.start_superlink()
        deployment.write_connection()
        yield deployment


@pytest.mark.slow
def test_tls_and_supernode_auth_run_predicts_and_refuses_strangers(tmp_path: Path, deployment: Deployment) -> None:
    """Two registered hospitals over TLS complete 2 rounds; the global model predicts with nnUNetv2_predict; an
    unregistered key is refused (exit 305) and a node without the CA certificate never connects."""
    started = time.monotonic()
    demo = make_demo_dataset(tmp_path / "data", num_sites=2)
    ids = deployment.register("site-0", "site-1")
    assert {"site-0", "site-1"} <= set(ids), f"registered: {ids}"
    for site in demo.sites:
        deployment.start_supernode(site)

    intruder = deployment.start_supernode(demo.sites[0], name="intruder", wait=False)
    no_ca = deployment.start_supernode(demo.sites[1], name="no-ca", key="site-1", root_certificates=False, wait=False)
    for name in ("intruder", "no-ca"):
        deployment.supernodes.pop(name)
    for refused in (intruder, no_ca):
        wait_for(lambda: refused.process.poll() is not None, REFUSED_WITHIN_S, f"{refused.name} refused")
        assert refused.process.returncode != 0, refused.tail()
        assert "Exit Code: 305" in refused.text(), refused.tail()
    assert "Failed to activate SuperNode" in intruder.text(), intruder.tail()
    assert "CERTIFICATE_VERIFY_FAILED" in no_ca.text(), no_ca.tail()

    run_id = deployment.submit(run_config(demo, num_server_rounds=ROUNDS))
    assert deployment.wait_until_finished(run_id) == "finished:completed"
    assert not (tmp_path / "intruder-results").exists() and not (tmp_path / "no-ca-results").exists()

    folder = model_folder(demo)
    final = folder.checkpoint_path("final")
    checkpoint = torch.load(final, weights_only=True, map_location="cpu")
    assert checkpoint["flwr_nnunet"]["server_round"] == ROUNDS
    dice = predict_test_cases(demo, demo.sites[0], demo.server.nnunet_results, tmp_path / "predicted", device="cpu")
    assert "mean" in dice, dice
    assert all(path.is_file() for path in (tmp_path / "predicted").glob(f"*{demo.file_ending}")), "no predictions"
    assert len(list((tmp_path / "predicted").glob(f"*{demo.file_ending}"))) == len(demo.sites[0].test_cases)
    assert all(0.0 <= value <= 1.0 for value in dice.values()), dice
    print(f"\nwall time: {time.monotonic() - started:.0f} s")
