"""A compressed federation end to end: the real ClientApp and ServerApp, 2 demo sites, 2 rounds, int8-block."""

from __future__ import annotations

import math

import pytest
from federation_support import run_config, run_federation

from flwr_nnunet.core.delta_codec import BASE_KEY, COMPRESSION_KEY, SCALES_RECORD
from flwr_nnunet.site.compressed_updates import HELD_MODEL_FILE


@pytest.mark.slow
def test_a_compressed_federation_trains_evaluates_and_keeps_its_residuals(tmp_path):
    from flwr_nnunet.demo.data import make_demo_dataset

    demo = make_demo_dataset(tmp_path / "data", num_sites=2, planned=False)
    config = run_config(demo.root, demo.dataset_name, "2d", 2, **{"num-server-rounds": 2, "compression": "int8-block"})
    done = run_federation(config, 2)

    replies = done["grid"].replies
    assert not [r.error.reason for r in replies if r.has_error()]
    train = [r for r in replies if r.metadata.message_type == "train"]
    assert len(train) == 4
    for reply in train:
        assert reply.content["config"][COMPRESSION_KEY] == "int8-block"
        arrays = reply.content["arrays"]
        assert {a.dtype for a in arrays.values()} <= {"int8", "int64"} and SCALES_RECORD in reply.content
        float_bytes = sum(4 * math.prod(a.shape) for a in arrays.values())
        sent = sum(len(a.data) for a in arrays.values()) + sum(
            len(a.data) for a in reply.content[SCALES_RECORD].values()
        )
        assert sent < 0.45 * float_bytes  # a quarter, plus a 128-byte .npy header per array on this tiny network
    evaluated = [r for r in replies if r.metadata.message_type == "evaluate"]
    assert all(isinstance(r.content["config"][BASE_KEY], str) for r in evaluated)
    for server_round in ("1", "2"):
        assert "train-loss" in done["history"][server_round]["train"]["aggregated"]
        assert 0.0 <= done["history"][server_round]["evaluate"]["aggregated"]["dice"] <= 1.0
    for site in demo.sites:
        assert len(list(site.nnunet_results.rglob(HELD_MODEL_FILE))) == 1
        kept = sorted(p.name for p in site.nnunet_results.rglob("flwr_site_residual.round-*.pth"))
        assert kept == ["flwr_site_residual.round-1.pth", "flwr_site_residual.round-2.pth"]
    assert (done["model"] / "fold_all" / "checkpoint_final.pth").is_file()
