"""Federated model selection (issue 18, item 2): nnUNetv2_find_best_configuration over two sites, counts only.

Two sites of the 3D demo's kind cross-validate 2d and 3d_fullres (folds 0-4, one short run each, in-process), then
one ``find-best-configuration`` run asks each site to ensemble the pair on its own cases. Checked against nnU-Net's
own ``nnUNetv2_find_best_configuration`` run (in its own process, as its command) on the sites' validation
predictions and softmax pooled into one nnU-Net results folder: every score, the choice, the postprocessing
decision; and that every ensemble reply holds only counts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from federation_support import run_config, run_federation
from test_crossval import assert_same_means, in_process_pools
from test_federated_planning import query_grid

from flwr_nnunet.apps.model_selection import ENSEMBLE_QUERY
from flwr_nnunet.demo.crossval_splits import write_five_fold_splits
from flwr_nnunet.demo.data import make_demo_dataset
from flwr_nnunet.site.crossval_ensemble import FOLDS_KEY, MEMBERS_KEY, ensemble_request
from flwr_nnunet.site.crossval_validation import COUNTS_KEY, reply_holds_only_counts
from flwr_nnunet.site.spec import InstructionError

pytestmark = pytest.mark.slow

FOLDS = (0, 1, 2, 3, 4)
CONFIGURATIONS = ("2d", "3d_fullres")
MODELS = tuple(f"nnUNetTrainer__nnUNetPlans__{c}" for c in CONFIGURATIONS)
ENSEMBLE = f"ensemble___{MODELS[0]}___{MODELS[1]}___0_1_2_3_4"
BUDGET = {"num-server-rounds": 2, "iterations-per-epoch": 10}


def fold_config(demo, configuration, fold, **overrides):
    return run_config(
        demo.root,
        demo.dataset_name,
        configuration,
        2,
        fold=str(fold),
        crossval=True,
        resume=True,
        **BUDGET,
        **overrides,
    )


def select(demo, **overrides):
    """The model selection run, in-process: ``(its inference information, its grid)``."""
    from flwr.app import Context, RecordDict

    from flwr_nnunet.apps.server import run_server

    config = fold_config(demo, "2d", 0, **{"find-best-configuration": " ".join(CONFIGURATIONS), **overrides})
    grid = query_grid(config, 2)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(config))
    return run_server(grid, context), grid


@pytest.fixture(scope="module")
def selection(tmp_path_factory):
    demo = make_demo_dataset(tmp_path_factory.mktemp("selection") / "data", num_sites=2, dims=3, planned=False)
    write_five_fold_splits(demo)
    started = time.perf_counter()
    for configuration in CONFIGURATIONS:
        for fold in FOLDS:
            run_federation(fold_config(demo, configuration, fold), 2)
    trained = time.perf_counter() - started
    information, grid = select(demo)
    print(f"10 folds {trained:.0f} s, selection {time.perf_counter() - started - trained:.0f} s")
    return {"demo": demo, "information": information, "grid": grid, "results": demo.server.nnunet_results}


def pooled_nnunet_layout(demo, where: Path) -> dict[str, str]:
    """The sites' validation predictions and softmax of both models in one nnU-Net results folder; its environment."""
    dataset = demo.dataset_name
    preprocessed, results, raw = where / "preprocessed", where / "results", where / "raw"
    server = demo.server.nnunet_results / dataset
    gt = preprocessed / dataset / "gt_segmentations"
    gt.mkdir(parents=True)
    raw.mkdir()
    for name in ("nnUNetPlans.json", "dataset.json"):
        shutil.copyfile(
            server / MODELS[0] / ("plans.json" if name == "nnUNetPlans.json" else name), preprocessed / dataset / name
        )
    for model in MODELS:
        for name in ("plans.json", "dataset.json"):
            (results / dataset / model).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(server / model / name, results / dataset / model / name)
        for fold in FOLDS:
            target = results / dataset / model / f"fold_{fold}" / "validation"
            target.mkdir(parents=True)
            for site in demo.sites:
                folder = site.nnunet_results / dataset / model / f"fold_{fold}" / "validation"
                for path in folder.iterdir():
                    if path.name != "summary.json":
                        shutil.copyfile(path, target / path.name)
    for site in demo.sites:
        for path in (site.preprocessed_dataset_folder / "gt_segmentations").iterdir():
            shutil.copyfile(path, gt / path.name)
    return {"nnUNet_raw": str(raw), "nnUNet_preprocessed": str(preprocessed), "nnUNet_results": str(results)}


def test_the_choice_scores_and_postprocessing_are_nnunets_own_on_the_pooled_predictions(selection, tmp_path):
    demo, ours = selection["demo"], selection["information"]
    environment = pooled_nnunet_layout(demo, tmp_path)
    command = shutil.which("nnUNetv2_find_best_configuration") or str(
        Path(sys.executable).with_name("nnUNetv2_find_best_configuration")
    )
    arguments = [command, demo.dataset_name, "-c", *CONFIGURATIONS, "-np", "1"]
    done = subprocess.run(arguments, env={**os.environ, **environment}, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = Path(environment["nnUNet_results"]) / demo.dataset_name
    theirs = json.loads((results / "inference_information.json").read_text())
    print("ours:", ours["all_results"], "best:", ours["best_model_or_ensemble"]["selected_model_or_models"])
    assert list(ours["all_results"]) == [*MODELS, ENSEMBLE]  # nnU-Net's order: singles, then the pair
    assert ours["all_results"] == theirs["all_results"]  # every score, to the last bit
    assert len(set(ours["all_results"].values())) == 3, "three different scores: the choice is a real one"
    for key in ("selected_model_or_models", "result_on_crossval_pre_pp", "result_on_crossval_post_pp"):
        assert ours["best_model_or_ensemble"][key] == theirs["best_model_or_ensemble"][key], key
    ours_source = Path(ours["best_model_or_ensemble"]["postprocessing_file"]).parent
    theirs_source = Path(theirs["best_model_or_ensemble"]["postprocessing_file"]).parent
    assert ours_source.name == theirs_source.name
    mine, nnunet = (json.loads((s / "postprocessing.json").read_text()) for s in (ours_source, theirs_source))
    assert mine["postprocessing_fns"] == nnunet["postprocessing_fns"]
    assert mine["postprocessing_kwargs"] == nnunet["postprocessing_kwargs"]
    assert_same_means(mine["postprocessed"], nnunet["postprocessed"], "postprocessed")
    assert (ours_source / "postprocessing.pkl").read_bytes() == (theirs_source / "postprocessing.pkl").read_bytes()
    ensemble_summary = json.loads(
        (selection["results"] / demo.dataset_name / "ensembles" / ENSEMBLE / "summary.json").read_text()
    )
    assert_same_means(
        ensemble_summary, json.loads((results / "ensembles" / ENSEMBLE / "summary.json").read_text()), "ensemble"
    )
    assert_the_ensembles_postprocessing_is_nnunets(selection, results / "ensembles" / ENSEMBLE)
    instructions = (selection["results"] / demo.dataset_name / "inference_instructions.txt").read_text()
    assert "nnUNetv2_apply_postprocessing" in instructions and str(ours_source / "postprocessing.pkl") in instructions
    if ours_source.parent.name == "ensembles":
        assert "nnUNetv2_ensemble" in instructions


def assert_the_ensembles_postprocessing_is_nnunets(selection, nnunet_ensemble: Path) -> None:
    """Whichever wins: the decision our ensemble's counts give is nnU-Net's on its own ensemble's predictions."""
    from nnunetv2.postprocessing.remove_connected_components import determine_postprocessing

    from flwr_nnunet.apps.crossval_results import COUNTS_FILE, DatasetLabels, write_postprocessing

    ours = selection["results"] / selection["demo"].dataset_name / "ensembles" / ENSEMBLE
    counts = json.loads((ours / COUNTS_FILE).read_text())
    plans, dataset_json = (json.loads((ours / name).read_text()) for name in ("plans.json", "dataset.json"))
    decided = nnunet_ensemble.parent / "ours"
    decided.mkdir()
    write_postprocessing(counts["sites"], DatasetLabels.from_plans(plans, dataset_json), decided)
    with in_process_pools():
        determine_postprocessing(
            str(nnunet_ensemble),
            str(nnunet_ensemble.parents[3] / "preprocessed" / selection["demo"].dataset_name / "gt_segmentations"),
            plans,
            dataset_json,
            num_processes=1,
            keep_postprocessed_files=False,
        )
    mine, nnunet = (json.loads((f / "postprocessing.json").read_text()) for f in (decided, nnunet_ensemble))
    assert mine["postprocessing_kwargs"] == nnunet["postprocessing_kwargs"]
    assert_same_means(mine["postprocessed"], nnunet["postprocessed"], "the ensemble postprocessed")
    assert (decided / "postprocessing.pkl").read_bytes() == (nnunet_ensemble / "postprocessing.pkl").read_bytes()


def test_every_ensemble_reply_holds_only_counts_and_the_softmax_stays_at_the_sites(selection):
    demo, grid = selection["demo"], selection["grid"]
    replies = [r for r in grid.replies if r.metadata.message_type == ENSEMBLE_QUERY]
    assert len(replies) == 2
    for reply in replies:
        assert not reply.has_error(), reply.error if reply.has_error() else ""
        assert not reply.content.array_records
        assert list(reply.content.metric_records["metrics"]) == ["num-examples"]
        config = reply.content.config_records["config"]
        assert set(config) == {"site-name", COUNTS_KEY}
        payload = json.loads(config[COUNTS_KEY])
        assert reply_holds_only_counts(payload, ["1", "2"]) is None
        site = next(s for s in demo.sites if s.name == config["site-name"])
        assert sorted(payload) == sorted(site.training_cases)  # every case the site cross-validated, once
        kept = site.nnunet_results / demo.dataset_name / "ensembles" / ENSEMBLE
        assert len(list(kept.glob(f"*{demo.file_ending}"))) == len(payload)  # the ensemble's predictions stay there
    assert not list((selection["results"] / demo.dataset_name).rglob("*.npz"))  # no softmax at the server


@pytest.mark.parametrize(
    "config, problem",
    [
        ({MEMBERS_KEY: [MODELS[0]], FOLDS_KEY: [0]}, MEMBERS_KEY),
        ({MEMBERS_KEY: [MODELS[0], MODELS[0]], FOLDS_KEY: [0]}, MEMBERS_KEY),
        ({MEMBERS_KEY: [MODELS[0], "../../etc__x__y"], FOLDS_KEY: [0]}, MEMBERS_KEY),
        ({MEMBERS_KEY: list(MODELS), FOLDS_KEY: [0, 0]}, FOLDS_KEY),
        ({MEMBERS_KEY: list(MODELS), FOLDS_KEY: [-1]}, FOLDS_KEY),
        ({MEMBERS_KEY: list(MODELS), FOLDS_KEY: [True]}, FOLDS_KEY),
        ({MEMBERS_KEY: list(MODELS)}, FOLDS_KEY),
    ],
)
def test_an_ensemble_request_that_names_anything_but_two_models_and_folds_is_refused(config, problem):
    with pytest.raises(InstructionError, match=problem):
        ensemble_request(config)


def test_a_configuration_not_cross_validated_or_not_supported_stops_the_run_naming_the_fix(selection):
    from flwr_nnunet.apps.config_errors import ServerConfigError

    demo = selection["demo"]
    with pytest.raises(ServerConfigError, match="not supported by federated model selection yet"):
        select(demo, **{"find-best-configuration": "2d 3d_lowres"})
    model = selection["results"] / demo.dataset_name / MODELS[1] / "crossval_results_folds_0_1_2_3_4"
    model.rename(model.with_name("aside"))
    try:
        with pytest.raises(ServerConfigError, match="cross-validate configuration '3d_fullres' first"):
            select(demo)
    finally:
        model.with_name("aside").rename(model)
