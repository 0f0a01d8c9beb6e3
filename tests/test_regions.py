"""Region-based label sets (BraTS-style ``regions_class_order``): planned federatedly, trained, evaluated per region.

Two 2D sites whose dataset.json declares overlapping regions instead of exclusive labels: ``whole`` (labels 1
and 2) and ``lesion`` (label 2). nnU-Net then trains one sigmoid channel per region; the sites score the global
model per region as nnU-Net's validation does (a region is predicted where its channel's sigmoid exceeds 0.5 and
true where the reference holds any of its labels).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from federation_support import run_config, run_federation, write_site

from flwr_nnunet.apps.history import HISTORY_FILE
from flwr_nnunet.demo.synthesis import SITE_STYLES
from flwr_nnunet.nnunet.fingerprint import FederationMismatchError, check_consistency, site_survey
from flwr_nnunet.nnunet.metrics import dice_from_counts, region_counts

DATASET = "Dataset110_Regions"
REGIONS = {"background": 0, "whole": [1, 2], "lesion": 2}
ORDER = [1, 2]
SIZES = (40, 48)


def _site(root, k, size, num_cases=4, order=ORDER):
    folder = root / f"site-{k}" / "nnUNet_raw" / DATASET
    return write_site(folder, k, SITE_STYLES[k], (size, size), num_cases, REGIONS, regions_class_order=order)


def _spec(context):
    """The site a grid node serves."""
    from flwr_nnunet.apps.client import site_spec

    return site_spec(context.run_config, context.node_config, context.node_id)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Raw data at two sites; the planning phase and one round of the ServerApp, every message in-process."""
    root = tmp_path_factory.mktemp("regions")
    for k, size in enumerate(SIZES):
        _site(root, k, size)
    config = run_config(root, DATASET, "2d", len(SIZES))
    return run_federation(config, len(SIZES)) | {"root": root}


def test_region_counts_use_the_union_of_labels_and_a_strict_half_threshold():
    truth = np.array([[0, 1, 2], [2, 1, 0]])
    probabilities = np.array(
        [
            [[0.6, 0.5, 0.51], [0.49, 0.9, 0.7]],  # whole = {1, 2}: 0.5 itself is not predicted
            [[0.2, 0.2, 0.8], [0.3, 0.1, 0.1]],  # lesion = {2}
        ]
    )
    counts = region_counts(truth, probabilities, [(1, 2), 2])
    # whole: true at (0,1) (0,2) (1,0) (1,1); predicted at (0,0) (0,2) (1,1) (1,2)
    assert counts.tolist() == [[2.0, 2.0, 2.0], [1.0, 0.0, 1.0]]
    assert [dice_from_counts(*c) for c in counts] == [0.5, pytest.approx(2 / 3)]
    with pytest.raises(ValueError, match="2 probability channels for 1 regions"):
        region_counts(truth, probabilities, [(1, 2)])


def test_sites_with_another_region_order_are_named_with_the_field(tmp_path):
    surveys = {
        "site-0": site_survey(_site(tmp_path, 0, 24, num_cases=1)),
        "site-1": site_survey(_site(tmp_path, 1, 24, num_cases=1, order=[2, 1])),
    }
    assert surveys["site-0"]["labels"] == REGIONS and surveys["site-0"]["regions_class_order"] == ORDER
    with pytest.raises(FederationMismatchError) as caught:
        check_consistency(surveys)
    assert set(caught.value.mismatches) == {"regions_class_order"}
    assert "site-0 has [1, 2]" in str(caught.value) and "site-1 has [2, 1]" in str(caught.value)


@pytest.mark.slow  # the federation fixture (planning, one round): 8 s (quiet) to 35 s (load 8) here
def test_the_federation_plans_one_sigmoid_channel_per_region(federation):
    about = federation["dataset_json"]
    assert about["labels"] == REGIONS and about["regions_class_order"] == ORDER
    model = federation["model"]
    assert json.loads((model / "dataset.json").read_text())["regions_class_order"] == ORDER
    checkpoint = torch.load(model / "fold_all" / "checkpoint_final.pth", weights_only=True, map_location="cpu")
    heads = [v for k, v in checkpoint["network_weights"].items() if k.startswith("decoder.seg_layers.")]
    assert heads and all(head.shape[0] == len(ORDER) for head in heads)  # 2 regions, no background channel


@pytest.mark.slow  # the federation fixture (planning, one round): 8 s (quiet) to 35 s (load 8) here
def test_every_site_reports_per_region_dice_and_the_server_aggregates_it(federation):
    from flwr_nnunet.apps.client import live_site

    round_1 = federation["history"]["1"]
    sites = round_1["evaluate"]["sites"]
    assert sorted(sites) == ["site-0", "site-1"]
    for name, metrics in sites.items():
        per_region = metrics["dice-per-class"]
        assert len(per_region) == len(ORDER) and all(0.0 <= d <= 1.0 for d in per_region), (name, per_region)
        assert metrics["dice"] == pytest.approx(np.mean(per_region))
        assert metrics["num-examples"] == 1
        train = round_1["train"]["sites"][name]
        assert len(train["pseudo-dice-per-class"]) == len(ORDER) and np.isfinite(train["train-loss"])
    assert json.loads((federation["model"] / HISTORY_FILE).read_text())["class-names"] == ["whole", "lesion"]
    aggregated = round_1["evaluate"]["aggregated"]
    expected = np.mean([sites[n]["dice-per-class"] for n in sites], axis=0)  # one validation case each
    assert aggregated["dice-per-class"] == pytest.approx(expected.tolist())
    assert aggregated["dice"] == pytest.approx(np.mean([sites[n]["dice"] for n in sites]))
    for grid_context in federation["grid"].contexts.values():
        site = live_site(grid_context.run_id, _spec(grid_context))
        assert site.trainer.label_manager.has_regions


class _ConstantLogits(torch.nn.Module):
    """Logits ``values[c]`` in channel ``c`` at every voxel, whatever the input."""

    def __init__(self, values):
        super().__init__()
        self.register_buffer("values", torch.tensor(values, dtype=torch.float32))

    def forward(self, x):
        shape = (x.shape[0], len(self.values), *x.shape[2:])
        return self.values.view(1, -1, *([1] * (x.ndim - 2))).expand(shape).clone()


@pytest.mark.slow  # the federation fixture (planning, one round): 8 s (quiet) to 35 s (load 8) here
def test_a_site_scores_the_sigmoid_of_each_region_channel_against_the_union_of_its_labels(federation):
    """Logits 0.2 and 0.1 (sigmoid 0.55 and 0.52) predict both regions everywhere: Dice = 2|R| / (|R| + N)."""
    from flwr_nnunet.apps.client import live_site
    from flwr_nnunet.site.evaluation import validation_dice

    context = federation["grid"].contexts[100]
    spec = _spec(context)
    site = live_site(context.run_id, spec)
    validation = site.split()[1]
    result = validation_dice(spec, site.trainer, _ConstantLogits([0.2, 0.1]), validation)
    dataset = site.trainer.dataset_class(site.trainer.preprocessed_dataset_folder, validation)
    truth = [np.asarray(dataset.load_case(case)[1][:])[0] for case in validation]
    voxels = sum(t.size for t in truth)
    expected = []
    for labels in ([1, 2], [2]):
        region = sum(int(np.isin(t, labels).sum()) for t in truth)
        expected.append(2 * region / (region + voxels))
    assert 0 < expected[1] < expected[0] < 1
    assert result["dice-per-class"] == pytest.approx(expected)
    assert result["dice"] == pytest.approx(np.mean(expected))
