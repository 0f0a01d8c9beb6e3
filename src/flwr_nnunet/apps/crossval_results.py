"""Cross-validation results in the global model folder, from the sites' per-case counts only (nnU-Net's layout).

What a fold's validation phase (:mod:`flwr_nnunet.apps.crossval_phase`) and the merge of folds 0-4 write::

    <model folder>/
        fold_<k>/validation/summary.json               pooled over the sites: nnU-Net's summary.json
        fold_<k>/validation/summary_<site>.json        each site's own (same form)
        fold_<k>/validation/flwr_crossval_counts.json  the sites' per-case counts (counts only): what the merge reads
        crossval_results_folds_0_1_2_3_4/
            summary.json  summary_<site>.json           pooled over the sites and the five folds / each site's cases
            postprocessing.pkl  postprocessing.json     determine_postprocessing's decision, from the counts
            plans.json  dataset.json                    copied, as nnU-Net's accumulate_cv_results does
            flwr_crossval.json                          which folds and sites went in, the verdicts

Summaries are :func:`~flwr_nnunet.nnunet.crossval.summary_from_counts` written with nnU-Net's own writer; each case
names itself with ``case_id`` (the predictions are at the sites, so there is no file to name).
``postprocessing.pkl`` is written with nnU-Net's ``save_pickle`` (never read here: ``postprocessing.json`` is its
twin this project reads). Case ids that two sites share are pooled as ``<site>/<case>`` (logged).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.supercore import log

from flwr_nnunet.nnunet.checkpoint_io import atomic_write
from flwr_nnunet.nnunet.crossval import (
    CountsError,
    decide_postprocessing,
    pooled_and_per_site,
    postprocessing_json,
    transpose_candidate_counts,
    write_postprocessing_json,
    write_postprocessing_pkl,
    write_summary_json,
)

__all__ = [
    "COUNTS_FILE",
    "FOLDS",
    "MERGE_FILE",
    "POOLED",
    "DatasetLabels",
    "counts_file",
    "merge_folds",
    "merged_folder",
    "pooled_dice_line",
    "read_fold_counts",
    "summary_file_names",
    "write_counts_and_summaries",
    "write_fold_results",
    "write_postprocessing",
]

COUNTS_FILE = "flwr_crossval_counts.json"
"""A fold's per-site, per-case counts, in ``fold_<k>/validation/``."""

MERGE_FILE = "flwr_crossval.json"
"""What went into the merged cross-validation, in ``crossval_results_folds_0_1_2_3_4/``."""

FOLDS = (0, 1, 2, 3, 4)
"""The folds nnU-Net's five-fold cross-validation merges."""

_FORMAT = "flwr-nnunet/crossval-counts"
POOLED = "pooled"
"""The pooled summary's key among the per-site ones (no site may take the name)."""


def _plain(label_or_region: Any) -> int | tuple[int, ...]:
    """A label (``int``) or region (``tuple`` of ``int``) without numpy types, as the sites key them."""
    if isinstance(label_or_region, (tuple, list)):
        return tuple(int(v) for v in label_or_region)
    return int(label_or_region)


@dataclass(frozen=True)
class DatasetLabels:
    """What the counts are counted on: the dataset's foreground labels or regions, its foreground step, its ending."""

    labels_or_regions: tuple[int | tuple[int, ...], ...]
    foreground_labels: tuple[int, ...]
    file_ending: str

    @classmethod
    def from_plans(cls, plans: Mapping[str, Any], dataset_json: Mapping[str, Any]) -> DatasetLabels:
        """nnU-Net's label manager of these plans and dataset.json (regions when the dataset has them)."""
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        labels = PlansManager(dict(plans)).get_label_manager(dict(dataset_json))
        targets = labels.foreground_regions if labels.has_regions else labels.foreground_labels
        return cls(
            tuple(_plain(r) for r in targets),
            tuple(int(label) for label in labels.foreground_labels),
            str(dataset_json["file_ending"]),
        )

    @property
    def keys(self) -> list[str]:
        """The labels' or regions' JSON keys (``"1"``, ``"(1, 2)"``), as a site's counts name them."""
        return [str(r) for r in self.labels_or_regions]

    @property
    def disjoint(self) -> bool:
        """Whether no two entries share a label (then every case carries each label's step counts)."""
        sets = [set(r) if isinstance(r, tuple) else {r} for r in self.labels_or_regions]
        return sum(map(len, sets)) == len(set().union(*sets))


def summary_file_names(sites: Sequence[str]) -> dict[str, str]:
    """``summary_<site>.json`` per site, the name made safe for a file name and unique."""
    names: dict[str, str] = {}
    used: set[str] = set()
    for site in sorted(sites):
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", site).strip("._") or "site"
        name, number = base, 1
        while name in used:
            number += 1
            name = f"{base}_{number}"
        used.add(name)
        names[site] = f"summary_{name}.json"
    return names


def counts_file(model_folder: Path, fold: int) -> Path:
    """``fold_<fold>/validation/flwr_crossval_counts.json``."""
    return Path(model_folder) / f"fold_{fold}" / "validation" / COUNTS_FILE


def merged_folder(model_folder: Path, folds: Sequence[int] = FOLDS) -> Path:
    """``crossval_results_folds_0_1_2_3_4`` (nnU-Net's name for the merged folds)."""
    return Path(model_folder) / f"crossval_results_folds_{'_'.join(str(f) for f in folds)}"


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=True).encode()
    atomic_write(path, lambda handle: handle.write(text))


def _pooled_case_ids(per_site: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``per_site`` as is when no two sites share a case id; else every case named ``<site>/<case>`` (logged)."""
    seen: set[str] = set()
    shared = False
    for cases in per_site.values():
        shared = shared or bool(seen & set(cases))
        seen |= set(cases)
    if not shared:
        return {site: dict(cases) for site, cases in per_site.items()}
    log(INFO, "crossval: sites share case ids: the pooled summary names every case <site>/<case>")
    return {site: {f"{site}/{case}": counts for case, counts in cases.items()} for site, cases in per_site.items()}


def _summaries(per_site: Mapping[str, Mapping[str, Any]], labels: DatasetLabels) -> dict[str, dict[str, Any]]:
    """The pooled summary and each site's, from the ``without`` counts of every case."""
    without = {
        site: {case: report["without"] for case, report in cases.items()}
        for site, cases in _pooled_case_ids(per_site).items()
    }
    return pooled_and_per_site(without, labels.labels_or_regions, file_ending=labels.file_ending)


def _write_summaries(folder: Path, summaries: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """``summary.json`` (pooled) and ``summary_<site>.json``; the file name of each site's."""
    folder.mkdir(parents=True, exist_ok=True)
    write_summary_json(summaries[POOLED], str(folder / "summary.json"))
    names = summary_file_names([site for site in summaries if site != POOLED])
    for site, name in names.items():
        write_summary_json(summaries[site], str(folder / name))
    return names


def write_counts_and_summaries(
    folder: Path, per_site: Mapping[str, Mapping[str, Any]], labels: DatasetLabels, about: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """The summaries (pooled and per site) and the counts file ``flwr_crossval_counts.json`` in ``folder``.

    ``per_site`` is ``{site name: {case id: candidate counts}}`` of the accepted replies (checked already);
    ``about`` goes into the counts file beside them (what was validated). Returns the summaries.
    """
    summaries = _summaries(per_site, labels)
    names = _write_summaries(folder, summaries)
    _write_json(
        folder / COUNTS_FILE,
        {
            "format": _FORMAT,
            **about,
            "labels_or_regions": labels.keys,
            "file_ending": labels.file_ending,
            "summaries": names,
            "sites": {site: dict(cases) for site, cases in per_site.items()},
        },
    )
    return summaries


def write_fold_results(
    model_folder: Path,
    fold: int,
    per_site: Mapping[str, Mapping[str, Any]],
    labels: DatasetLabels,
    *,
    server_round: int,
    refused: Mapping[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Write a fold's summaries (pooled and per site) and its counts file; return the summaries.

    Parameters
    ----------
    model_folder
        The global model folder.
    fold
        The cross-validation fold.
    per_site
        ``{site name: {case id: candidate counts}}`` of the accepted replies (checked already).
    labels
        The dataset's labels or regions.
    server_round
        The round whose global model the sites validated.
    refused
        ``{site name: reason}`` of the replies refused (kept in the counts file).
    """
    folder = Path(model_folder) / f"fold_{fold}" / "validation"
    about = {"fold": fold, "server_round": server_round, "refused": dict(refused or {})}
    summaries = write_counts_and_summaries(folder, per_site, labels, about)
    log(INFO, "crossval: fold %d: %s; summaries and counts in %s", fold, pooled_dice_line(summaries), folder)
    return summaries


def pooled_dice_line(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """``foreground Dice 0.8123 pooled over 2 site(s) (site-0 0.8000, site-1 0.8250)``: a log line's part."""
    sites = sorted(site for site in summaries if site != POOLED)
    return (
        f"foreground Dice {summaries[POOLED]['foreground_mean']['Dice']:.4f} pooled over {len(sites)} site(s) ("
        + ", ".join(f"{site} {summaries[site]['foreground_mean']['Dice']:.4f}" for site in sites)
        + ")"
    )


def read_fold_counts(model_folder: Path, fold: int) -> dict[str, Any] | None:
    """A fold's counts file as written by :func:`write_fold_results`, or None when the fold is not validated yet."""
    path = counts_file(model_folder, fold)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("fold") != fold:
        raise CountsError(f"{path} is not a flwr-nnunet cross-validation counts file of fold {fold}")
    return data


def _merged_sites(per_fold: Mapping[int, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every site's cases over the folds; a case validated in two folds of one site is an error."""
    merged: dict[str, dict[str, Any]] = {}
    where: dict[tuple[str, str], int] = {}
    for fold, data in per_fold.items():
        for site, cases in data["sites"].items():
            for case, counts in cases.items():
                if (site, case) in where:
                    raise CountsError(
                        f"site {site!r} validated case {case!r} in folds {where[site, case]} and {fold}: its "
                        "splits_final.json is not a five-fold split (every case in one fold's validation only)"
                    )
                where[site, case] = fold
                merged.setdefault(site, {})[case] = counts
    return merged


def merge_folds(
    model_folder: Path, plans: Mapping[str, Any], dataset_json: Mapping[str, Any], folds: Sequence[int] = FOLDS
) -> Path | None:
    """Merge the folds' counts into ``crossval_results_folds_...``: summaries, postprocessing; its folder.

    Nothing is written (None returned) while a fold's counts are missing. A site missing from a fold counts with
    the folds it validated (logged). When nnU-Net's postprocessing cannot be decided from one pass of counts
    (regions that share labels) the summaries are written without ``postprocessing.pkl`` / ``.json`` (logged).

    Raises
    ------
    CountsError
        If a site validated one case in two folds, or a counts file is not one.
    """
    model_folder = Path(model_folder)
    per_fold = {fold: read_fold_counts(model_folder, fold) for fold in folds}
    missing = [fold for fold, data in per_fold.items() if data is None]
    if missing:
        log(INFO, "crossval: fold(s) %s not validated yet: the folds are merged once all of %s are", missing, folds)
        return None
    labels = DatasetLabels.from_plans(plans, dataset_json)
    sites = _merged_sites(per_fold)
    for site in sites:
        absent = [fold for fold, data in per_fold.items() if site not in data["sites"]]
        if absent:
            log(WARNING, "crossval: site %s has no counts for fold(s) %s: merged with the folds it has", site, absent)
    folder = merged_folder(model_folder, folds)
    summaries = _summaries(sites, labels)
    names = _write_summaries(folder, summaries)
    for name in ("plans.json", "dataset.json"):
        shutil.copyfile(model_folder / name, folder / name)
    decision = write_postprocessing(sites, labels, folder)
    _write_json(
        folder / MERGE_FILE,
        {
            "folds": list(folds),
            "server_rounds": {str(fold): data["server_round"] for fold, data in per_fold.items()},
            "sites": {site: {"cases": len(cases), "summary": names[site]} for site, cases in sites.items()},
            "foreground_dice": summaries[POOLED]["foreground_mean"]["Dice"],
            "postprocessing": None if decision is None else postprocessing_json(decision),
        },
    )
    log(
        INFO,
        "crossval: folds %s merged in %s: foreground Dice %.4f pooled over %d site(s)%s",
        list(folds),
        folder,
        summaries[POOLED]["foreground_mean"]["Dice"],
        len(sites),
        ""
        if decision is None
        else f"; postprocessing: {len(decision.accepted_steps)} step(s) kept of {len(decision.steps)} "
        f"(foreground Dice {decision.after['foreground_mean']['Dice']:.4f} after)",
    )
    return folder


def write_postprocessing(sites: Mapping[str, Mapping[str, Any]], labels: DatasetLabels, folder: Path) -> Any:
    """nnU-Net's postprocessing decision on the sites' pooled counts, written as ``postprocessing.pkl`` and ``.json``
    in ``folder``; the :class:`~flwr_nnunet.nnunet.crossval.PostprocessingDecision`, or None where it cannot be
    decided from one pass of counts (logged)."""
    pooled = {case: report for cases in _pooled_case_ids(sites).values() for case, report in cases.items()}
    for stale in ("postprocessing.pkl", "postprocessing.json"):
        (folder / stale).unlink(missing_ok=True)
    try:
        decision = decide_postprocessing(
            **transpose_candidate_counts(pooled),
            labels_or_regions=labels.labels_or_regions,
            foreground_labels=labels.foreground_labels,
            file_ending=labels.file_ending,
        )
    except CountsError as error:
        log(WARNING, "crossval: postprocessing not decided (%s): no postprocessing.pkl written", error)
        return None
    write_postprocessing_pkl(decision, str(folder / "postprocessing.pkl"))
    write_postprocessing_json(decision, str(folder / "postprocessing.json"))
    return decision
