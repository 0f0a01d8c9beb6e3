"""Sites and server agree on the round: a round the site trained already is trained again from the round before."""

from __future__ import annotations

import json

import pytest
import torch
from test_site import copies, initial_weights, options, spec_for

from flwr_nnunet.demo.data import make_demo_dataset
from flwr_nnunet.nnunet.checkpoint_io import load_checkpoint
from flwr_nnunet.nnunet.digests import plans_sha256
from flwr_nnunet.site.site import Site
from flwr_nnunet.site.spec import SiteError
from flwr_nnunet.site.trainer_state import KEPT_ROUNDS, round_state_file


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("rounds") / "data", num_sites=2)


@pytest.mark.slow
def test_a_round_sent_again_after_a_server_resume_is_trained_from_the_round_before(demo, tmp_path, caplog):
    spec = spec_for(demo, tmp_path / "results")
    site = Site(spec)
    global_1 = initial_weights(demo)
    global_2 = copies(site.train(global_1, options(1, iterations=2), plans_sha256(site.check()))[0])
    first, _ = site.train(global_2, options(2, iterations=2))
    first = copies(first)
    assert json.loads(spec.state_token_file.read_text())["round"] == 2
    assert round_state_file(spec, 1).is_file() and round_state_file(spec, 2).is_file()

    # The server was killed after the sites trained round 2 and resumed from its round-1 checkpoint: a fresh
    # SuperNode process gets round 2 again, with the same global model.
    again = Site(spec)
    with caplog.at_level("INFO"):
        second, metrics = again.train(global_2, options(2, iterations=2))
    assert "round 2 again (the server resumed): rolled back from the state after round 2 to the one after round 1" in (
        caplog.text
    )
    assert metrics["epoch"] == 2 and load_checkpoint(spec.state_file)["current_epoch"] == 2
    for key, value in first.items():
        assert torch.equal(second[key], value), key  # the uninterrupted round 2, bit for bit

    # Only the last KEPT_ROUNDS round states are kept; further back the site says what to do.
    state = global_2
    for server_round in range(3, 3 + KEPT_ROUNDS):
        state = copies(again.train(state, options(server_round, iterations=1, num_epochs=8))[0])
    kept = sorted(int(p.stem.rsplit("-", 1)[1]) for p in spec.output_folder.glob("flwr_site_state.round-*.pth"))
    assert kept == list(range(3, 3 + KEPT_ROUNDS))
    with pytest.raises(SiteError, match="the state after round 1 .* is no longer kept"):
        Site(spec).train(global_2, options(2, iterations=1, num_epochs=8))
