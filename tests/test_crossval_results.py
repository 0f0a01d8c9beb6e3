"""The server's side of the federated cross-validation without training: which replies it keeps, what it writes.

Synthetic cases (``test_crossval.liver_cases_2d``: the foreground and liver steps help, the tumour's does not) are
split over two sites and five folds; each site's :func:`candidate_counts` go through JSON as a reply carries them.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from flwr.app import ConfigRecord, RecordDict
from test_crossval import LABELS, PLANS, dataset_json, liver_cases_2d

from flwr_nnunet.apps.crossval_phase import counts_of
from flwr_nnunet.apps.crossval_results import (
    MERGE_FILE,
    DatasetLabels,
    counts_file,
    merge_folds,
    merged_folder,
    summary_file_names,
    write_fold_results,
)
from flwr_nnunet.nnunet.crossval import (
    CountsError,
    candidate_counts,
    decide_postprocessing,
    postprocessing_json,
    summary_from_counts,
    transpose_candidate_counts,
)
from flwr_nnunet.site.crossval_validation import COUNTS_KEY

LABELS_2D = DatasetLabels((1, 2), (1, 2), ".nii.gz")


def wire(report):
    """What a reply carries: JSON keys, through JSON."""

    def keys(value):
        return {str(k): keys(v) for k, v in value.items()} if isinstance(value, dict) else value

    return json.loads(json.dumps(keys(report)))


@pytest.fixture(scope="module")
def reports():
    references, predictions = liver_cases_2d()
    return {case: wire(candidate_counts(references[case], predictions[case], [1, 2])) for case in sorted(references)}


def reply(payload, num_examples=None, text=None):
    config = ConfigRecord({COUNTS_KEY: json.dumps(payload) if text is None else text, "site-name": "site-0"})
    message = SimpleNamespace(content=RecordDict({"config": config}))
    return SimpleNamespace(message=message, num_examples=float(len(payload) if num_examples is None else num_examples))


def test_a_reply_of_consistent_counts_is_kept_anything_else_is_refused(reports):
    payload, reason = counts_of(reply(reports), LABELS_2D)
    assert reason is None and payload == reports

    case = next(iter(reports))
    leaking = json.loads(json.dumps(reports))
    leaking[case]["without"]["1"]["pixels"] = [1, 2, 3]
    assert "'pixels' is not one of nnU-Net's per-case metrics" in counts_of(reply(leaking), LABELS_2D)[1]
    image = json.loads(json.dumps(reports))
    image[case]["image"] = {"1": {"TP": 1}}
    assert "not one of" in counts_of(reply(image), LABELS_2D)[1]
    other_label = json.loads(json.dumps(reports))
    other_label[case]["without"]["3"] = other_label[case]["without"]["1"]
    assert "'3': not one of ['1', '2']" in counts_of(reply(other_label), LABELS_2D)[1]
    assert "num-examples 3 differs from the 8 case(s)" in counts_of(reply(reports, num_examples=3), LABELS_2D)[1]
    assert "is not JSON" in counts_of(reply(reports, text="{not json"), LABELS_2D)[1]
    assert "counts no case" in counts_of(reply({}, num_examples=1), LABELS_2D)[1]
    grown = json.loads(json.dumps(reports))  # a "step" that adds predicted voxels
    entry = grown["liver_00"]["with_foreground_step"]["1"]
    entry.update(FP=entry["FP"] + 5, TN=entry["TN"] - 5, n_pred=entry["n_pred"] + 5)
    assert "more predicted voxels" in counts_of(reply(grown), LABELS_2D)[1]
    missing_step = json.loads(json.dumps(reports))
    del missing_step["liver_01"]["with_label_step"]["2"]
    assert "covers other cases" in counts_of(reply(missing_step), LABELS_2D)[1]
    no_counts = SimpleNamespace(
        message=SimpleNamespace(content=RecordDict({"config": ConfigRecord({})})), num_examples=1.0
    )
    assert f"no {COUNTS_KEY!r} text" in counts_of(no_counts, LABELS_2D)[1]


def folds_of(reports):
    """The cases split over two sites and five folds, every case in one fold's validation of one site."""
    cases = sorted(reports)
    return {
        fold: {
            site: {
                case: reports[case]
                for i, case in enumerate(cases)
                if i % 5 == fold and (i % 2 == 0) == (site == "site-0")
            }
            for site in ("site-0", "site-1")
        }
        for fold in range(5)
    }


def test_folds_merge_once_all_five_are_validated_with_nnunets_summary_and_decision(reports, tmp_path):
    (tmp_path / "plans.json").write_text(json.dumps(PLANS))
    (tmp_path / "dataset.json").write_text(json.dumps(dataset_json(LABELS)))
    folds = folds_of(reports)
    for fold, per_site in folds.items():
        per_site = {site: cases for site, cases in per_site.items() if cases}
        summaries = write_fold_results(tmp_path, fold, per_site, LABELS_2D, server_round=2)
        pooled = {case: report["without"] for cases in per_site.values() for case, report in cases.items()}
        assert summaries["pooled"] == summary_from_counts(pooled, [1, 2], file_ending=".nii.gz")
        written = json.loads((tmp_path / f"fold_{fold}" / "validation" / "summary.json").read_text())
        assert written["foreground_mean"]["Dice"] == pytest.approx(summaries["pooled"]["foreground_mean"]["Dice"])
        assert json.loads(counts_file(tmp_path, fold).read_text())["sites"] == per_site
        merged = merge_folds(tmp_path, PLANS, dataset_json(LABELS))
        assert (merged is None) == (fold < 4)
    folder = merged_folder(tmp_path)
    assert merged == folder
    expected = decide_postprocessing(
        **transpose_candidate_counts(reports), labels_or_regions=[1, 2], file_ending=".nii.gz"
    )
    ours = json.loads((folder / "postprocessing.json").read_text())
    assert ours["postprocessing_kwargs"] == postprocessing_json(expected)["postprocessing_kwargs"] != []
    summary = json.loads((folder / "summary.json").read_text())
    assert [c["case_id"] for c in summary["metric_per_case"]] == sorted(reports)
    about = json.loads((folder / MERGE_FILE).read_text())
    assert sum(site["cases"] for site in about["sites"].values()) == len(reports)
    assert (folder / "postprocessing.pkl").is_file() and (folder / "plans.json").is_file()
    for site in ("site-0", "site-1"):
        assert (folder / f"summary_{site}.json").is_file()

    # A site that validates one case in two folds has no five-fold split: the merge says so.
    twice = json.loads(counts_file(tmp_path, 1).read_text())
    twice["sites"]["site-0"].update(folds[0]["site-0"])
    counts_file(tmp_path, 1).write_text(json.dumps(twice))
    with pytest.raises(CountsError, match="in folds 0 and 1: its splits_final.json is not a five-fold split"):
        merge_folds(tmp_path, PLANS, dataset_json(LABELS))


def test_case_ids_two_sites_share_are_pooled_under_the_sites_names(reports, tmp_path):
    shared = {"site-0": dict(reports), "site-1": dict(reports)}
    summaries = write_fold_results(tmp_path, 0, shared, LABELS_2D, server_round=1)
    ids = [c["case_id"] for c in summaries["pooled"]["metric_per_case"]]
    assert len(ids) == 2 * len(reports) and ids[0].startswith("site-0/")
    assert summaries["site-1"]["foreground_mean"] == pytest.approx(summaries["site-0"]["foreground_mean"])


def test_site_names_become_safe_distinct_file_names():
    names = summary_file_names(["site-0", "a/b", "a b", "../x"])
    assert names == {
        "site-0": "summary_site-0.json",
        "a b": "summary_a_b.json",
        "a/b": "summary_a_b_2.json",
        "../x": "summary_x.json",
    }
