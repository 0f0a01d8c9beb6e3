"""Leave one site out (issue 18, item 5): plan and train without a site, then evaluate at it.

Three sites of the demo's kind; site-2 is held out. The federation of site-0 and site-1 plans from their statistics
only (the merged fingerprint counts their cases, no other), trains, and site-2's held-out cases are predicted with
``nnUNetv2_predict`` on the final model; nothing of site-2 was read or written by the run.
"""

from __future__ import annotations

import json

import pytest
from federation_support import run_config, run_federation

from flwr_nnunet.apps.config_errors import ServerConfigError
from flwr_nnunet.apps.leave_one_site_out import SITES_FILE, federation_without
from flwr_nnunet.demo.data import make_demo_dataset
from flwr_nnunet.demo.heldout import predict_test_cases


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("loso") / "data", num_sites=3, planned=False)


def tree(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


@pytest.mark.slow
def test_the_held_out_site_is_neither_planned_with_nor_trained_on_and_the_model_is_scored_there(demo, tmp_path):
    held_out = demo.sites[2]
    site_folder = held_out.nnunet_raw.parent
    before = tree(site_folder)
    target = tmp_path / "federation"
    assert federation_without(demo.root, "site-2", target) == {"site-0": "site-0", "site-1": "site-1"}
    run = run_federation(run_config(target, demo.dataset_name, "2d", 2, **{"iterations-per-epoch": 10}), 2)
    fingerprint = json.loads(
        (target / "server" / "nnUNet_preprocessed" / demo.dataset_name / "dataset_fingerprint.json").read_text()
    )
    planned_cases = len(demo.sites[0].training_cases) + len(demo.sites[1].training_cases)
    assert len(fingerprint["shapes_after_crop"]) == planned_cases  # the plans saw site-0 and site-1 only
    assert tree(site_folder) == before  # nothing written at site-2
    assert not any("site-2" in str(p.resolve()) for p in target.rglob("*"))
    scores = predict_test_cases(demo, held_out, target / "server" / "nnUNet_results", tmp_path / "pred")
    assert set(scores) == {"organ", "lesion", "mean"} and all(0.0 <= v <= 1.0 for v in scores.values())
    assert (run["model"] / "fold_all" / "checkpoint_final.pth").is_file()


def test_the_other_sites_are_renumbered_in_order_and_named_in_the_data_root(demo, tmp_path):
    assert federation_without(demo.root, "site-0", tmp_path / "t") == {"site-0": "site-1", "site-1": "site-2"}
    about = json.loads((tmp_path / "t" / SITES_FILE).read_text())
    assert about == {"sites": {"site-0": "site-1", "site-1": "site-2"}, "held_out": "site-0"}
    assert (tmp_path / "t" / "site-1" / "nnUNet_raw").resolve() == demo.sites[2].nnunet_raw


@pytest.mark.parametrize("held_out, problem", [("site-7", "is not a site"), ("hospital", "is not a site")])
def test_an_unknown_site_is_refused_naming_the_sites(demo, tmp_path, held_out, problem):
    with pytest.raises(ServerConfigError, match=f"{problem}.*site-0, site-1, site-2"):
        federation_without(demo.root, held_out, tmp_path / "t")


def test_a_federation_of_one_site_is_refused(tmp_path):
    two = make_demo_dataset(tmp_path / "two", num_sites=2, planned=False)
    with pytest.raises(ServerConfigError, match="1 site"):
        federation_without(two.root, "site-0", tmp_path / "t")
