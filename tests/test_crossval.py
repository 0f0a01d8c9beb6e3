"""Cross-validation summaries and postprocessing decisions from per-case counts, checked against nnU-Net itself.

Synthetic label maps (2D and 3D, two foreground labels, cases with an empty
reference, predictions with extra small components) are split across
"sites"; each site's counts go through :mod:`flwr_nnunet.nnunet.crossval`, and
the same cases, written as NIfTI into one pooled folder, go through nnU-Net's
``compute_metrics_on_folder`` and ``determine_postprocessing``. The two must
agree: per case, per label, the means, ``foreground_mean``, every
postprocessing verdict, ``postprocessing.json`` and the bytes of
``postprocessing.pkl`` (compared as bytes; no pickle is ever loaded).

nnU-Net runs its work in ``multiprocessing`` spawn pools; most tests here run
the pools' ``starmap`` in-process (:func:`in_process_pools`: the same functions
on the same arguments, minus about 1.5 s of process start per pool); one test
keeps nnU-Net's real pools.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flwr_nnunet.nnunet import crossval
from flwr_nnunet.nnunet.crossval import (
    CountsError,
    candidate_counts,
    case_counts,
    decide_foreground_step,
    decide_label_step,
    decide_postprocessing,
    pooled_and_per_site,
    postprocessing_json,
    summary_from_counts,
    summary_json,
    transpose_candidate_counts,
    write_postprocessing_json,
    write_postprocessing_pkl,
    write_summary_json,
)

FILE_ENDING = ".nii.gz"
LABELS = {"background": 0, "liver": 1, "tumour": 2}
REGIONS = {"background": 0, "whole": [1, 2], "core": 2}
PLANS = {"image_reader_writer": "SimpleITKIO", "label_manager": "LabelManager", "configurations": {}}


# ---------------------------------------------------------------------------------------------------------------------
# nnU-Net on folders


class _InProcessPool:
    """What nnU-Net uses of a ``multiprocessing`` pool, run in this process."""

    def __init__(self, processes: int | None = None) -> None:
        self.processes = processes

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def starmap(self, fn: Any, iterable: Any) -> list:
        return [fn(*args) for args in iterable]


class _InProcessContext:
    Pool = _InProcessPool


class _InProcessMultiprocessing:
    @staticmethod
    def get_context(method: str | None = None) -> _InProcessContext:
        return _InProcessContext()


@contextlib.contextmanager
def in_process_pools() -> Iterator[None]:
    """nnU-Net's evaluation and postprocessing pools run their ``starmap`` in this process."""
    from nnunetv2.evaluation import evaluate_predictions
    from nnunetv2.postprocessing import remove_connected_components

    with (
        mock.patch.object(evaluate_predictions, "multiprocessing", _InProcessMultiprocessing),
        mock.patch.object(remove_connected_components, "multiprocessing", _InProcessMultiprocessing),
    ):
        yield


def dataset_json(labels: Mapping[str, Any]) -> dict:
    result = {"labels": dict(labels), "file_ending": FILE_ENDING, "channel_names": {"0": "CT"}, "numTraining": 0}
    if any(isinstance(v, list) for v in labels.values()):
        result["regions_class_order"] = [1, 2]
    return result


def write_folders(root: Path, references: Mapping[str, np.ndarray], predictions: Mapping[str, np.ndarray]):
    """``root/ref`` and ``root/pred`` with one NIfTI per case (spacing 1), as nnU-Net's folders hold them."""
    folders = root / "ref", root / "pred"
    for folder, arrays in zip(folders, (references, predictions)):
        folder.mkdir(parents=True)
        for case, array in arrays.items():
            sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8)), str(folder / f"{case}{FILE_ENDING}"))
    return folders


def nnunet_summary(ref: Path, pred: Path, labels_or_regions: Sequence, ignore_label: int | None = None) -> dict:
    """nnU-Net's own ``compute_metrics_on_folder`` on the pooled folders (one process), as ``summary.json`` holds it."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    output = pred.parent / "nnunet_summary.json"
    compute_metrics_on_folder(
        str(ref),
        str(pred),
        str(output),
        SimpleITKIO(),
        FILE_ENDING,
        list(labels_or_regions),
        ignore_label=ignore_label,
        num_processes=1,
    )
    return json.loads(output.read_text())


def nnunet_postprocessing(ref: Path, pred: Path, labels: Mapping[str, Any]) -> dict:
    """nnU-Net's own ``determine_postprocessing`` on the pooled folders: its returned kwargs and its JSON file."""
    from nnunetv2.postprocessing.remove_connected_components import determine_postprocessing

    pp_fns, pp_fn_kwargs = determine_postprocessing(
        str(pred), str(ref), dict(PLANS), dataset_json(labels), num_processes=1, keep_postprocessed_files=False
    )
    return {
        "fns": [fn.__name__ for fn in pp_fns],
        "kwargs": pp_fn_kwargs,
        "json": json.loads((pred / "postprocessing.json").read_text()),
        "pkl": (pred / "postprocessing.pkl").read_bytes(),  # bytes only: never unpickled
    }


# ---------------------------------------------------------------------------------------------------------------------
# comparisons


def same_number(a: object, b: object) -> bool:
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def assert_same_means(ours: Mapping, theirs: Mapping, where: str) -> None:
    """``mean`` and ``foreground_mean`` of two summaries with string keys, NaN-aware."""
    assert set(ours["mean"]) == set(theirs["mean"]), where
    for key, values in theirs["mean"].items():
        for metric, value in values.items():
            assert same_number(ours["mean"][key][metric], value), f"{where}: mean[{key}][{metric}]"
    assert set(ours["foreground_mean"]) == set(theirs["foreground_mean"]), where
    for metric, value in theirs["foreground_mean"].items():
        assert same_number(ours["foreground_mean"][metric], value), f"{where}: foreground_mean[{metric}]"


def assert_same_summary(ours: Mapping, theirs: Mapping) -> None:
    """Our summary (in summary.json form) equals nnU-Net's, per case, per label, means and foreground_mean."""
    theirs_per_case = {
        Path(c["prediction_file"]).name.removesuffix(FILE_ENDING): c["metrics"] for c in theirs["metric_per_case"]
    }
    assert [c["case_id"] for c in ours["metric_per_case"]] == list(theirs_per_case)  # nnU-Net's order too
    for case in ours["metric_per_case"]:
        expected = theirs_per_case[case["case_id"]]
        assert set(case["metrics"]) == set(expected)
        for key, metrics in expected.items():
            assert set(case["metrics"][key]) == set(metrics)
            for metric, value in metrics.items():
                assert same_number(case["metrics"][key][metric], value), f"{case['case_id']}: {key} {metric}"
    assert_same_means(ours, theirs, "summary")


def split_into_sites(cases: Sequence[str], assignment: Sequence[int]) -> dict[str, list[str]]:
    sites: dict[str, list[str]] = {}
    for case, site in zip(cases, assignment):
        sites.setdefault(f"site-{site}", []).append(case)
    return sites


# ---------------------------------------------------------------------------------------------------------------------
# synthetic cases


def liver_cases_2d() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """2D cases where keeping the largest foreground component helps, and then liver's step too, tumour's not.

    The tumour is two blobs touching the liver (one foreground component); the
    prediction adds a far liver speck (removed by the foreground step), a liver
    speck touching the tumour (inside the foreground component: only liver's step
    removes it) and, in one case, loses the tumour's smaller blob to tumour's step.
    """
    references, predictions = {}, {}
    for i in range(6):
        ref = np.zeros((40, 44), np.uint8)
        ref[8 + i : 26 + i, 6:24] = 1
        ref[10 + i : 14 + i, 24:28] = 2
        ref[20 + i : 23 + i, 24:28] = 2
        pred = ref.copy()
        pred[10 + i : 13 + i, 28:30] = 1  # touches the tumour
        pred[36:38, 38 + i % 3 : 40 + i % 3] = 1  # far away
        references[f"liver_{i:02d}"], predictions[f"liver_{i:02d}"] = ref, pred
    references["liver_empty"] = np.zeros((40, 44), np.uint8)  # empty reference, empty prediction: NaN Dice
    predictions["liver_empty"] = np.zeros((40, 44), np.uint8)
    ref = np.zeros((40, 44), np.uint8)  # empty reference, a false tumour
    pred = ref.copy()
    pred[5:8, 5:8] = 2
    references["liver_empty_fp"], predictions["liver_empty_fp"] = ref, pred
    return references, predictions


def separate_tumour_cases_3d() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """3D cases where the foreground step raises foreground_mean but a label's mean falls (nnU-Net's veto).

    Liver predictions carry four false specks (liver's step removes them: accepted);
    in one case the tumour lies apart from the liver, so keeping the largest foreground
    component deletes it; in one case the tumour has two true parts (tumour's step: rejected).
    """
    references, predictions = {}, {}
    for i in range(5):
        ref = np.zeros((16, 18, 20), np.uint8)
        ref[2:6, 2:6, 2 + i : 6 + i] = 1
        if i == 0:
            ref[11:13, 12:14, 14:16] = 2  # apart from the liver
        else:
            ref[3:5, 6:8, 3 + i : 5 + i] = 2  # touching it
        if i == 4:
            ref[2:3, 2:4, 6 + i] = 2  # a second, smaller tumour part, also touching the liver
        pred = ref.copy()
        for z in (0, 5, 10, 15):
            pred[13:15, 15:17, z : z + 3] = 1
        references[f"sep_{i}"], predictions[f"sep_{i}"] = ref, pred
    references["sep_empty"], predictions["sep_empty"] = (
        np.zeros((16, 18, 20), np.uint8),
        np.zeros((16, 18, 20), np.uint8),
    )
    return references, predictions


def random_case(
    rng: np.random.Generator, shape: tuple[int, ...], ignore_label: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A random reference of boxes of labels 1 and 2 (maybe empty; maybe a box of the ignore label)
    and a prediction with boxes added and erased (never the ignore label)."""
    ref = np.zeros(shape, np.uint8)
    for _ in range(rng.integers(0, 4)):
        ref[_box(rng, shape, 3, 9)] = rng.integers(1, 3)
    pred = ref.copy()
    for _ in range(rng.integers(0, 5)):
        pred[_box(rng, shape, 1, 4)] = rng.integers(0, 3)
    if ignore_label is not None and rng.random() < 0.7:
        ref[_box(rng, shape, 2, 7)] = ignore_label
    return ref, pred


def _box(rng: np.random.Generator, shape: tuple[int, ...], low: int, high: int) -> tuple[slice, ...]:
    sizes = [int(rng.integers(low, high)) for _ in shape]
    starts = [int(rng.integers(0, n - s + 1)) for n, s in zip(shape, sizes)]
    return tuple(slice(a, a + s) for a, s in zip(starts, sizes))


# ---------------------------------------------------------------------------------------------------------------------
# what the sites send, and what the server decides


def site_counts(
    references: Mapping[str, np.ndarray],
    predictions: Mapping[str, np.ndarray],
    sites: Mapping[str, Sequence[str]],
    labels_or_regions: Sequence,
    ignore_label: int | None = None,
) -> dict[str, dict[str, dict]]:
    """Each site's :func:`case_counts` of its own cases, through JSON (the keys become strings) as a wire would."""
    return {
        site: json.loads(
            json.dumps(
                {
                    case: summary_json_keys(
                        case_counts(references[case], predictions[case], labels_or_regions, ignore_label)
                    )
                    for case in cases
                }
            )
        )
        for site, cases in sites.items()
    }


def summary_json_keys(counts: Mapping) -> dict:
    return {str(k): v for k, v in counts.items()}


def federated_decision(
    references: Mapping[str, np.ndarray],
    predictions: Mapping[str, np.ndarray],
    sites: Mapping[str, Sequence[str]],
    labels_or_regions: Sequence,
    ignore_label: int | None = None,
) -> crossval.PostprocessingDecision:
    """One round: every site sends :func:`candidate_counts` of its cases; the server decides (labels that never overlap)."""
    reports = {}
    for cases in sites.values():
        for case in cases:
            reports[case] = candidate_counts(
                references[case], predictions[case], labels_or_regions, ignore_label=ignore_label
            )
    return decide_postprocessing(
        **transpose_candidate_counts(reports), labels_or_regions=labels_or_regions, file_ending=FILE_ENDING
    )


def stepwise_decision(
    references: Mapping[str, np.ndarray],
    predictions: Mapping[str, np.ndarray],
    labels_or_regions: Sequence,
    ignore_label: int | None = None,
) -> crossval.PostprocessingDecision:
    """The step-by-step protocol for regions that overlap: after each verdict the sites apply the accepted steps.

    Then :func:`decide_postprocessing` is given the counts collected that way and must reach the same verdicts.
    """
    from nnunetv2.postprocessing.remove_connected_components import (
        remove_all_but_largest_component_from_segmentation as keep_largest,
    )

    foreground = [1, 2]

    def counts(segmentations: Mapping[str, np.ndarray]) -> dict:
        return {
            case: case_counts(references[case], seg, labels_or_regions, ignore_label)
            for case, seg in segmentations.items()
        }

    after_foreground = {case: keep_largest(p, labels_or_regions=foreground) for case, p in predictions.items()}
    without, with_foreground = counts(predictions), counts(after_foreground)
    fg = decide_foreground_step(without, with_foreground, labels_or_regions, file_ending=FILE_ENDING)
    current = dict(after_foreground if fg.accepted else predictions)
    current_counts = with_foreground if fg.accepted else without
    label_step_counts = {}
    for r in labels_or_regions:
        stepped = {case: keep_largest(seg, labels_or_regions=r) for case, seg in current.items()}
        label_step_counts[r] = counts(stepped)
        if decide_label_step(current_counts, label_step_counts[r], r, file_ending=FILE_ENDING).accepted:
            current, current_counts = stepped, label_step_counts[r]
    return decide_postprocessing(
        without,
        with_foreground,
        None if fg.accepted else label_step_counts,
        labels_or_regions,
        counts_with_foreground_and_label_step=label_step_counts if fg.accepted else None,
        file_ending=FILE_ENDING,
    )


def assert_same_postprocessing(decision: crossval.PostprocessingDecision, nnunet: dict, tmp: Path) -> None:
    """Verdicts, postprocessing.json and postprocessing.pkl (as bytes) equal nnU-Net's."""
    ours = postprocessing_json(decision)
    assert ours["postprocessing_fns"] == nnunet["fns"] == nnunet["json"]["postprocessing_fns"]
    assert ours["postprocessing_kwargs"] == nnunet["json"]["postprocessing_kwargs"]
    for part in ("input_folder", "postprocessed"):
        assert_same_means(ours[part], nnunet["json"][part], part)
    assert set(ours) == set(nnunet["json"])
    write_postprocessing_pkl(decision, str(tmp / "ours.pkl"))
    assert (tmp / "ours.pkl").read_bytes() == nnunet["pkl"]
    write_postprocessing_json(decision, str(tmp / "ours.json"))
    assert_same_means(
        json.loads((tmp / "ours.json").read_text())["postprocessed"], nnunet["json"]["postprocessed"], "file"
    )


# ---------------------------------------------------------------------------------------------------------------------
# tests against nnU-Net


@pytest.mark.parametrize("pools", ["in-process", pytest.param("spawn", marks=pytest.mark.slow)])
def test_liver_2d_foreground_and_liver_step_accepted_tumour_step_rejected(tmp_path, pools):
    """Three sites; the pooled summary; the decision and its files (once with nnU-Net's real spawn pools)."""
    references, predictions = liver_cases_2d()
    cases = sorted(references)
    sites = split_into_sites(cases, [0, 1, 2, 0, 1, 2, 0, 1])
    per_site = site_counts(references, predictions, sites, [1, 2])
    summaries = pooled_and_per_site(per_site, [1, 2], file_ending=FILE_ENDING)
    pooled = summaries["pooled"]["metric_per_case"]
    assert math.isnan(pooled[cases.index("liver_empty")]["metrics"][1]["Dice"])
    assert pooled[cases.index("liver_empty_fp")]["metrics"][2]["Dice"] == 0.0

    decision = federated_decision(references, predictions, sites, [1, 2])
    assert decision.foreground_step
    assert decision.label_steps == {1: True, 2: False}

    ref, pred = write_folders(tmp_path, references, predictions)
    with in_process_pools() if pools == "in-process" else contextlib.nullcontext():
        assert_same_summary(summary_json(summaries["pooled"]), nnunet_summary(ref, pred, [1, 2]))
        nnunet = nnunet_postprocessing(ref, pred, LABELS)
    assert nnunet["kwargs"] == [{"labels_or_regions": [1, 2]}, {"labels_or_regions": 1}]
    assert_same_postprocessing(decision, nnunet, tmp_path)


def test_site_summaries_equal_nnunet_on_each_sites_folder(tmp_path):
    references, predictions = liver_cases_2d()
    sites = split_into_sites(sorted(references), [0, 0, 1, 1, 1, 0, 1, 0])
    summaries = pooled_and_per_site(
        site_counts(references, predictions, sites, [1, 2]), [1, 2], file_ending=FILE_ENDING
    )
    assert set(summaries) == {"pooled", *sites}
    with in_process_pools():
        for site, cases in sites.items():
            ref, pred = write_folders(
                tmp_path / site, {c: references[c] for c in cases}, {c: predictions[c] for c in cases}
            )
            assert_same_summary(summary_json(summaries[site]), nnunet_summary(ref, pred, [1, 2]))


def test_separate_tumour_3d_foreground_step_vetoed_by_a_label(tmp_path):
    references, predictions = separate_tumour_cases_3d()
    sites = split_into_sites(sorted(references), [0, 1, 0, 1, 0, 1])
    ref, pred = write_folders(tmp_path, references, predictions)
    decision = federated_decision(references, predictions, sites, [1, 2])
    fg = decision.steps[0]
    assert not fg.accepted and fg.dice_after > fg.dice_before  # foreground_mean rose: a label vetoed it
    assert decision.label_steps == {1: True, 2: False}
    with in_process_pools():
        summary = pooled_and_per_site(
            site_counts(references, predictions, sites, [1, 2]), [1, 2], file_ending=FILE_ENDING
        )
        assert_same_summary(summary_json(summary["pooled"]), nnunet_summary(ref, pred, [1, 2]))
        nnunet = nnunet_postprocessing(ref, pred, LABELS)
    assert nnunet["kwargs"] == [{"labels_or_regions": 1}]
    assert_same_postprocessing(decision, nnunet, tmp_path)


def test_overlapping_regions_decided_step_by_step(tmp_path):
    """Regions (1, 2) and 2: each region's step is tried on top of the accepted ones, as nnU-Net does."""
    rng = np.random.default_rng(7)
    references, predictions = {}, {}
    for i in range(6):
        references[f"r{i}"], predictions[f"r{i}"] = random_case(rng, (20, 22))
    regions = [(1, 2), 2]
    ref, pred = write_folders(tmp_path, references, predictions)
    with in_process_pools():
        assert_same_summary(
            summary_json(
                summary_from_counts(
                    site_counts(references, predictions, {"a": list(references)}, regions)["a"],
                    regions,
                    file_ending=FILE_ENDING,
                )
            ),
            nnunet_summary(ref, pred, regions),
        )
        nnunet = nnunet_postprocessing(ref, pred, REGIONS)
    decision = stepwise_decision(references, predictions, regions)
    assert_same_postprocessing(decision, nnunet, tmp_path)
    with pytest.raises(CountsError, match="overlap"):
        candidate_counts(references["r0"], predictions["r0"], regions)


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")  # nnU-Net's nanmean of an all-NaN label
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n_cases=st.integers(2, 6),
    three_d=st.booleans(),
    regions=st.booleans(),
    ignore=st.booleans(),
)
def test_random_cases_match_determine_postprocessing(seed, n_cases, three_d, regions, ignore):
    """Random boxes: summary, verdicts and files equal nnU-Net's, bit for bit.

    Labels are decided in one round (:func:`federated_decision`), overlapping regions
    step by step (:func:`stepwise_decision`); some datasets have an ignore label.
    """
    rng = np.random.default_rng(seed)
    shape = (8, 12, 12) if three_d else (20, 22)
    ignore_label = 3 if ignore else None
    references, predictions = {}, {}
    for i in range(n_cases):
        references[f"c{i}"], predictions[f"c{i}"] = random_case(rng, shape, ignore_label)
    labels_or_regions = [(1, 2), 2] if regions else [1, 2]
    labels = {**(REGIONS if regions else LABELS), **({"ignore": 3} if ignore else {})}
    with tempfile.TemporaryDirectory() as tmp, in_process_pools():
        root = Path(tmp)
        ref, pred = write_folders(root, references, predictions)
        sites = split_into_sites(sorted(references), rng.integers(0, 3, n_cases).tolist())
        per_site = site_counts(references, predictions, sites, labels_or_regions, ignore_label)
        summary = pooled_and_per_site(per_site, labels_or_regions, file_ending=FILE_ENDING)
        assert_same_summary(summary_json(summary["pooled"]), nnunet_summary(ref, pred, labels_or_regions, ignore_label))
        nnunet = nnunet_postprocessing(ref, pred, labels)
        if regions:
            decision = stepwise_decision(references, predictions, labels_or_regions, ignore_label)
        else:
            decision = federated_decision(references, predictions, sites, labels_or_regions, ignore_label)
        assert_same_postprocessing(decision, nnunet, root)


# ---------------------------------------------------------------------------------------------------------------------
# properties of the counts alone


def _counts_strategy() -> st.SearchStrategy:
    count = st.integers(0, 50)
    entry = st.fixed_dictionaries({"TP": count, "FP": count, "FN": count, "TN": st.integers(0, 500)})
    return st.dictionaries(
        st.text("abc_0123", min_size=1, max_size=6),
        st.fixed_dictionaries({1: entry, 2: entry}),
        min_size=1,
        max_size=12,
    )


@settings(max_examples=60, deadline=None)
@given(per_case=_counts_strategy(), data=st.data())
def test_any_split_across_sites_gives_the_same_pooled_summary(per_case, data):
    cases = list(per_case)
    assignment = data.draw(st.lists(st.integers(0, 3), min_size=len(cases), max_size=len(cases)))
    order = data.draw(st.permutations(cases))
    sites: dict[str, dict] = {}
    for case in order:
        sites.setdefault(f"site-{assignment[cases.index(case)]}", {})[case] = per_case[case]
    ours = pooled_and_per_site(sites, [1, 2])["pooled"]
    expected = summary_from_counts(per_case, [1, 2])
    assert json.dumps(summary_json(ours), sort_keys=True) == json.dumps(summary_json(expected), sort_keys=True)


def test_summary_json_round_trips_through_nnunets_writer(tmp_path):
    from nnunetv2.evaluation.evaluate_predictions import load_summary_json

    references, predictions = liver_cases_2d()
    per_case = {c: case_counts(references[c], predictions[c], [1, (1, 2)]) for c in references}
    summary = summary_from_counts(per_case, [1, (1, 2)], file_ending=FILE_ENDING)
    write_summary_json(summary, str(tmp_path / "summary.json"))
    assert json.loads((tmp_path / "summary.json").read_text())["mean"].keys() == {"1", "(1, 2)"}
    loaded = load_summary_json(str(tmp_path / "summary.json"))
    assert loaded["mean"].keys() == {1, (1, 2)}
    assert_same_means(summary_json(loaded), summary_json(summary), "round trip")


def test_foreground_mean_is_nan_when_a_label_is_nan_in_every_case():
    per_case = {
        "a": {1: {"TP": 5, "FP": 1, "FN": 0, "TN": 10}, 2: {"TP": 0, "FP": 0, "FN": 0, "TN": 16}},
        "b": {1: {"TP": 0, "FP": 0, "FN": 0, "TN": 16}, 2: {"TP": 0, "FP": 0, "FN": 0, "TN": 16}},
    }
    summary = summary_from_counts(per_case, [1, 2])
    assert summary["mean"][1]["Dice"] == pytest.approx(10 / 11)  # nanmean skips case b
    assert math.isnan(summary["mean"][2]["Dice"])
    assert math.isnan(summary["foreground_mean"]["Dice"])  # np.mean, not nanmean, over the labels
    assert summary["foreground_mean"]["TN"] == pytest.approx((13 + 16) / 2)


def test_background_is_left_out_of_foreground_mean():
    per_case = {"a": {0: {"TP": 10, "FP": 0, "FN": 0, "TN": 6}, 1: {"TP": 1, "FP": 1, "FN": 0, "TN": 14}}}
    summary = summary_from_counts(per_case, [0, 1])
    assert summary["foreground_mean"]["Dice"] == summary["mean"][1]["Dice"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------------------------------
# errors


def _one(tp=1, fp=0, fn=0, tn=3):
    return {"TP": tp, "FP": fp, "FN": fn, "TN": tn}


def test_errors_name_what_is_wrong():
    with pytest.raises(CountsError, match="both 'x' and 'y'"):
        pooled_and_per_site({"x": {"c": {1: _one()}}, "y": {"c": {1: _one()}}}, [1])
    with pytest.raises(CountsError, match="named 'pooled'"):
        pooled_and_per_site({"pooled": {"c": {1: _one()}}}, [1])
    with pytest.raises(CountsError, match="no counts for 2"):
        summary_from_counts({"c": {1: _one()}}, [1, 2])
    with pytest.raises(CountsError, match=r"lacks \['TN'\]"):
        summary_from_counts({"c": {1: {"TP": 1, "FP": 0, "FN": 0}}}, [1])
    with pytest.raises(CountsError, match="n_pred=5 but its counts give 1"):
        summary_from_counts({"c": {1: {**_one(), "n_pred": 5}}}, [1])
    with pytest.raises(CountsError, match="cannot be negative"):
        summary_from_counts({"c": {1: _one(tp=-1)}}, [1])
    with pytest.raises(CountsError, match="no cases"):
        summary_from_counts({}, [1])
    with pytest.raises(CountsError, match="differ in shape"):
        case_counts(np.zeros((2, 2)), np.zeros((2, 3)), [1])
    with pytest.raises(CountsError, match="background"):
        decide_postprocessing({"c": {0: _one()}}, {"c": {0: _one()}}, None, [0])


def test_decision_asks_for_the_counts_its_foreground_verdict_needs():
    without = {"c": {1: _one(fp=2, tn=1), 2: _one()}}
    with_fg = {"c": {1: _one(), 2: _one()}}  # the foreground step removed liver's false positives: accepted
    with pytest.raises(CountsError, match="pass counts_with_foreground_and_label_step"):
        decide_postprocessing(without, with_fg, {1: with_fg, 2: with_fg}, [1, 2])
    decision = decide_postprocessing(
        without, with_fg, None, [1, 2], counts_with_foreground_and_label_step={1: with_fg, 2: with_fg}
    )
    assert decision.foreground_step and decision.label_steps == {1: False, 2: False}
    grown = {"c": {1: _one(fp=3, tn=0), 2: _one()}}
    with pytest.raises(CountsError, match="more predicted voxels"):
        decide_postprocessing(
            without, with_fg, None, [1, 2], counts_with_foreground_and_label_step={1: grown, 2: with_fg}
        )
    other_reference = {"c": {1: _one(fn=1, tn=2), 2: _one()}}
    with pytest.raises(CountsError, match="the reference differs"):
        decide_postprocessing(without, other_reference, None, [1, 2])
    other_case = {"d": {1: _one(), 2: _one()}}
    with pytest.raises(CountsError, match="other cases"):
        decide_postprocessing(without, other_case, None, [1, 2])
