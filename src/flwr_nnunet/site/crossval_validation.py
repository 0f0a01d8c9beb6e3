"""A site's whole-case validation of its fold's model, as nnU-Net's ``perform_actual_validation``: counts out.

After a fold's last round each site validates that fold's global model on its
own validation cases exactly as ``nnUNetTrainer.perform_actual_validation``
does: the sliding-window predictor with the trainer's settings, each prediction
exported to the original image space (``export_prediction_from_logits``) into
the fold's ``validation/`` folder, with the softmax ``.npz`` where ensembling
needs it. The predictions, probabilities and nnU-Net's own ``summary.json``
stay at the site. What leaves it is, per case and per label (or region), the
voxel counts :func:`~flwr_nnunet.nnunet.crossval.candidate_counts` computes
against the site's ground truth (``<nnUNet_preprocessed>/<dataset>/gt_segmentations``):
enough for the server to compute the pooled cross-validation summary and the
postprocessing decision (:mod:`flwr_nnunet.nnunet.crossval`), and nothing an
image or a probability could be rebuilt from. :func:`reply_holds_only_counts`
checks a payload has that form.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.supercore import log
from torch import nn

from flwr_nnunet.nnunet.crossval import (
    METRICS,
    candidate_counts,
    case_counts,
    summary_from_counts,
    write_summary_json,
)
from flwr_nnunet.nnunet.planning import nnunet_environment
from flwr_nnunet.site.evaluation import predictor
from flwr_nnunet.site.spec import SiteError, SiteSpec

__all__ = [
    "CANDIDATE_FIELDS",
    "COUNTS_KEY",
    "FOLD_KEY",
    "MAX_CASE_ID_LENGTH",
    "MAX_LABELS",
    "count_case",
    "ground_truth",
    "reply_holds_only_counts",
    "validate_fold",
    "write_site_summary",
]

FOLD_KEY = "crossval-fold"
"""The evaluate message's config entry that asks a site for its whole-case validation of this fold (an int >= 0)."""

COUNTS_KEY = "crossval-counts"
"""The reply's config entry: :func:`validate_fold`'s payload as JSON text (a ``ConfigRecord`` cannot nest)."""

CANDIDATE_FIELDS = ("without", "with_foreground_step", "with_label_step", "with_foreground_and_label_step")
"""The parts of one case's counts (:func:`~flwr_nnunet.nnunet.crossval.candidate_counts`); the last two are per label."""

MAX_CASE_ID_LENGTH = 255
"""The longest case identifier a reply may carry."""

MAX_LABELS = 255
"""The most labels (or regions) one case's counts may name when the dataset's are not given (nnU-Net writes
segmentations with fewer than 255 labels as uint8)."""

_LABEL_STEP_FIELDS = CANDIDATE_FIELDS[2:]
_COUNT_METRICS = tuple(m for m in METRICS if m not in ("Dice", "IoU"))


@torch.no_grad()
def validate_fold(
    spec: SiteSpec,
    trainer: Any,
    network: nn.Module,
    *,
    output_folder: str | Path | None = None,
    save_probabilities: bool = True,
) -> dict[str, dict[str, Any]]:
    """Validate ``network`` on the site's validation cases of the trainer's fold, as nnU-Net does; return the counts.

    Every case is predicted and exported as ``nnUNetTrainer.perform_actual_validation``
    predicts and exports it (in this process, without its pool of export processes),
    then counted against its ground truth as ``compute_metrics_on_folder`` reads both
    (the dataset's reader/writer, its ignore label, its foreground labels or regions).
    nnU-Net's ``summary.json`` of these cases is written beside the predictions.

    Parameters
    ----------
    spec
        The site (its ``gt_segmentations`` are under ``spec.dataset_folder``).
    trainer
        The site's initialised nnU-Net trainer of the fold (plans, label manager, split).
    network
        The model to validate (the trainer's network, unwrapped, holding the fold's global model).
    output_folder
        Where the predictions go; by default ``<fold folder>/validation``, where nnU-Net puts them.
    save_probabilities
        Also write each case's softmax (``<case>.npz``, with its ``<case>.pkl`` properties), as
        ``perform_actual_validation(save_probabilities=True)`` (nnU-Net's ``--npz``) does: the site's
        ensembles of configurations (:mod:`flwr_nnunet.site.crossval_ensemble`) average them.

    Returns
    -------
    dict
        ``{case id: candidate counts}``: per case, :data:`CANDIDATE_FIELDS` as
        :func:`~flwr_nnunet.nnunet.crossval.candidate_counts` returns them, labels and regions
        as nnU-Net's JSON keys (``"1"``, ``"(1, 2)"``), every value a Python int: what a reply
        carries (:func:`reply_holds_only_counts`). For regions that share labels only
        ``without`` and ``with_foreground_step`` (each region's step needs the earlier decisions).

    Raises
    ------
    SiteError
        If the fold has no validation cases, or a case's ground truth is missing (before any prediction).
    """
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian
    from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot

    labels = trainer.label_manager
    targets = list(labels.foreground_regions if labels.has_regions else labels.foreground_labels)
    ending = trainer.dataset_json["file_ending"]
    folder = Path(output_folder) if output_folder is not None else Path(trainer.output_folder) / "validation"
    cases = _validation_cases(spec, trainer)
    references = ground_truth(spec, cases, ending)
    folder.mkdir(parents=True, exist_ok=True)
    reader = trainer.plans_manager.image_reader_writer_class()
    sliding = predictor(trainer, network)
    dataset = trainer.dataset_class(
        trainer.preprocessed_dataset_folder,
        cases,
        folder_with_segs_from_previous_stage=trainer.folder_with_segs_from_previous_stage,
    )
    payload: dict[str, dict[str, Any]] = {}
    trainer.set_deep_supervision_enabled(False)
    try:
        for case in cases:
            data, _, previous_stage, properties = dataset.load_case(case)
            data = data[:]
            if trainer.is_cascaded:
                one_hot = convert_labelmap_to_one_hot(
                    previous_stage[:], labels.foreground_labels, output_dtype=data.dtype
                )
                data = np.vstack((data, one_hot))
            with warnings.catch_warnings():  # nnU-Net's: the array may not be writable
                warnings.simplefilter("ignore")
                data = torch.from_numpy(data)
            logits = sliding.predict_sliding_window_return_logits(data).cpu()
            export_prediction_from_logits(
                logits,
                properties,
                trainer.configuration_manager,
                trainer.plans_manager,
                trainer.dataset_json,
                str(folder / case),
                save_probabilities,
                num_threads_torch=torch.get_num_threads(),
            )
            payload[case] = count_case(reader, references[case], folder / f"{case}{ending}", targets, labels)
    finally:
        trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
        compute_gaussian.cache_clear()
    dice = write_site_summary(payload, targets, references, folder, ending)
    log(
        INFO,
        "%s: fold %s validation of %d case(s), foreground Dice %.4f (predictions and summary.json in %s)",
        spec.name,
        spec.fold,
        len(cases),
        dice,
        folder,
    )
    return payload


def count_case(reader: Any, reference_file: Path, prediction_file: Path, targets: list, labels: Any) -> dict:
    """One exported prediction's candidate counts against its reference, both read as ``compute_metrics_on_folder``
    reads them; label keys as nnU-Net's JSON keys."""
    reference, _ = reader.read_seg(str(reference_file))
    prediction, _ = reader.read_seg(str(prediction_file))
    return _json_keys(_case_report(reference, prediction, targets, labels))


def write_site_summary(
    payload: Mapping[str, Mapping[str, Any]], targets: list, references: Mapping[str, Path], folder: Path, ending: str
) -> float:
    """nnU-Net's ``summary.json`` of the counted cases, beside their predictions in ``folder``; its foreground Dice."""
    summary = summary_from_counts(
        {case: report["without"] for case, report in payload.items()}, targets, file_ending=ending
    )
    write_summary_json(_with_files(summary, references, folder, ending), str(folder / "summary.json"))
    return summary["foreground_mean"]["Dice"]


def _validation_cases(spec: SiteSpec, trainer: Any) -> list[str]:
    """The validation cases of the trainer's fold (``do_split``), in order."""
    with nnunet_environment(preprocessed=spec.nnunet_preprocessed, results=spec.nnunet_results):
        _, validation = trainer.do_split()
    if not validation:
        raise SiteError(f"{spec.name}: fold {spec.fold} has no validation cases; set run-config 'fold'")
    return [str(case) for case in validation]


def ground_truth(spec: SiteSpec, cases: Sequence[str], ending: str) -> dict[str, Path]:
    """Each case's ground truth file in ``gt_segmentations``, all checked to exist."""
    folder = spec.dataset_folder / "gt_segmentations"
    files = {case: folder / f"{case}{ending}" for case in cases}
    missing = [case for case, path in files.items() if not path.is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise SiteError(
            f"{spec.name}: no ground truth for validation case(s) {shown} in {folder}; nnUNetv2_preprocess writes "
            f"gt_segmentations: run {spec.fix_command('preprocess')}"
        )
    return files


def _case_report(reference: np.ndarray, prediction: np.ndarray, targets: list, labels: Any) -> dict[Any, Any]:
    """One case's candidate counts; for regions that share labels, only those that need no decision first."""
    covered = [frozenset(r) if isinstance(r, tuple) else frozenset((r,)) for r in targets]
    if sum(map(len, covered)) == len(frozenset().union(*covered)):
        return candidate_counts(
            reference, prediction, targets, foreground_labels=labels.foreground_labels, ignore_label=labels.ignore_label
        )
    from nnunetv2.postprocessing.remove_connected_components import (
        remove_all_but_largest_component_from_segmentation as keep_largest,
    )

    after_foreground = keep_largest(prediction, labels_or_regions=list(labels.foreground_labels))
    return {
        "without": case_counts(reference, prediction, targets, labels.ignore_label),
        "with_foreground_step": case_counts(reference, after_foreground, targets, labels.ignore_label),
    }


def _json_keys(value: Any) -> Any:
    """``value`` with every mapping key as nnU-Net's JSON key (``str(label or region)``)."""
    if isinstance(value, Mapping):
        return {key if isinstance(key, str) else str(key): _json_keys(item) for key, item in value.items()}
    return value


def _with_files(summary: dict, references: Mapping[str, Path], folder: Path, ending: str) -> dict:
    """``summary`` with each case named by its reference and prediction files, as ``compute_metrics_on_folder``."""
    per_case = [
        {
            "reference_file": str(references[entry["case_id"]]),
            "prediction_file": str(folder / f"{entry['case_id']}{ending}"),
            "metrics": entry["metrics"],
        }
        for entry in summary["metric_per_case"]
    ]
    return {**summary, "metric_per_case": per_case}


# ---------------------------------------------------------------------------------------------------------------------
# what a reply may carry


def reply_holds_only_counts(
    payload: Any, labels_or_regions: Sequence[Any] | None = None, *, max_labels: int = MAX_LABELS
) -> str | None:
    """Why ``payload`` is not only per-case counts, or ``None`` when it is.

    Accepted is exactly the form :func:`validate_fold` returns: a mapping of case ids
    (strings of at most :data:`MAX_CASE_ID_LENGTH` characters) to mappings of
    :data:`CANDIDATE_FIELDS`; ``without`` and ``with_foreground_step`` map label keys to
    one entry, each label step maps a label key to a mapping holding that label's entry
    only. An entry maps names of nnU-Net's per-case metrics to numbers: voxel counts
    (``TP``, ``FP``, ``FN``, ``TN``, ``n_pred``, ``n_ref``) as non-negative ``int``, ``Dice`` and ``IoU``
    as ``float`` in [0, 1] or NaN. Lists, arrays, bytes, other strings and other types are
    refused anywhere, so a case carries at most ``4 x labels x 8`` numbers.

    Parameters
    ----------
    payload
        What a reply carries (decoded from its transport form).
    labels_or_regions
        The dataset's foreground labels or regions: label keys must be among theirs
        (``str(label or region)``). Without them, any nnU-Net label key, at most ``max_labels`` per part.
    max_labels
        The most label keys in one part of one case when ``labels_or_regions`` is not given.
    """
    allowed = None if labels_or_regions is None else {str(r) for r in labels_or_regions}
    if not isinstance(payload, Mapping):
        return f"the payload is {type(payload).__name__}, not a mapping of case id to counts"
    for case, report in payload.items():
        if type(case) is not str or not 0 < len(case) <= MAX_CASE_ID_LENGTH:
            return f"case id {_shown(case)} is not a string of 1 to {MAX_CASE_ID_LENGTH} characters"
        if not isinstance(report, Mapping):
            return f"case {case!r} holds {type(report).__name__}, not a mapping of {list(CANDIDATE_FIELDS)}"
        for field, part in report.items():
            where = f"case {case!r}, {_shown(field)}"
            if field not in CANDIDATE_FIELDS:
                return f"{where}: not one of {list(CANDIDATE_FIELDS)}"
            reason = _labels_part(part, where, allowed, max_labels, field in _LABEL_STEP_FIELDS)
            if reason is not None:
                return reason
    return None


def _labels_part(part: Any, where: str, allowed: set[str] | None, max_labels: int, per_label: bool) -> str | None:
    """Why ``part`` is not ``{label key: entry}`` (``per_label``: ``{label key: {that label key: entry}}``)."""
    if not isinstance(part, Mapping):
        return f"{where} holds {type(part).__name__}, not a mapping of label or region to counts"
    if allowed is None and len(part) > max_labels:
        return f"{where} names {len(part)} labels or regions, more than {max_labels}"
    for key, entry in part.items():
        inner = f"{where}, {_shown(key)}"
        if not _is_label_key(key) or (allowed is not None and key not in allowed):
            expected = f"one of {sorted(allowed)}" if allowed is not None else "a label or region key ('1', '(1, 2)')"
            return f"{inner}: not {expected}"
        if per_label:
            if not isinstance(entry, Mapping) or list(entry) != [key]:
                return f"{inner}: a label step holds that label's counts only ({{{key!r}: counts}})"
            entry, inner = entry[key], f"{inner}, {key!r}"
        reason = _entry(entry, inner)
        if reason is not None:
            return reason
    return None


def _entry(entry: Any, where: str) -> str | None:
    """Why ``entry`` is not a mapping of metric names to counts (ints) and Dice/IoU (floats)."""
    if not isinstance(entry, Mapping) or not entry:
        return f"{where} holds {type(entry).__name__}, not a mapping of {list(METRICS)} to numbers"
    for name, value in entry.items():
        if name not in METRICS:
            return f"{where}: {_shown(name)} is not one of nnU-Net's per-case metrics {list(METRICS)}"
        if name in _COUNT_METRICS and not (type(value) is int and value >= 0):
            return f"{where}, {name!r}: {_shown(value)} ({type(value).__name__}) is not a voxel count (an int >= 0)"
        if name not in _COUNT_METRICS and not (type(value) is float and (math.isnan(value) or 0.0 <= value <= 1.0)):
            return f"{where}, {name!r}: {_shown(value)} ({type(value).__name__}) is not a float in [0, 1] or NaN"
    return None


def _is_label_key(key: Any) -> bool:
    """Whether ``key`` is nnU-Net's JSON key of a label (``"1"``) or region (``"(1, 2)"``)."""
    if type(key) is not str or len(key) > 64:
        return False
    if key.isdigit():
        return True
    inner = key.removeprefix("(").removesuffix(")")
    parts = [p.strip() for p in inner.split(",")]
    return key.startswith("(") and key.endswith(")") and bool(parts[0]) and all(p.isdigit() for p in parts if p)


def _shown(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
