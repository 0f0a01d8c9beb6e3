"""nnU-Net's cross-validation summary and postprocessing decision, from per-case voxel counts only.

nnU-Net scores a configuration by evaluating the pooled validation predictions
of its folds (``nnunetv2/evaluation/evaluate_predictions.py``:
``compute_metrics_on_folder`` writes ``summary.json``) and then decides its
postprocessing (``nnunetv2/postprocessing/remove_connected_components.py``:
``determine_postprocessing`` writes ``postprocessing.pkl`` and
``postprocessing.json``). Both need only, per case and per label (or region),
the voxel counts TP, FP, FN and TN. In a federation each site computes those
counts on its own validation cases and sends them; the server computes here,
from the counts alone, what nnU-Net computes from the pooled prediction folder.

What a site computes (one validation case, its reference and prediction as
nnU-Net's reader returns them):

- :func:`case_counts`: the counts of the prediction (all that the summary needs);
- :func:`candidate_counts`: the counts with and without each candidate
  postprocessing step, as :func:`decide_postprocessing` needs them (see there for
  exactly which counts, and why).

What the server computes:

- :func:`summary_from_counts` / :func:`pooled_and_per_site`: ``summary.json``'s
  content (:func:`summary_json` gives its on-disk form, :func:`write_summary_json`
  writes it with nnU-Net's own writer);
- :func:`decide_postprocessing` (built from :func:`decide_foreground_step` and
  :func:`decide_label_step`): ``determine_postprocessing``'s decisions;
  :func:`postprocessing_json` and :func:`write_postprocessing_pkl` give the two
  files it writes.

nnU-Net's conventions are kept exactly: Dice and IoU are NaN for a label absent
from both reference and prediction; per-label means skip NaN (``np.nanmean``), but
``foreground_mean`` does not (``np.mean`` over the per-label means, so one label
that is NaN in every case makes it NaN); postprocessing steps are accepted only on
a strict improvement. Only numpy is imported at module level; nnU-Net's functions
are imported where a site-side or file-writing function needs them.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from flwr_nnunet.errors import FlwrNnUNetError

__all__ = [
    "COUNT_FIELDS",
    "METRICS",
    "POSTPROCESSING_FUNCTION",
    "CountsError",
    "LabelOrRegion",
    "PostprocessingDecision",
    "PostprocessingStep",
    "candidate_counts",
    "case_counts",
    "decide_foreground_step",
    "decide_label_step",
    "decide_postprocessing",
    "pooled_and_per_site",
    "postprocessing_json",
    "postprocessing_steps",
    "summary_from_counts",
    "summary_json",
    "transpose_candidate_counts",
    "write_postprocessing_json",
    "write_postprocessing_pkl",
    "write_summary_json",
]

LabelOrRegion = int | tuple[int, ...]
"""A label (``1``) or a region (``(1, 2)``: the union of those labels), as nnU-Net's label manager lists them."""

COUNT_FIELDS = ("TP", "FP", "FN", "TN")
"""The voxel counts a site sends per case and label or region (``n_pred``/``n_ref`` follow from them)."""

METRICS = ("Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref")
"""The per-case metrics of ``summary.json``, in the order ``compute_metrics`` inserts them."""

POSTPROCESSING_FUNCTION = "remove_all_but_largest_component_from_segmentation"
"""The name of nnU-Net's only postprocessing function (``nnunetv2.postprocessing.remove_connected_components``)."""

POOLED = "pooled"
"""The key of the pooled summary in :func:`pooled_and_per_site`."""

PerCase = Mapping[str, Mapping[Any, Mapping[str, Any]]]
"""``{case id: {label or region: {"TP": n, "FP": n, "FN": n, "TN": n, ...}}}``."""


class CountsError(FlwrNnUNetError, ValueError):
    """Per-case counts are missing, malformed, or inconsistent with each other."""


# ---------------------------------------------------------------------------------------------------------------------
# labels and regions


def _label_or_region(value: object) -> LabelOrRegion:
    """``value`` as nnU-Net names a label or region: an ``int`` or a tuple of ``int``.

    Accepts numpy integers, lists, and the string keys of nnU-Net's JSON files
    (``label_or_region_to_key``: ``"1"``, ``"(1, 2)"``), as ``key_to_label_or_region`` reads them back.
    """
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            parts = [p.strip() for p in text.replace("(", "").replace(")", "").split(",")]
            try:
                return tuple(int(p) for p in parts if p)
            except ValueError:
                raise CountsError(f"{value!r} names no label or region (expected '1' or '(1, 2)')") from None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if (
        isinstance(value, (tuple, list))
        and value
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
    ):
        return tuple(int(v) for v in value)
    raise CountsError(f"{value!r} is not a label (an int) or a region (a non-empty tuple of ints)")


def _labels_or_regions(values: Sequence[object], what: str = "labels_or_regions") -> tuple[LabelOrRegion, ...]:
    """The normalised, non-empty, duplicate-free list of labels or regions."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise CountsError(f"{what} must be a list of labels or regions (e.g. [1, 2] or [(1, 2), (2,)]), got {values!r}")
    result = tuple(_label_or_region(v) for v in values)
    if not result:
        raise CountsError(f"{what} is empty: pass the dataset's foreground labels or regions")
    duplicates = sorted({str(r) for r in result if result.count(r) > 1})
    if duplicates:
        raise CountsError(f"{what} lists {', '.join(duplicates)} more than once")
    return result


def _label_set(label_or_region: LabelOrRegion) -> frozenset[int]:
    """The labels a label or region covers."""
    return frozenset(label_or_region) if isinstance(label_or_region, tuple) else frozenset((label_or_region,))


def _disjoint(labels_or_regions: Sequence[LabelOrRegion]) -> bool:
    """Whether no two entries share a label (plain labels; or regions that never overlap)."""
    seen: set[int] = set()
    for r in labels_or_regions:
        labels = _label_set(r)
        if labels & seen:
            return False
        seen |= labels
    return True


def _is_background(label_or_region: LabelOrRegion) -> bool:
    """nnU-Net's ``LabelManager.filter_background``: the label 0, or a region of only 0."""
    return _label_set(label_or_region) == frozenset((0,))


def _key(label_or_region: LabelOrRegion) -> str:
    """nnU-Net's ``label_or_region_to_key``: ``str(label_or_region)``."""
    return str(label_or_region)


# ---------------------------------------------------------------------------------------------------------------------
# what a site computes


def case_counts(
    reference: np.ndarray,
    prediction: np.ndarray,
    labels_or_regions: Sequence[LabelOrRegion],
    ignore_label: int | None = None,
) -> dict[LabelOrRegion, dict[str, int]]:
    """Voxel counts of one case, per label or region: what a site sends for the summary.

    Mirrors ``nnunetv2.evaluation.evaluate_predictions.compute_metrics`` and uses its
    own helpers (``region_or_label_to_mask``, ``compute_tp_fp_fn_tn``): a region's mask
    is the union of its labels, and voxels whose *reference* holds ``ignore_label`` are
    counted nowhere.

    Parameters
    ----------
    reference, prediction
        Label maps of one case, of one shape (2D or 3D; nnU-Net's reader adds a leading
        axis of size 1, which changes nothing here).
    labels_or_regions
        The labels (``LabelManager.foreground_labels``) or regions (``foreground_regions``) to count.
    ignore_label
        The dataset's ignore label (``LabelManager.ignore_label``), or None.

    Returns
    -------
    dict
        ``{label or region: {"FP", "TP", "FN", "TN", "n_pred", "n_ref"}}`` as Python ints
        (``n_pred = TP + FP``, ``n_ref = TP + FN``). Dice is not sent: the summary
        computes it (NaN when ``TP + FP + FN == 0``, as ``compute_metrics`` does).

    Raises
    ------
    CountsError
        If the two maps differ in shape, or ``labels_or_regions`` is malformed.
    """
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn, region_or_label_to_mask

    reference, prediction = np.asarray(reference), np.asarray(prediction)
    if reference.shape != prediction.shape:
        raise CountsError(
            f"reference {reference.shape} and prediction {prediction.shape} differ in shape: "
            "pass one case's reference and prediction, as nnU-Net's reader returns them"
        )
    labels = _labels_or_regions(labels_or_regions)
    ignore_mask = reference == ignore_label if ignore_label is not None else None
    counts = {}
    for r in labels:
        tp, fp, fn, tn = (
            int(n)
            for n in compute_tp_fp_fn_tn(
                region_or_label_to_mask(reference, r), region_or_label_to_mask(prediction, r), ignore_mask
            )
        )
        counts[r] = {"FP": fp, "TP": tp, "FN": fn, "TN": tn, "n_pred": fp + tp, "n_ref": fn + tp}
    return counts


def _foreground_labels(
    labels_or_regions: Sequence[LabelOrRegion], foreground_labels: Sequence[int] | None
) -> tuple[int, ...]:
    """The labels of the foreground step: given, or the labels the entries cover, without 0 (sorted)."""
    if foreground_labels is not None:
        labels = _labels_or_regions(foreground_labels, "foreground_labels")
        if any(isinstance(label, tuple) for label in labels):
            raise CountsError(f"foreground_labels must be plain labels (LabelManager.foreground_labels), got {labels}")
        return labels  # type: ignore[return-value]
    covered = set().union(*(_label_set(r) for r in labels_or_regions)) - {0}
    return tuple(sorted(covered))


def candidate_counts(
    reference: np.ndarray,
    prediction: np.ndarray,
    labels_or_regions: Sequence[LabelOrRegion],
    *,
    foreground_labels: Sequence[int] | None = None,
    ignore_label: int | None = None,
) -> dict[str, Any]:
    """Everything one case contributes to :func:`decide_postprocessing`, in one pass (labels that never overlap).

    Applies nnU-Net's own ``remove_all_but_largest_component_from_segmentation`` (the
    step ``determine_postprocessing`` tries) to the prediction and counts with
    :func:`case_counts`:

    - ``"without"``: the prediction as it is (all labels);
    - ``"with_foreground_step"``: after keeping the largest component of the whole
      foreground (``foreground_labels``) (all labels);
    - ``"with_label_step"``: per label ``l``, after keeping the largest component of
      ``l`` in the prediction (only ``l``'s counts);
    - ``"with_foreground_and_label_step"``: per label ``l``, after the foreground step
      and then ``l``'s step (only ``l``'s counts).

    nnU-Net evaluates each label's step on the foreground step's result when it
    accepted that step, and on top of the label steps it accepted before; the site
    does not know those decisions yet, so it sends both variants. Earlier label steps
    do not matter: removing components of one label never changes another label's
    mask. With one label or region nnU-Net tries no label step and both per-label
    entries are empty.

    Parameters
    ----------
    reference, prediction
        One case's label maps, as nnU-Net's reader returns them (connected components
        are found with full connectivity over the array's axes, as nnU-Net does).
    labels_or_regions
        The foreground labels, or regions that share no label.
    foreground_labels
        ``LabelManager.foreground_labels`` (the foreground step's labels); by default the labels
        ``labels_or_regions`` cover.
    ignore_label
        The dataset's ignore label, or None.

    Raises
    ------
    CountsError
        If two regions share a label: nnU-Net then evaluates each region's step on top of
        the earlier accepted ones, so the counts depend on decisions the site cannot know
        in advance. Decide step by step instead (:func:`decide_foreground_step`, then
        :func:`decide_label_step` per region, the site applying the accepted steps with
        ``remove_all_but_largest_component_from_segmentation`` before counting).
    """
    from nnunetv2.postprocessing.remove_connected_components import (
        remove_all_but_largest_component_from_segmentation as keep_largest,
    )

    labels = _labels_or_regions(labels_or_regions)
    if not _disjoint(labels):
        raise CountsError(
            f"regions {list(labels)} overlap: nnU-Net evaluates each region's step on top of the accepted "
            "earlier ones, so counts cannot be computed before those decisions; decide step by step "
            "(decide_foreground_step, then decide_label_step per region)"
        )
    foreground = _foreground_labels(labels, foreground_labels)
    prediction = np.asarray(prediction)
    after_foreground = keep_largest(prediction, labels_or_regions=list(foreground))
    report: dict[str, Any] = {
        "without": case_counts(reference, prediction, labels, ignore_label),
        "with_foreground_step": case_counts(reference, after_foreground, labels, ignore_label),
        "with_label_step": {},
        "with_foreground_and_label_step": {},
    }
    if len(labels) > 1:  # determine_postprocessing tries label steps only then
        for r in labels:
            report["with_label_step"][r] = case_counts(reference, keep_largest(prediction, r), [r], ignore_label)
            report["with_foreground_and_label_step"][r] = case_counts(
                reference, keep_largest(after_foreground, r), [r], ignore_label
            )
    return report


def transpose_candidate_counts(per_case: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per-case :func:`candidate_counts` reports as :func:`decide_postprocessing`'s keyword arguments.

    Returns
    -------
    dict
        ``counts_without``, ``counts_with_foreground_step``: ``{case: counts}``;
        ``counts_with_label_step``, ``counts_with_foreground_and_label_step``:
        ``{label: {case: counts}}``.
    """
    fields = ("without", "with_foreground_step", "with_label_step", "with_foreground_and_label_step")
    for case, report in per_case.items():
        missing = [f for f in fields if not isinstance(report, Mapping) or f not in report]
        if missing:
            raise CountsError(f"case {case!r}: its candidate counts lack {missing}; compute them with candidate_counts")
    label_steps: dict[str, dict[LabelOrRegion, dict[str, Any]]] = {
        "with_label_step": {},
        "with_foreground_and_label_step": {},
    }
    for case, report in per_case.items():
        for field, by_label in label_steps.items():
            for r, counts in report[field].items():
                by_label.setdefault(_label_or_region(r), {})[case] = counts
    return {
        "counts_without": {case: report["without"] for case, report in per_case.items()},
        "counts_with_foreground_step": {case: report["with_foreground_step"] for case, report in per_case.items()},
        "counts_with_label_step": label_steps["with_label_step"],
        "counts_with_foreground_and_label_step": label_steps["with_foreground_and_label_step"],
    }


# ---------------------------------------------------------------------------------------------------------------------
# summaries


def _count(value: object, where: str) -> int:
    """One voxel count as an int (integral floats are accepted: a transport may have turned ints into floats)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CountsError(f"{where} is {value!r}, not a voxel count")
    if isinstance(value, numbers.Integral):
        number = int(value)
    elif math.isfinite(float(value)) and float(value).is_integer():
        number = int(float(value))
    else:
        raise CountsError(f"{where} is {value!r}, not a whole number of voxels")
    if number < 0:
        raise CountsError(f"{where} is {number}: voxel counts cannot be negative")
    return number


def _entry(counts: Mapping[Any, Any], r: LabelOrRegion, where: str) -> Mapping[str, Any]:
    """The counts of ``r`` in one case's counts, keyed by the label/region itself or its JSON key."""
    if not isinstance(counts, Mapping):
        raise CountsError(f"{where} is {type(counts).__name__}, not a mapping of label or region to counts")
    for key in (r, _key(r)):
        if key in counts:
            return counts[key]
    for key in counts:  # numpy ints, lists, other spellings of the same key
        try:
            if _label_or_region(key) == r:
                return counts[key]
        except CountsError:
            continue
    raise CountsError(
        f"{where} has no counts for {r!r} (it has {sorted(map(str, counts))}): "
        "every case must be counted for every label or region, with case_counts"
    )


def _tp_fp_fn_tn(counts: Mapping[Any, Any], r: LabelOrRegion, where: str) -> tuple[int, int, int, int]:
    """``(TP, FP, FN, TN)`` of ``r`` in one case's counts, checked (``n_pred``/``n_ref`` must agree if present)."""
    entry = _entry(counts, r, where)
    if not isinstance(entry, Mapping):
        raise CountsError(f"{where}[{r!r}] is {type(entry).__name__}, not a mapping with {list(COUNT_FIELDS)}")
    missing = [f for f in COUNT_FIELDS if f not in entry]
    if missing:
        raise CountsError(f"{where}[{r!r}] lacks {missing}: send TP, FP, FN and TN as case_counts returns them")
    tp, fp, fn, tn = (_count(entry[f], f"{where}[{r!r}][{f!r}]") for f in COUNT_FIELDS)
    for field, expected in (("n_pred", tp + fp), ("n_ref", tp + fn)):
        if field in entry and _count(entry[field], f"{where}[{r!r}][{field!r}]") != expected:
            raise CountsError(f"{where}[{r!r}]: {field}={entry[field]} but its counts give {expected}")
    return tp, fp, fn, tn


def _case_metrics(tp: int, fp: int, fn: int, tn: int) -> dict[str, float | int]:
    """One case's metrics for one label or region, as ``compute_metrics`` computes them."""
    metrics: dict[str, float | int] = {}
    if tp + fp + fn == 0:
        metrics["Dice"] = math.nan
        metrics["IoU"] = math.nan
    else:
        metrics["Dice"] = 2 * tp / (2 * tp + fp + fn)
        metrics["IoU"] = tp / (tp + fp + fn)
    metrics.update(FP=fp, TP=tp, FN=fn, TN=tn, n_pred=fp + tp, n_ref=fn + tp)
    return metrics


def _case_order(case_ids: Sequence[str], file_ending: str) -> list[str]:
    """Cases in the order ``compute_metrics_on_folder`` evaluates them: sorted file names (``subfiles``)."""
    bad = [c for c in case_ids if not isinstance(c, str)]
    if bad:
        raise CountsError(f"case ids must be strings (nnU-Net's case identifiers), got {bad[:3]}")
    return sorted(case_ids, key=lambda case: case + file_ending)


def _means(
    metric_per_case: Sequence[Mapping[str, Any]], labels: Sequence[LabelOrRegion]
) -> tuple[dict[LabelOrRegion, dict[str, float]], dict[str, float]]:
    """``compute_metrics_on_folder``'s ``mean`` (``np.nanmean`` over cases) and ``foreground_mean``.

    ``foreground_mean`` is ``np.mean`` (not nanmean) over the per-label means of every
    entry except the label 0 (``k == 0 or k == '0'``, exactly nnU-Net's test).
    """
    means: dict[LabelOrRegion, dict[str, float]] = {}
    with warnings.catch_warnings():  # nanmean / mean of nothing but NaN: NaN, as in nnU-Net, without its warning
        warnings.simplefilter("ignore", RuntimeWarning)
        for r in labels:
            means[r] = {m: float(np.nanmean([case["metrics"][r][m] for case in metric_per_case])) for m in METRICS}
        foreground_mean = {m: float(np.mean([means[k][m] for k in means if not (k == 0 or k == "0")])) for m in METRICS}
    return means, foreground_mean


def summary_from_counts(
    per_case: PerCase, labels_or_regions: Sequence[LabelOrRegion], *, file_ending: str = ""
) -> dict[str, Any]:
    """``summary.json``'s content for these cases, from their counts.

    Mirrors ``nnunetv2.evaluation.evaluate_predictions.compute_metrics_on_folder`` (what it
    returns, after its ``recursive_fix_for_json_export``): for the union of the sites'
    cases this equals what nnU-Net computes on the pooled prediction folder, bit for bit
    when ``file_ending`` is the dataset's (the order of the means' sums is then the same).

    Parameters
    ----------
    per_case
        ``{case id: {label or region: {"TP", "FP", "FN", "TN", ...}}}`` (each as
        :func:`case_counts` returns it; JSON keys such as ``"1"`` or ``"(1, 2)"`` work too).
    labels_or_regions
        The labels or regions to summarise, in the dataset's order (as passed to nnU-Net).
    file_ending
        The dataset's file ending (``".nii.gz"``): cases are listed in the order of their
        file names, as nnU-Net lists them; it matters only for ids where one is a prefix
        of another.

    Returns
    -------
    dict
        ``{"metric_per_case": [{"case_id", "metrics": {r: {Dice, IoU, FP, TP, FN, TN, n_pred, n_ref}}}],
        "mean": {r: {metric: value}}, "foreground_mean": {metric: value}}``, keyed by the
        labels or regions themselves as ``compute_metrics_on_folder`` returns it (see
        :func:`summary_json` for the file's string keys). Each case names itself with
        ``case_id`` instead of nnU-Net's ``reference_file`` / ``prediction_file`` paths.

    Raises
    ------
    CountsError
        If there are no cases, or a case lacks or garbles a label's counts.
    """
    labels = _labels_or_regions(labels_or_regions)
    if not isinstance(per_case, Mapping) or not per_case:
        raise CountsError("no cases to summarise: pass {case id: case_counts(...)} for at least one case")
    metric_per_case = []
    for case in _case_order(list(per_case), file_ending):
        metrics = {r: _case_metrics(*_tp_fp_fn_tn(per_case[case], r, f"case {case!r}")) for r in labels}
        metric_per_case.append({"case_id": case, "metrics": metrics})
    means, foreground_mean = _means(metric_per_case, labels)
    return {"metric_per_case": metric_per_case, "mean": means, "foreground_mean": foreground_mean}


def pooled_and_per_site(
    per_site: Mapping[str, PerCase], labels_or_regions: Sequence[LabelOrRegion], *, file_ending: str = ""
) -> dict[str, dict[str, Any]]:
    """The pooled summary of every site's cases, and each site's own.

    Parameters
    ----------
    per_site
        ``{site name: {case id: counts}}``; a case id may appear at one site only.
    labels_or_regions, file_ending
        As for :func:`summary_from_counts`.

    Returns
    -------
    dict
        ``{"pooled": summary of all cases, site: summary of its cases, ...}``.

    Raises
    ------
    CountsError
        If a site is named ``"pooled"``, has no cases, or two sites send the same case id.
    """
    if POOLED in per_site:
        raise CountsError(f"a site is named {POOLED!r}, the key of the pooled summary: rename that site")
    pooled: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for site, cases in per_site.items():
        if not isinstance(cases, Mapping) or not cases:
            raise CountsError(f"site {site!r} sent no cases: leave it out or send its case counts")
        for case, counts in cases.items():
            if case in owner:
                raise CountsError(
                    f"case {case!r} comes from both {owner[case]!r} and {site!r}: case ids must be unique "
                    "across the federation (prefix them with the site's name)"
                )
            owner[case] = site
            pooled[case] = counts
    summaries = {POOLED: summary_from_counts(pooled, labels_or_regions, file_ending=file_ending)}
    for site, cases in per_site.items():
        summaries[site] = summary_from_counts(cases, labels_or_regions, file_ending=file_ending)
    return summaries


def summary_json(summary: Mapping[str, Any]) -> dict[str, Any]:
    """``summary.json`` as nnU-Net writes it: labels and regions as string keys.

    Mirrors the key conversion of ``nnunetv2.evaluation.evaluate_predictions.save_summary_json``
    (``label_or_region_to_key``: ``str(1) == "1"``, ``str((1, 2)) == "(1, 2)"``).
    """
    result = copy.deepcopy(dict(summary))
    result["mean"] = {_key(r): values for r, values in result["mean"].items()}
    for case in result["metric_per_case"]:
        case["metrics"] = {_key(r): values for r, values in case["metrics"].items()}
    return result


def write_summary_json(summary: Mapping[str, Any], path: str) -> None:
    """Write ``summary.json`` with nnU-Net's own ``save_summary_json`` (sorted keys, NaN as ``NaN``)."""
    from nnunetv2.evaluation.evaluate_predictions import save_summary_json

    save_summary_json(copy.deepcopy(dict(summary)), str(path))


# ---------------------------------------------------------------------------------------------------------------------
# postprocessing


@dataclass(frozen=True)
class PostprocessingStep:
    """One step ``determine_postprocessing`` tried, and its verdict.

    Attributes
    ----------
    target
        The step's ``labels_or_regions`` keyword: the foreground labels (a tuple; nnU-Net
        passes a list) for the foreground step, else the one label or region.
    is_foreground_step
        Whether this is "keep the largest component of the whole foreground".
    accepted
        nnU-Net's verdict.
    dice_before, dice_after
        What the verdict compared: ``foreground_mean`` Dice (foreground step) or the label's
        mean Dice (label step), before and after the step.
    """

    target: LabelOrRegion
    is_foreground_step: bool
    accepted: bool
    dice_before: float
    dice_after: float

    def kwargs(self) -> dict[str, Any]:
        """The step's keyword arguments as ``postprocessing.json`` lists them (JSON types)."""
        if self.is_foreground_step or isinstance(self.target, tuple):
            return {"labels_or_regions": list(self.target)}  # type: ignore[arg-type]
        return {"labels_or_regions": self.target}


@dataclass(frozen=True)
class PostprocessingDecision:
    """What ``determine_postprocessing`` decides, and the summaries around it.

    Attributes
    ----------
    labels_or_regions
        The labels or regions evaluated.
    foreground_labels
        The labels of the foreground step.
    steps
        Every step tried, in nnU-Net's order: the foreground step, then (with more than one
        label or region) one step per label or region.
    before
        The summary of the predictions as they are (``postprocessing.json``'s ``input_folder``).
    after
        The summary after the accepted steps (``postprocessing.json``'s ``postprocessed``).
    """

    labels_or_regions: tuple[LabelOrRegion, ...]
    foreground_labels: tuple[int, ...]
    steps: tuple[PostprocessingStep, ...]
    before: dict[str, Any]
    after: dict[str, Any]

    @property
    def foreground_step(self) -> bool:
        """Whether keeping the largest foreground component was accepted."""
        return self.steps[0].accepted

    @property
    def label_steps(self) -> dict[LabelOrRegion, bool]:
        """``{label or region: accepted}`` for the per-label steps (empty with one label or region)."""
        return {step.target: step.accepted for step in self.steps[1:]}

    @property
    def accepted_steps(self) -> tuple[PostprocessingStep, ...]:
        """The steps to apply, in order (``postprocessing.pkl``'s content)."""
        return tuple(step for step in self.steps if step.accepted)


def _foreground_verdict(before: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
    """``determine_postprocessing``'s rule for the foreground step, on two summaries.

    Accepted when ``foreground_mean`` Dice rises strictly, unless any label's or region's
    mean Dice falls (``<``; NaN compares false on both counts, so a NaN
    ``foreground_mean`` rejects and a NaN label mean vetoes nothing).
    """
    accepted = after["foreground_mean"]["Dice"] > before["foreground_mean"]["Dice"]
    if accepted:
        for r in after["mean"]:
            if after["mean"][r]["Dice"] < before["mean"][r]["Dice"]:
                return False
    return bool(accepted)


def _label_verdict(before: Mapping[str, Any], after: Mapping[str, Any], r: LabelOrRegion) -> bool:
    """``determine_postprocessing``'s rule for one label's step: its mean Dice rises strictly."""
    return bool(after["mean"][r]["Dice"] > before["mean"][r]["Dice"])


def _same_cases(
    reference: Mapping[str, Any], other: Mapping[str, Any], what: str, against: str = "counts_without"
) -> None:
    """Raise unless ``other`` (named ``what``) holds counts for exactly the cases of ``reference`` (``against``)."""
    if not isinstance(other, Mapping):
        raise CountsError(f"{what} is {type(other).__name__}, not {{case id: counts}}")
    missing = sorted(set(reference) - set(other))
    unknown = sorted(set(other) - set(reference))
    if missing or unknown:
        raise CountsError(
            f"{what} covers other cases than {against} (missing {missing[:3]}, unknown {unknown[:3]}): "
            "every candidate must be counted on every validation case"
        )


def _check_removal(base: PerCase, stepped: PerCase, labels: Sequence[LabelOrRegion], what: str, base_what: str) -> None:
    """Raise unless ``stepped`` could come from ``base`` by removing predicted voxels.

    The reference and its ignore mask do not change (``n_ref`` and the voxel total are
    equal); predictions only shrink (``n_pred`` and ``TP`` do not grow).
    """
    for case in base:
        for r in labels:
            tp0, fp0, fn0, tn0 = _tp_fp_fn_tn(base[case], r, f"{base_what}, case {case!r}")
            tp1, fp1, fn1, tn1 = _tp_fp_fn_tn(stepped[case], r, f"{what}, case {case!r}")
            if tp0 + fn0 != tp1 + fn1 or tp0 + fp0 + fn0 + tn0 != tp1 + fp1 + fn1 + tn1:
                raise CountsError(
                    f"{what}, case {case!r}, {r!r}: the reference differs from {base_what}'s (n_ref {tp1 + fn1} "
                    f"vs {tp0 + fn0}, voxels counted {tp1 + fp1 + fn1 + tn1} vs {tp0 + fp0 + fn0 + tn0}): "
                    "both must count the same case against the same reference and ignore mask"
                )
            if tp1 > tp0 or tp1 + fp1 > tp0 + fp0:
                raise CountsError(
                    f"{what}, case {case!r}, {r!r}: more predicted voxels than {base_what} "
                    f"(n_pred {tp1 + fp1} vs {tp0 + fp0}), but keeping the largest component only removes voxels: "
                    f"were the counts computed on the right segmentation?"
                )


def decide_foreground_step(
    counts_without: PerCase,
    counts_with_foreground_step: PerCase,
    labels_or_regions: Sequence[LabelOrRegion],
    *,
    foreground_labels: Sequence[int] | None = None,
    file_ending: str = "",
) -> PostprocessingStep:
    """Whether nnU-Net keeps only the largest connected component of the whole foreground.

    Mirrors the first half of ``nnunetv2.postprocessing.remove_connected_components.determine_postprocessing``:
    accepted when the pooled ``foreground_mean`` Dice rises strictly and no label's (or
    region's) mean Dice falls.

    Parameters
    ----------
    counts_without
        ``{case: case_counts(reference, prediction)}``.
    counts_with_foreground_step
        ``{case: case_counts(reference, remove_all_but_largest_component_from_segmentation(prediction,
        foreground_labels))}``, every label or region.
    labels_or_regions, foreground_labels, file_ending
        As for :func:`decide_postprocessing`.
    """
    labels = _labels_or_regions(labels_or_regions)
    foreground = _foreground_labels(labels, foreground_labels)
    _same_cases(counts_without, counts_with_foreground_step, "counts_with_foreground_step")
    _check_removal(counts_without, counts_with_foreground_step, labels, "counts_with_foreground_step", "counts_without")
    before = summary_from_counts(counts_without, labels, file_ending=file_ending)
    after = summary_from_counts(counts_with_foreground_step, labels, file_ending=file_ending)
    return PostprocessingStep(
        target=foreground,
        is_foreground_step=True,
        accepted=_foreground_verdict(before, after),
        dice_before=before["foreground_mean"]["Dice"],
        dice_after=after["foreground_mean"]["Dice"],
    )


def decide_label_step(
    counts_base: PerCase,
    counts_with_step: PerCase,
    label_or_region: LabelOrRegion,
    *,
    file_ending: str = "",
) -> PostprocessingStep:
    """Whether nnU-Net keeps only the largest connected component of one label or region.

    Mirrors the per-label loop of ``determine_postprocessing``: accepted when the label's
    mean Dice over all cases rises strictly.

    Parameters
    ----------
    counts_base
        ``{case: counts}`` of the segmentation nnU-Net tries the step on: the prediction,
        after the foreground step if it was accepted and after the label (region) steps
        accepted before this one. Only ``label_or_region``'s counts are used.
    counts_with_step
        The same after keeping the largest component of ``label_or_region`` in it.
    label_or_region
        The step's label or region.
    file_ending
        As for :func:`summary_from_counts`.
    """
    r = _label_or_region(label_or_region)
    _same_cases(counts_base, counts_with_step, f"the counts with {r!r}'s step", "its base")
    _check_removal(counts_base, counts_with_step, [r], f"the counts with {r!r}'s step", "its base")
    before = summary_from_counts(counts_base, [r], file_ending=file_ending)
    after = summary_from_counts(counts_with_step, [r], file_ending=file_ending)
    return PostprocessingStep(
        target=r,
        is_foreground_step=False,
        accepted=_label_verdict(before, after, r),
        dice_before=before["mean"][r]["Dice"],
        dice_after=after["mean"][r]["Dice"],
    )


def _label_step_counts(
    foreground_accepted: bool,
    counts_with_label_step: Mapping[Any, PerCase] | None,
    counts_with_foreground_and_label_step: Mapping[Any, PerCase] | None,
    r: LabelOrRegion,
) -> PerCase:
    """The counts of ``r``'s step on the base nnU-Net uses, given the foreground verdict."""
    if foreground_accepted:
        chosen, name = counts_with_foreground_and_label_step, "counts_with_foreground_and_label_step"
        why = "the foreground step was accepted, so nnU-Net tries each label step on its result"
    else:
        chosen, name = counts_with_label_step, "counts_with_label_step"
        why = "the foreground step was rejected, so nnU-Net tries each label step on the prediction itself"
    if chosen is None:
        raise CountsError(f"{why}: pass {name} ({{label: {{case: counts}}}})")
    try:
        return _entry(chosen, r, name)
    except CountsError:
        raise CountsError(f"{why}: {name} has no counts for {r!r}; send them for every label or region") from None


def decide_postprocessing(
    counts_without: PerCase,
    counts_with_foreground_step: PerCase,
    counts_with_label_step: Mapping[Any, PerCase] | None,
    labels_or_regions: Sequence[LabelOrRegion],
    *,
    counts_with_foreground_and_label_step: Mapping[Any, PerCase] | None = None,
    foreground_labels: Sequence[int] | None = None,
    file_ending: str = "",
) -> PostprocessingDecision:
    """``determine_postprocessing``'s decisions, from per-case counts only.

    Mirrors ``nnunetv2.postprocessing.remove_connected_components.determine_postprocessing``:

    1. the foreground step (keep the largest component of ``foreground_labels``) is
       accepted when ``foreground_mean`` Dice rises strictly and no label's mean Dice
       falls (:func:`decide_foreground_step`);
    2. with more than one label or region, for each in order, its step (keep its largest
       component) is tried on the current segmentation (the foreground step's result if
       accepted, plus the label steps accepted so far) and accepted when that label's
       mean Dice rises strictly (:func:`decide_label_step`).

    What a site sends, per validation case (``keep(seg, x)`` is nnU-Net's
    ``remove_all_but_largest_component_from_segmentation(seg, labels_or_regions=x)``;
    :func:`candidate_counts` computes all of it):

    - ``counts_without``: ``case_counts(ref, pred)``, every label;
    - ``counts_with_foreground_step``: ``case_counts(ref, keep(pred, foreground_labels))``, every label;
    - ``counts_with_label_step[l]``: ``case_counts(ref, keep(pred, l))``, label ``l`` at least
      (used if the foreground step is rejected);
    - ``counts_with_foreground_and_label_step[l]``:
      ``case_counts(ref, keep(keep(pred, foreground_labels), l))``, label ``l`` at least
      (used if it is accepted).

    Only the variant the foreground verdict selects is needed, so a two-round protocol
    may send just that one. The label steps accepted before ``l`` need not be applied:
    they never change ``l``'s mask, and ``l``'s verdict reads only ``l``'s Dice.

    Regions that share labels (``[(1, 2, 3), (2, 3), (3,)]``) interact: removing
    components of one region changes the others' masks. For them the counts of region
    ``r``'s step must be computed on the segmentation after the foreground step (if
    accepted) *and* the region steps accepted before ``r``, with every region's counts;
    the site needs those decisions first (decide step by step with
    :func:`decide_foreground_step` and :func:`decide_label_step`).

    Parameters
    ----------
    counts_without, counts_with_foreground_step
        ``{case id: counts}``.
    counts_with_label_step, counts_with_foreground_and_label_step
        ``{label or region: {case id: counts}}``; either may be None when the foreground
        verdict does not need it (and both with one label or region).
    labels_or_regions
        ``LabelManager.foreground_labels``, or ``foreground_regions`` for a region-based
        dataset, in that order (nnU-Net's order of the label steps).
    foreground_labels
        ``LabelManager.foreground_labels``; by default the labels ``labels_or_regions`` cover.
    file_ending
        The dataset's file ending (see :func:`summary_from_counts`).

    Returns
    -------
    PostprocessingDecision

    Raises
    ------
    CountsError
        If counts are missing, cover other cases, or cannot come from the step they claim
        (a step only removes predicted voxels and never changes the reference).
    """
    labels = _labels_or_regions(labels_or_regions)
    background = [r for r in labels if _is_background(r)]
    if background:
        raise CountsError(
            f"labels_or_regions holds the background {background}: determine_postprocessing evaluates "
            "the foreground labels or regions only"
        )
    disjoint = _disjoint(labels)
    foreground = decide_foreground_step(
        counts_without,
        counts_with_foreground_step,
        labels,
        foreground_labels=foreground_labels,
        file_ending=file_ending,
    )
    base = counts_with_foreground_step if foreground.accepted else counts_without
    current: dict[str, dict[Any, Any]] = {case: dict(counts) for case, counts in base.items()}
    steps = [foreground]
    if len(labels) > 1:
        for r in labels:
            stepped = _label_step_counts(
                foreground.accepted, counts_with_label_step, counts_with_foreground_and_label_step, r
            )
            step = decide_label_step(current, stepped, r, file_ending=file_ending)
            steps.append(step)
            if not step.accepted:
                continue
            if disjoint:  # only r's mask changed
                for case, counts in current.items():
                    counts[r] = _entry(stepped[case], r, f"the counts with {r!r}'s step, case {case!r}")
            else:  # the counts were taken on the current segmentation: they are its successor's
                _same_cases(current, stepped, f"the counts with {r!r}'s step", "its base")
                current = {case: dict(stepped[case]) for case in current}
    return PostprocessingDecision(
        labels_or_regions=labels,
        foreground_labels=foreground.target,  # type: ignore[arg-type]
        steps=tuple(steps),
        before=summary_from_counts(counts_without, labels, file_ending=file_ending),
        after=summary_from_counts(current, labels, file_ending=file_ending),
    )


def _json_part(summary: Mapping[str, Any]) -> dict[str, Any]:
    """``{'foreground_mean', 'mean'}`` of a summary with string keys, as ``postprocessing.json`` holds them."""
    return {
        "foreground_mean": dict(summary["foreground_mean"]),
        "mean": {_key(r): dict(values) for r, values in summary["mean"].items()},
    }


def postprocessing_json(decision: PostprocessingDecision) -> dict[str, Any]:
    """``postprocessing.json``'s content, as ``determine_postprocessing`` writes it.

    ``input_folder`` and ``postprocessed``: ``foreground_mean`` and ``mean`` (string keys)
    before and after the accepted steps; ``postprocessing_fns``: the function names;
    ``postprocessing_kwargs``: their keyword arguments, in JSON types (regions and the
    foreground step's labels as lists). Equal to ``json.load`` of nnU-Net's file (NaN
    compares unequal to itself, as always).
    """
    accepted = decision.accepted_steps
    return {
        "input_folder": _json_part(decision.before),
        "postprocessed": _json_part(decision.after),
        "postprocessing_fns": [POSTPROCESSING_FUNCTION for _ in accepted],
        "postprocessing_kwargs": [step.kwargs() for step in accepted],
    }


def write_postprocessing_json(decision: PostprocessingDecision, path: str) -> None:
    """Write :func:`postprocessing_json` with the writer nnU-Net uses (``save_json``: sorted keys, indent 4)."""
    from batchgenerators.utilities.file_and_folder_operations import save_json

    save_json(postprocessing_json(decision), str(path))


def postprocessing_steps(decision: PostprocessingDecision) -> tuple[list[Callable[..., np.ndarray]], list[dict]]:
    """``(pp_fns, pp_fn_kwargs)`` exactly as ``determine_postprocessing`` pickles them.

    nnU-Net pickles its label manager's objects: the foreground step's labels are a list
    of ``numpy.int64`` (``LabelManager.foreground_labels``), a plain label's step names the
    same ``numpy.int64`` object, a region's step the region as ``dataset.json`` gives it
    (a tuple of ints, or an int). (After pickling, nnU-Net's JSON export turns the
    kwargs it returns into Python ints in place; the pickle keeps numpy's.) This is what
    ``nnUNetv2_apply_postprocessing`` applies with ``apply_postprocessing``.
    """
    from nnunetv2.postprocessing.remove_connected_components import (
        remove_all_but_largest_component_from_segmentation,
    )

    foreground = [np.int64(label) for label in decision.foreground_labels]
    by_value = {int(label): label for label in foreground}
    has_regions = any(isinstance(r, tuple) for r in decision.labels_or_regions)
    pp_fns: list[Callable[..., np.ndarray]] = []
    pp_fn_kwargs: list[dict] = []
    for step in decision.accepted_steps:
        pp_fns.append(remove_all_but_largest_component_from_segmentation)
        if step.is_foreground_step:
            target: Any = foreground
        elif has_regions:
            target = step.target
        else:
            target = by_value.get(step.target, np.int64(step.target))  # type: ignore[arg-type]
        pp_fn_kwargs.append({"labels_or_regions": target})
    return pp_fns, pp_fn_kwargs


def write_postprocessing_pkl(decision: PostprocessingDecision, path: str) -> None:
    """Write ``postprocessing.pkl`` with nnU-Net's own ``save_pickle`` of :func:`postprocessing_steps`.

    Writing only: this project never reads a pickle (``nnUNetv2_apply_postprocessing`` does,
    on the user's side). The file holds references to nnU-Net's function, no code.
    """
    from batchgenerators.utilities.file_and_folder_operations import save_pickle

    save_pickle(postprocessing_steps(decision), str(path))
