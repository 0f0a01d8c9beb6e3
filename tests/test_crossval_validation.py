"""A site's whole-case validation of a fold's model (issue 18): nnU-Net's own validation, counts out."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from test_site import demo, initial_weights, options, spec_for  # noqa: F401 - demo is a module fixture

from flwr_nnunet.nnunet.crossval import summary_from_counts
from flwr_nnunet.site.crossval_validation import reply_holds_only_counts, validate_fold
from flwr_nnunet.site.site import Site
from flwr_nnunet.site.spec import SiteError

COUNTS = ("FP", "TP", "FN", "TN", "n_pred", "n_ref")


def read_seg(trainer, path):
    return trainer.plans_manager.image_reader_writer_class().read_seg(str(path))[0]


def without_folders(summary_file):
    """summary.json's text with each file named by its name only (nnU-Net's and ours lie in other folders)."""
    summary = json.loads(summary_file.read_text())
    for case in summary["metric_per_case"]:
        for key in ("reference_file", "prediction_file"):
            case[key] = case[key].rsplit("/", 1)[-1]
    return json.dumps(summary, sort_keys=True)


def test_site_validation_is_nnunets_own_and_sends_only_counts(demo, tmp_path, monkeypatch):  # noqa: F811
    site = Site(spec_for(demo, tmp_path / "results"))
    site.train(initial_weights(demo), options(1, num_epochs=1, iterations=3))
    trainer = site.trainer
    ending = trainer.dataset_json["file_ending"]
    cases = site.split()[1]

    started = time.perf_counter()
    ours = tmp_path / "ours"
    payload = validate_fold(site.spec, trainer, site.network, output_folder=ours, save_probabilities=True)
    ours_seconds = time.perf_counter() - started

    # nnU-Net's own validation of the same live trainer, in this process (one export process, one metrics process).
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    monkeypatch.setattr(trainer_module, "default_num_processes", 1)
    started = time.perf_counter()
    trainer.perform_actual_validation(save_probabilities=False)
    nnunet_seconds = time.perf_counter() - started
    theirs = site.spec.output_folder / "validation"
    print(f"validate_fold {ours_seconds:.1f} s, perform_actual_validation {nnunet_seconds:.1f} s, {len(cases)} cases")

    # The same segmentations, bit for bit, in the original image space; the softmax stays at the site.
    assert sorted(payload) == sorted(cases)
    for case in cases:
        mine, nnunet = read_seg(trainer, ours / f"{case}{ending}"), read_seg(trainer, theirs / f"{case}{ending}")
        assert mine.dtype == nnunet.dtype and np.array_equal(mine, nnunet), case
        assert (ours / f"{case}{ending}").read_bytes() == (theirs / f"{case}{ending}").read_bytes(), case
        probabilities = np.load(ours / f"{case}.npz")["probabilities"]
        assert probabilities.shape[0] == 3 and probabilities.shape[1:] == mine.shape[1:]
        assert np.array_equal(probabilities.argmax(0), mine[0])

    # The summary the server computes from the counts is nnU-Net's summary.json; the site's own file is nnU-Net's.
    nnunet_summary = json.loads((theirs / "summary.json").read_text())
    summary = summary_from_counts({case: counts["without"] for case, counts in payload.items()}, [1, 2])
    assert summary["foreground_mean"] == pytest.approx(nnunet_summary["foreground_mean"], nan_ok=True)
    for label in (1, 2):
        assert summary["mean"][label] == pytest.approx(nnunet_summary["mean"][str(label)], nan_ok=True)
    assert without_folders(ours / "summary.json") == without_folders(theirs / "summary.json")

    # What a reply carries: JSON numbers keyed by case, only counts.
    assert json.loads(json.dumps(payload, allow_nan=False)) == payload
    assert reply_holds_only_counts(payload, [1, 2]) is None and reply_holds_only_counts(payload) is None
    for report in payload.values():
        assert set(report) == {"without", "with_foreground_step", "with_label_step", "with_foreground_and_label_step"}
        for part in ("without", "with_foreground_step"):
            assert set(report[part]) == {"1", "2"} and all(set(c) == set(COUNTS) for c in report[part].values())
        for part in ("with_label_step", "with_foreground_and_label_step"):
            assert {label: list(counts) for label, counts in report[part].items()} == {"1": ["1"], "2": ["2"]}

    # A missing ground truth is refused before anything is predicted, naming the fix.
    truth = site.spec.dataset_folder / "gt_segmentations" / f"{cases[0]}{ending}"
    hidden = truth.with_name("hidden")
    truth.rename(hidden)
    try:
        with pytest.raises(SiteError, match="nnUNetv2_preprocess writes gt_segmentations: run nnUNetv2_preprocess -d"):
            validate_fold(site.spec, trainer, site.network, output_folder=tmp_path / "refused")
    finally:
        hidden.rename(truth)
    assert not (tmp_path / "refused").exists()


def counts(tp=3, fp=1, fn=2, tn=58):
    return {"FP": fp, "TP": tp, "FN": fn, "TN": tn, "n_pred": tp + fp, "n_ref": tp + fn}


def test_a_reply_with_anything_but_counts_is_refused():
    good = {
        "case_0": {
            "without": {"1": counts(), "2": counts()},
            "with_foreground_step": {"1": counts(), "2": counts(fp=0, tn=59)},
            "with_label_step": {"1": {"1": counts()}, "2": {"2": counts()}},
            "with_foreground_and_label_step": {"1": {"1": counts()}, "2": {"2": counts()}},
        },
        "case_1": {"without": {"(1, 2)": {**counts(), "Dice": 0.6, "IoU": float("nan")}}},
    }
    assert reply_holds_only_counts(good) is None

    def with_case(report):
        return {**good, "case_2": report}

    voxels = list(range(64 * 64))
    refused = {
        "an array of probabilities": with_case({"without": {"1": {"TP": np.zeros((3, 64, 64))}}}),
        "a numpy count": with_case({"without": {"1": {**counts(), "TP": np.int64(3)}}}),
        "a list of voxel values": with_case({"without": {"1": {"TP": voxels}}}),
        "a field of its own": with_case({"without": {"1": counts()}, "prediction": voxels}),
        "voxels as label keys": with_case({"without": {str(i): counts() for i in range(300)}}),
        "an image as bytes": with_case({"without": {"1": {"TP": b"\x89PNG..."}}}),
        "a string value": with_case({"without": {"1": {"TP": "3"}}}),
        "a negative count": with_case({"without": {"1": counts(tn=-1)}}),
        "a Dice above 1": with_case({"without": {"1": {**counts(), "Dice": 1.5}}}),
        "a label step holding other labels": with_case({"with_label_step": {"1": {"1": counts(), "2": counts()}}}),
        "a long case id": {"x" * 1000: good["case_0"]},
        "not a mapping": [good],
    }
    for what, payload in refused.items():
        assert isinstance(reply_holds_only_counts(payload), str), what
    reason = reply_holds_only_counts(refused["a list of voxel values"])
    assert "case 'case_2'" in reason and "'TP'" in reason and "not a voxel count" in reason
    # With the dataset's labels, a label key outside them is refused too.
    assert reply_holds_only_counts(good, [1, 2]) is not None and reply_holds_only_counts(good, [1, 2, (1, 2)]) is None
    assert "not one of" in reply_holds_only_counts({"case": {"without": {"7": counts()}}}, [1, 2])
