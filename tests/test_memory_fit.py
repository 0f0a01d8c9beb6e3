"""Hospitals with smaller GPUs: a site's own batch and patch on the federation's one architecture."""

from __future__ import annotations

import json

import pytest
from federation_support import run_config, run_federation
from test_site import demo  # noqa: F401 - a module fixture

from flwr_nnunet.core.aliasing import AliasMap
from flwr_nnunet.nnunet.digests import plans_sha256
from flwr_nnunet.nnunet.memory_fit import fit_to_memory, iterations_scale, pooling_divisors
from flwr_nnunet.nnunet.networks import build_trainer_network


@pytest.fixture(scope="module")
def plans(demo):  # noqa: F811
    return json.loads(demo.plans_file.read_text())


def test_a_site_lowers_its_batch_and_patch_within_what_the_network_allows(plans):
    assert (plans["configurations"]["2d"]["batch_size"], plans["configurations"]["2d"]["patch_size"]) == (2, [64, 64])
    assert pooling_divisors(plans, "2d") == (16, 16)
    fitted = fit_to_memory(plans, "2d", batch_size=1, patch_size=(48, 32))
    assert (fitted["configurations"]["2d"]["batch_size"], fitted["configurations"]["2d"]["patch_size"]) == (1, [48, 32])
    assert plans["configurations"]["2d"]["batch_size"] == 2  # the federation's plans are not touched
    architecture = fitted["configurations"]["2d"]["architecture"]
    assert architecture == plans["configurations"]["2d"]["architecture"]
    assert (
        iterations_scale(plans, "2d", 1),
        iterations_scale(plans, "2d", 2),
        iterations_scale(plans, "2d", None),
    ) == (
        2,
        1,
        1,
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_size": 3}, "lower its batch from the planned 2 to 1, not raise it"),
        ({"batch_size": 0}, "lower its batch"),
        ({"patch_size": (40, 64)}, r"a multiple of the network's pooling \[16, 16\]"),
        ({"patch_size": (80, 64)}, r"at most the planned \[64, 64\]"),
        ({"patch_size": (32, 32, 32)}, "give 2 edges"),
    ],
)
def test_what_does_not_fit_is_refused_with_the_values_that_do(plans, change, message):
    with pytest.raises(ValueError, match=message):
        fit_to_memory(plans, "2d", **change)


@pytest.mark.slow
def test_a_site_with_half_the_batch_trains_and_aggregates_with_the_same_architecture_and_digest(tmp_path):
    from flwr_nnunet.demo.data import make_demo_dataset

    site = make_demo_dataset(tmp_path / "data", num_sites=2, planned=False)
    config = run_config(site.root, site.dataset_name, "2d", 2, **{"num-server-rounds": 1})
    done = run_federation(config, 2, node_configs={1: {"batch-size": 1, "patch-size": "48,48"}})
    replies = [r for r in done["grid"].replies if r.metadata.message_type == "train"]
    assert len(replies) == 2 and not any(r.has_error() for r in replies)
    digests = {r.content["config"]["plans-sha256"] for r in replies}
    assert digests == {plans_sha256(done["plans"])}  # one digest: the plans file stays the federation's
    assert sorted(done["history"]["1"]["train"]["sites"]) == ["site-0", "site-1"]
    assert "train-loss" in done["history"]["1"]["train"]["aggregated"]  # the two replies were aggregated
    model = "nnUNetTrainer__nnUNetPlans__2d"
    trained = json.loads((site.sites[1].nnunet_results / site.dataset_name / model / "plans.json").read_text())
    assert (trained["configurations"]["2d"]["batch_size"], trained["configurations"]["2d"]["patch_size"]) == (
        1,
        [48, 48],
    )
    network = build_trainer_network(trained, done["dataset_json"], "2d", "nnUNetTrainer")
    federation = build_trainer_network(done["plans"], done["dataset_json"], "2d", "nnUNetTrainer")
    assert AliasMap.from_module(network) == AliasMap.from_module(federation)  # the same network, the same groups
