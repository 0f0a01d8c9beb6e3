"""The whole ServerApp in-process on 4 sites of the demo's kind, one with another label convention: the run names
it, flagged-weight=0 leaves it out of training, and every site ends with a personal model nnUNetv2_predict uses."""

from __future__ import annotations

import json

import pytest
from federation_support import run_config, run_federation

from flwr_nnunet.apps.history import HISTORY_FILE
from flwr_nnunet.demo.corruption import corrupt_site_labels
from flwr_nnunet.demo.data import make_demo_dataset
from flwr_nnunet.demo.heldout import dice_scores, predict
from flwr_nnunet.nnunet.checkpoint_io import load_checkpoint
from flwr_nnunet.site.personal import PERSONAL_KEY

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    demo = make_demo_dataset(tmp_path_factory.mktemp("outlier") / "data", num_sites=4, planned=False)
    corrupt_site_labels(demo.sites[3], demo.file_ending)
    return demo


def flagged_lines(records):
    return [r.getMessage() for r in records if "disagrees with the federation" in r.getMessage()]


def test_the_run_names_the_site_excludes_it_and_every_site_fine_tunes_a_personal_model(federation, flwr_log):
    demo = federation
    config = run_config(
        demo.root,
        demo.dataset_name,
        "2d",
        4,
        **{"num-server-rounds": 2, "flagged-weight": 0.0, "fine-tune-epochs": 1, "min-train-nodes": 4},
    )
    done = run_federation(config, 4, flagged=["site-3"])
    (line,) = flagged_lines(flwr_log)
    assert line.startswith("flwr-nnunet: site site-3 (node 103) disagrees with the federation before training:")
    assert "labels 'organ' (1) and 'lesion' (2) look swapped" in line
    for server_round in ("1", "2"):
        entry = done["history"][server_round]
        assert sorted(entry["train"]["sites"]) == ["site-0", "site-1", "site-2"]  # left out of training
        assert sorted(entry["evaluate"]["sites"]) == ["site-0", "site-1", "site-2", "site-3"]  # still evaluated
        assert entry["diagnostics"]["flagged"] == {"site-3": 0}
        assert len(entry["evaluate"]["sites"]["site-3"]["label-confusion"]) == 9
    fine_tune = json.loads((done["model"] / HISTORY_FILE).read_text())["fine-tune"]["sites"]
    assert sorted(fine_tune) == ["site-0", "site-1", "site-2", "site-3"]
    site = demo.sites[0]
    personal = site.nnunet_results / demo.dataset_name / "nnUNetTrainer__nnUNetPlans__2d" / "fold_0"
    about = load_checkpoint(personal / "checkpoint_personal.pth")[PERSONAL_KEY]
    assert about["kind"] == ("fine-tuned" if fine_tune["site-0"]["fine-tune-kept"] == 1 else "global")
    assert about["validation_dice"] == fine_tune["site-0"]["personal-dice"] >= fine_tune["site-0"]["dice"]
    output = demo.root / "personal-predictions"
    predict(demo, site.nnunet_results, site.images_ts, output, fold="0", checkpoint="checkpoint_personal.pth")
    scores = dice_scores(output, site.labels_ts, site.test_cases, demo.file_ending)
    assert set(scores) == {"organ", "lesion", "mean"}  # nnUNetv2_predict used the site's personal model folder


def test_mr_mtl_runs_through_the_server_and_the_history_shows_both_models(federation):
    demo = federation
    config = run_config(demo.root, demo.dataset_name, "2d", 4, **{"num-server-rounds": 2, "personalization": "mr-mtl"})
    done = run_federation(config, 4, flagged=["site-3"])  # named by the planning phase, kept (flagged-weight 1)
    for name, metrics in done["history"]["2"]["evaluate"]["sites"].items():
        assert 0.0 <= metrics["personal-dice"] <= 1.0 and 0.0 <= metrics["dice"] <= 1.0, name
    site = demo.sites[1]
    personal = site.nnunet_results / demo.dataset_name / "nnUNetTrainer__nnUNetPlans__2d" / "fold_0"
    assert load_checkpoint(personal / "checkpoint_personal.pth")[PERSONAL_KEY]["kind"] == "mr-mtl"
    assert (done["model"] / "flwr_progress.png").is_file()
