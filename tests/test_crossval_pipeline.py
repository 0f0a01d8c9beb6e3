"""Federated five-fold cross-validation (issue 18), the whole ServerApp in-process on two sites of the demo's kind.

Folds 0-4 run in turn (``crossval=true resume=true``, one round each). After each fold's last round every site
validates the fold's global model on its own validation cases; only per-case counts come back. Checked: every fold's
``checkpoint_final.pth`` where ``nnUNetv2_predict -f k`` finds it; every cross-validation reply holds only counts;
each fold's pooled ``summary.json`` and the merged one equal nnU-Net's ``compute_metrics_on_folder`` on the union of
the sites' exported predictions (gathered here, in the test only); ``postprocessing.json`` and the bytes of
``postprocessing.pkl`` equal nnU-Net's ``determine_postprocessing`` on those predictions (no pickle is loaded);
``nnUNetv2_predict -f 0 1 2 3 4`` then ``nnUNetv2_apply_postprocessing`` run on a site's held-out images; a pipeline
killed after a fold's rounds validates that fold when started again; a reply that is not only counts is refused.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from federation_support import run_config, run_federation
from test_crossval import assert_same_means, in_process_pools, same_number

from flwr_nnunet.apps.crossval_results import COUNTS_FILE, MERGE_FILE, counts_file
from flwr_nnunet.demo.crossval_splits import write_five_fold_splits
from flwr_nnunet.demo.data import make_demo_dataset
from flwr_nnunet.demo.heldout import dice_scores, predict
from flwr_nnunet.nnunet.checkpoint_io import load_checkpoint
from flwr_nnunet.site.crossval_validation import COUNTS_KEY, reply_holds_only_counts

pytestmark = pytest.mark.slow

FOLDS = (0, 1, 2, 3, 4)
MODEL = "nnUNetTrainer__nnUNetPlans__2d"
BUDGET = {"num-server-rounds": 3, "iterations-per-epoch": 40}
"""Three rounds of 40 batches per fold: foreground Dice about 0.83, and nnU-Net keeps two postprocessing steps."""


def fold_config(demo, fold):
    return run_config(demo.root, demo.dataset_name, "2d", 2, fold=str(fold), crossval=True, resume=True, **BUDGET)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    demo = make_demo_dataset(tmp_path_factory.mktemp("crossval") / "data", num_sites=2, planned=False)
    write_five_fold_splits(demo)
    runs = {}
    for fold in FOLDS:
        started = time.perf_counter()
        runs[fold] = run_federation(fold_config(demo, fold), 2)
        print(f"fold {fold}: {time.perf_counter() - started:.1f} s")
    return {"demo": demo, "runs": runs, "model": runs[0]["model"]}


def crossval_replies(grid):
    return [
        reply
        for reply in grid.replies
        if not reply.has_error() and COUNTS_KEY in reply.content.config_records.get("config", {})
    ]


def validation_cases(site, fold):
    return json.loads((site.preprocessed_dataset_folder / "splits_final.json").read_text())[fold]["val"]


def gather(demo, folds, where: Path, sites=None) -> tuple[Path, Path]:
    """The sites' exported validation predictions of ``folds`` and their references, in one folder each."""
    pred, ref = where / "pred", where / "ref"
    pred.mkdir(parents=True)
    ref.mkdir(parents=True)
    for site in demo.sites if sites is None else sites:
        for fold in folds:
            folder = site.nnunet_results / demo.dataset_name / MODEL / f"fold_{fold}" / "validation"
            for path in folder.glob(f"*{demo.file_ending}"):
                shutil.copyfile(path, pred / path.name)
                shutil.copyfile(site.preprocessed_dataset_folder / "gt_segmentations" / path.name, ref / path.name)
    return pred, ref


def nnunet_summary(model: Path, pred: Path, ref: Path) -> dict:
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_json = json.loads((model / "dataset.json").read_text())
    reader = PlansManager(str(model / "plans.json")).image_reader_writer_class()
    output = pred.parent / "nnunet_summary.json"
    with in_process_pools():
        compute_metrics_on_folder(
            str(ref), str(pred), str(output), reader, dataset_json["file_ending"], [1, 2], None, num_processes=1
        )
    return json.loads(output.read_text())


def assert_nnunets_summary(ours_file: Path, theirs: dict, ending: str) -> None:
    ours = json.loads(ours_file.read_text())
    assert_same_means(ours, theirs, str(ours_file))
    names = [Path(case["prediction_file"]).name.removesuffix(ending) for case in theirs["metric_per_case"]]
    assert [case["case_id"] for case in ours["metric_per_case"]] == names  # every case, in nnU-Net's order
    for mine, nnunet in zip(ours["metric_per_case"], theirs["metric_per_case"]):
        for label, metrics in nnunet["metrics"].items():
            for metric, value in metrics.items():
                assert same_number(mine["metrics"][label][metric], value), (mine["case_id"], label, metric)


def test_every_fold_has_its_model_where_nnunet_finds_it_and_the_sites_sent_only_counts(pipeline):
    demo, model = pipeline["demo"], pipeline["model"]
    assert not (model / "fold_all").exists()
    for fold, run in pipeline["runs"].items():
        checkpoint = load_checkpoint(model / f"fold_{fold}" / "checkpoint_final.pth")
        assert checkpoint["init_args"]["fold"] == fold
        assert (model / f"fold_{fold}" / "flwr_history.json").is_file()  # each fold's own history
        replies = crossval_replies(run["grid"])
        assert len(replies) == 2
        for reply in replies:
            assert not reply.content.array_records  # no tensor, no image
            assert list(reply.content.metric_records["metrics"]) == ["num-examples"]
            config = reply.content.config_records["config"]
            assert set(config) == {"plans-sha256", "site-name", COUNTS_KEY}
            payload = json.loads(config[COUNTS_KEY])
            assert reply_holds_only_counts(payload, ["1", "2"]) is None
            site = next(s for s in demo.sites if s.name == config["site-name"])
            assert sorted(payload) == sorted(validation_cases(site, fold))
            assert reply.content.metric_records["metrics"]["num-examples"] == len(payload)
        stored = json.loads(counts_file(model, fold).read_text())
        assert sorted(stored["sites"]) == ["site-0", "site-1"] and stored["refused"] == {}


def test_each_folds_pooled_summary_is_nnunets_on_the_sites_predictions(pipeline, tmp_path):
    demo, model = pipeline["demo"], pipeline["model"]
    for fold in FOLDS:
        folder = model / f"fold_{fold}" / "validation"
        pred, ref = gather(demo, [fold], tmp_path / f"fold_{fold}")
        assert_nnunets_summary(folder / "summary.json", nnunet_summary(model, pred, ref), demo.file_ending)
        for site in demo.sites:  # each site's summary is nnU-Net's on that site's predictions
            own_pred, own_ref = gather(demo, [fold], tmp_path / f"{fold}-{site.name}", [site])
            theirs = nnunet_summary(model, own_pred, own_ref)
            assert_nnunets_summary(folder / f"summary_{site.name}.json", theirs, demo.file_ending)
        assert {p.name for p in folder.iterdir()} == {
            "summary.json",
            "summary_site-0.json",
            "summary_site-1.json",
            COUNTS_FILE,
        }


def test_the_merged_folds_and_their_postprocessing_are_nnunets(pipeline, tmp_path):
    from nnunetv2.postprocessing.remove_connected_components import determine_postprocessing

    demo, model = pipeline["demo"], pipeline["model"]
    merged = model / "crossval_results_folds_0_1_2_3_4"
    pred, ref = gather(demo, FOLDS, tmp_path / "merged")
    assert len(list(pred.iterdir())) == sum(len(site.training_cases) for site in demo.sites)  # every case once
    assert_nnunets_summary(merged / "summary.json", nnunet_summary(model, pred, ref), demo.file_ending)
    with in_process_pools():
        pp_fns, _ = determine_postprocessing(
            str(pred),
            str(ref),
            json.loads((model / "plans.json").read_text()),
            json.loads((model / "dataset.json").read_text()),
            num_processes=1,
            keep_postprocessed_files=False,
        )
    ours = json.loads((merged / "postprocessing.json").read_text())
    theirs = json.loads((pred / "postprocessing.json").read_text())
    assert ours["postprocessing_kwargs"], "BUDGET trains a model whose postprocessing keeps a step (a real decision)"
    assert ours["postprocessing_fns"] == theirs["postprocessing_fns"] == [fn.__name__ for fn in pp_fns]
    assert ours["postprocessing_kwargs"] == theirs["postprocessing_kwargs"]
    for part in ("input_folder", "postprocessed"):
        assert_same_means(ours[part], theirs[part], part)
    assert (merged / "postprocessing.pkl").read_bytes() == (pred / "postprocessing.pkl").read_bytes()  # bytes only
    about = json.loads((merged / MERGE_FILE).read_text())
    assert about["folds"] == list(FOLDS) and sorted(about["sites"]) == ["site-0", "site-1"]
    assert about["postprocessing"]["postprocessing_kwargs"] == theirs["postprocessing_kwargs"]
    print(f"merged foreground Dice {about['foreground_dice']:.4f}, postprocessing {theirs['postprocessing_kwargs']}")


def test_nnunet_predicts_with_the_five_folds_and_applies_the_postprocessing(pipeline, tmp_path):
    demo, model = pipeline["demo"], pipeline["model"]
    merged = model / "crossval_results_folds_0_1_2_3_4"
    site = demo.sites[0]
    output = predict(demo, demo.server.nnunet_results, site.images_ts, tmp_path / "pred", fold=[str(f) for f in FOLDS])
    command = shutil.which("nnUNetv2_apply_postprocessing") or str(
        Path(sys.executable).with_name("nnUNetv2_apply_postprocessing")
    )
    arguments = [
        command,
        "-i",
        str(output),
        "-o",
        str(tmp_path / "pp"),
        "-pp_pkl_file",
        str(merged / "postprocessing.pkl"),
    ]
    arguments += ["-np", "1", "-plans_json", str(merged / "plans.json"), "-dataset_json", str(merged / "dataset.json")]
    done = subprocess.run(arguments, capture_output=True, text=True, check=False)  # nnU-Net's command reads its pickle
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    scores = dice_scores(tmp_path / "pp", site.labels_ts, site.test_cases, demo.file_ending)
    assert set(scores) == {"organ", "lesion", "mean"}


def test_a_pipeline_killed_after_a_folds_rounds_validates_that_fold_when_started_again(pipeline, flwr_log):
    demo, model = pipeline["demo"], pipeline["model"]
    before = counts_file(model, 4).read_text()
    again = run_federation(fold_config(demo, 4), 2)  # finished and validated: nothing is asked of the sites
    assert crossval_replies(again["grid"]) == [] and counts_file(model, 4).read_text() == before
    counts_file(model, 4).unlink()  # killed after the last round, before the sites' validation
    again = run_federation(fold_config(demo, 4), 2)
    assert len(crossval_replies(again["grid"])) == 2
    assert json.loads(counts_file(model, 4).read_text()) == json.loads(before)  # the same final model, the same counts
    assert any("already finished" in r.getMessage() for r in flwr_log)


def test_a_reply_that_is_not_only_counts_is_refused_and_the_phase_goes_on(pipeline, monkeypatch, flwr_log):
    from flwr_nnunet.site.site import Site

    demo, model = pipeline["demo"], pipeline["model"]
    honest = Site.crossval_validate

    def leaking(self, *args, **kwargs):
        payload = honest(self, *args, **kwargs)
        if self.spec.name == "site-1":
            next(iter(payload.values()))["without"]["1"]["voxels"] = [3, 4, 5]
        return payload

    monkeypatch.setattr(Site, "crossval_validate", leaking)
    counts_file(model, 3).unlink()
    run_federation(fold_config(demo, 3), 2)
    stored = json.loads(counts_file(model, 3).read_text())
    assert sorted(stored["sites"]) == ["site-0"] and "'voxels' is not one of nnU-Net's" in stored["refused"]["site-1"]
    assert any("the reply of site site-1" in r.getMessage() and "refused" in r.getMessage() for r in flwr_log)
    about = json.loads((model / "crossval_results_folds_0_1_2_3_4" / MERGE_FILE).read_text())
    assert about["sites"]["site-1"]["cases"] == len(demo.sites[1].training_cases) - len(
        validation_cases(demo.sites[1], 3)
    )
