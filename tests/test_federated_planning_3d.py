"""Federated planning in 3D: three sites of small volumes, each of its own size and voxel spacing.

Planned from their aggregate statistics the sites get the ``3d_fullres`` plans nnU-Net's own fingerprint
extractor and planner make of the three sites' volumes pooled into one dataset (target spacing, patch size,
network); then one federated round of ``3d_fullres`` training with those plans (narrowed) runs and evaluates.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from federation_support import TOTAL_SAMPLES, pooled_plans, run_config, run_federation, write_site

from flwr_nnunet.demo.synthesis import SITE_STYLES_3D
from flwr_nnunet.nnunet.fingerprint import (
    agreed_bins,
    check_consistency,
    federation_dataset_json,
    merge_site_statistics,
    samples_per_case,
    site_statistics,
    site_survey,
)
from flwr_nnunet.nnunet.planning import plan_from_fingerprint

DATASET = "Dataset120_Volumes"
LABELS = {"background": 0, "organ": 1, "lesion": 2}
SITES = (  # (shape in voxels, spacing in mm, cases): thick slices at site-0, fine voxels at site-2
    ((16, 28, 28), (2.5, 1.0, 1.0), 3),
    ((24, 24, 24), (1.5, 1.25, 1.25), 3),
    ((20, 36, 36), (2.0, 0.8, 0.8), 2),
)
pytestmark = pytest.mark.slow  # pooled and federated planning and a round: 20 s (quiet) to 65 s (load 11) here

SAMPLES = samples_per_case(sum(n for _, _, n in SITES), TOTAL_SAMPLES)
SHARED = (
    "patch_size",
    "spacing",
    "normalization_schemes",
    "use_mask_for_norm",
    "batch_size",
    "median_image_size_in_voxels",
)


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("volumes")
    folders = [
        write_site(root / f"site-{k}" / "nnUNet_raw" / DATASET, k, SITE_STYLES_3D[k], shape, n, LABELS, spacing=spacing)
        for k, (shape, spacing, n) in enumerate(SITES)
    ]
    return {"root": root, "folders": folders}


@pytest.fixture(scope="module")
def federated(sites):
    """The plans from the sites' surveys and statistics (the functions the planning phase runs at each end)."""
    surveys = {f"site-{k}": site_survey(folder) for k, folder in enumerate(sites["folders"])}
    check_consistency(surveys)
    bins = agreed_bins(surveys)
    statistics = [site_statistics(folder, bins, SAMPLES) for folder in sites["folders"]]
    fingerprint = merge_site_statistics(statistics, bins)
    plans = plan_from_fingerprint(fingerprint, federation_dataset_json(surveys), DATASET, "SimpleITKIO")
    return {"surveys": surveys, "bins": bins, "statistics": statistics, "fingerprint": fingerprint, "plans": plans}


@pytest.fixture(scope="module")
def pooled(sites, tmp_path_factory):
    return pooled_plans(sites["folders"], DATASET, tmp_path_factory.mktemp("pooled"))


def _network(plans):
    """The 3d_fullres fields that decide whether weights can be averaged (all but the widths)."""
    configuration = plans["configurations"]["3d_fullres"]
    kwargs = dict(configuration["architecture"]["arch_kwargs"])
    kwargs.pop("features_per_stage")
    return {"arch_kwargs": kwargs, **{key: configuration[key] for key in SHARED}}


def test_the_sites_spacings_and_sizes_reach_the_plans_as_in_nnunets_pooled_fingerprint(federated, pooled):
    assert {s["reader_writer"] for s in federated["surveys"].values()} == {"SimpleITKIO"}
    for key in ("spacings", "shapes_after_crop"):
        assert sorted(map(tuple, federated["fingerprint"][key])) == sorted(map(tuple, pooled["fingerprint"][key]))
    assert len({tuple(s) for s in federated["fingerprint"]["spacings"]}) == len(SITES)
    merged = federated["fingerprint"]["foreground_intensity_properties_per_channel"]["0"]
    reference = pooled["fingerprint"]["foreground_intensity_properties_per_channel"]["0"]
    assert merged["mean"] == pytest.approx(reference["mean"], rel=1e-6)
    assert merged["std"] == pytest.approx(reference["std"], rel=1e-6)
    assert (merged["min"], merged["max"]) == (reference["min"], reference["max"])


def test_the_federated_3d_fullres_plans_equal_nnunets_plans_of_the_pooled_volumes(federated, pooled):
    plans, reference = federated["plans"], pooled["plans"]
    assert "3d_fullres" in plans["configurations"]
    full, pooled_full = plans["configurations"]["3d_fullres"], reference["configurations"]["3d_fullres"]
    assert full["architecture"] == pooled_full["architecture"]
    assert _network(plans) == _network(reference)
    for key in ("transpose_forward", "original_median_spacing_after_transp", "original_median_shape_after_transp"):
        assert plans[key] == reference[key], key
    alone = []
    for (name, survey), statistics in zip(federated["surveys"].items(), federated["statistics"]):
        fingerprint = merge_site_statistics([statistics], federated["bins"])
        site_plans = plan_from_fingerprint(fingerprint, federation_dataset_json({name: survey}), DATASET, "SimpleITKIO")
        alone.append(site_plans["configurations"]["3d_fullres"])
    assert len({json.dumps([c["spacing"], c["patch_size"]]) for c in alone}) == len(SITES)  # each its own plans
    per_case = [spacing for _, spacing, n in SITES for _ in range(n)]
    assert plans["transpose_forward"] == [0, 1, 2]  # the thick-slice axis is already first
    assert full["spacing"] == np.median(per_case, axis=0).tolist() == [2, 1, 1]


def test_one_federated_3d_fullres_round_plans_trains_and_evaluates_at_every_site(sites, pooled):
    root = sites["root"]
    run = run_federation(run_config(root, DATASET, "3d_fullres", len(SITES)), len(SITES))
    plans = run["plans"]
    full = plans["configurations"]["3d_fullres"]
    assert _network(plans) == _network(pooled["plans"])  # the pooled plans, only narrower
    assert max(full["architecture"]["arch_kwargs"]["features_per_stage"]) <= 16
    assert (run["model"] / "fold_all" / "checkpoint_final.pth").is_file()
    assert json.loads((run["model"] / "plans.json").read_text())["configurations"]["3d_fullres"] == full
    round_1 = run["history"]["1"]
    assert sorted(round_1["train"]["sites"]) == sorted(round_1["evaluate"]["sites"]) == ["site-0", "site-1", "site-2"]
    for name, metrics in round_1["evaluate"]["sites"].items():
        assert metrics["num-examples"] == 1 and len(metrics["dice-per-class"]) == 2, name
        assert all(0.0 <= d <= 1.0 for d in metrics["dice-per-class"])
    for k, (_, _, n) in enumerate(SITES):
        data = root / f"site-{k}" / "nnUNet_preprocessed" / DATASET / full["data_identifier"]
        assert len(list(data.glob("*.pkl"))) == n
