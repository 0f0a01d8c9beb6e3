"""After a cross-validation fold's last round (run-config ``crossval = true``): every site validates the fold's global
model on its own validation cases, and only per-case counts come back.

One Flower ``evaluate`` message per site carries the final global model and ``crossval-fold``; the site runs
nnU-Net's whole-case validation (:meth:`flwr_nnunet.site.site.Site.crossval_validate`), keeps its predictions and
replies with ``num-examples`` and, in its config record, ``crossval-counts``: the per-case, per-label voxel counts as
JSON text. The server refuses (logs, and goes on without) any reply whose payload is not only counts
(:func:`~flwr_nnunet.site.crossval_validation.reply_holds_only_counts`) or whose counts contradict each other, then
writes the fold's summaries (:mod:`flwr_nnunet.apps.crossval_results`) and, once folds 0-4 are validated, merges
them with nnU-Net's postprocessing decision.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord
from flwr.supercore import log

from flwr_nnunet.apps.config_errors import ServerConfigError
from flwr_nnunet.apps.crossval_results import (
    POOLED,
    DatasetLabels,
    counts_file,
    merge_folds,
    write_fold_results,
)
from flwr_nnunet.nnunet.crossval import (
    CountsError,
    decide_foreground_step,
    decide_label_step,
    transpose_candidate_counts,
)
from flwr_nnunet.site.crossval_validation import COUNTS_KEY, FOLD_KEY, reply_holds_only_counts

__all__ = [
    "check_crossval_settings",
    "checked_counts",
    "counts_of",
    "finish_fold",
    "forget_fold",
    "keep_counts",
    "validate_fold_at_sites",
]


def check_crossval_settings(settings: Any) -> None:
    """``crossval = true`` needs ``fold`` to be a cross-validation fold (an integer >= 0).

    Raises
    ------
    ServerConfigError
        Naming the keys to set, before any data are made or network built.
    """
    if settings.crossval and not str(settings.fold).isdigit():
        raise ServerConfigError(
            f"crossval=true validates a cross-validation fold, but run-config fold is {settings.fold!r}: set fold to "
            "0, 1, 2, 3 or 4 (scripts/run_crossval.py runs them in turn), or crossval=false"
        )


def forget_fold(model_folder: Any, fold: int) -> None:
    """A fold's training (re)starts: its earlier validation counts no longer describe its model; remove them."""
    path = counts_file(model_folder.path, fold)
    if path.is_file():
        path.unlink()
        log(INFO, "crossval: fold %d trains again: removed its earlier counts %s", fold, path)


def _consistent(payload: Mapping[str, Any], labels: DatasetLabels) -> None:
    """Raise :class:`CountsError` unless every case counts every label, with and without each step, consistently."""
    incomplete = [case for case, report in payload.items() if {"without", "with_foreground_step"} - set(report)]
    if incomplete:
        raise CountsError(f"case(s) {incomplete[:3]} lack the counts without or with the foreground step")
    without = {case: report["without"] for case, report in payload.items()}
    foreground = {case: report["with_foreground_step"] for case, report in payload.items()}
    decide_foreground_step(
        without,
        foreground,
        labels.labels_or_regions,
        foreground_labels=labels.foreground_labels,
        file_ending=labels.file_ending,
    )
    if labels.disjoint and len(labels.labels_or_regions) > 1:
        steps = transpose_candidate_counts(payload)
        for r in labels.labels_or_regions:
            decide_label_step(without, steps["counts_with_label_step"].get(r, {}), r)
            decide_label_step(foreground, steps["counts_with_foreground_and_label_step"].get(r, {}), r)


def checked_counts(text: Any, num_examples: Any, labels: DatasetLabels) -> tuple[dict[str, Any] | None, str | None]:
    """``(payload, None)`` when ``text`` is the JSON of consistent per-case counts of ``num_examples`` cases, else
    ``(None, why not)``: what a site's cross-validation or ensemble reply carries in its config record."""
    if not isinstance(text, str):
        return None, f"its config record has no {COUNTS_KEY!r} text"
    try:
        payload = json.loads(text)
    except ValueError as error:
        return None, f"{COUNTS_KEY!r} is not JSON ({error})"
    reason = reply_holds_only_counts(payload, labels.keys)
    if reason is not None:
        return None, reason
    if not payload:
        return None, "it counts no case"
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, float)):
        return None, f"its num-examples is {type(num_examples).__name__}, not the number of cases it counts"
    if num_examples != len(payload):
        return None, f"num-examples {num_examples:g} differs from the {len(payload)} case(s) it counts"
    try:
        _consistent(payload, labels)
    except CountsError as error:
        return None, str(error)
    return payload, None


def counts_of(reply: Any, labels: DatasetLabels) -> tuple[dict[str, Any] | None, str | None]:
    """``(payload, None)`` for a reply that carries only consistent per-case counts, else ``(None, why not)``.

    ``reply`` is an accepted evaluation reply (its metrics checked by the strategy's validator).
    """
    config = reply.message.content.config_records.get("config")
    return checked_counts(config.get(COUNTS_KEY) if config is not None else None, reply.num_examples, labels)


def keep_counts(
    per_site: dict[str, Any], refused: dict[str, str], name: str, checked: tuple[Any, str | None], what: str
) -> None:
    """Keep a site's counts, ``checked`` as :func:`checked_counts` returns them, in ``per_site``; or log ``what``
    refused and note why in ``refused``. A site name already taken (or the pooled summary's) is refused too."""
    payload, reason = checked
    if reason is None and (name in per_site or name == POOLED):
        reason = f"the site name {name!r} is taken (another reply, or the pooled summary's)"
    if reason is not None:
        log(WARNING, "%s is refused: %s", what, reason)
        refused[name] = reason
        return
    per_site[name] = payload


def _site_name(core: Any, reply: Any) -> str:
    config = reply.message.content.config_records.get("config")
    name = config.get("site-name") if config is not None else None
    return name[:100] if isinstance(name, str) and name else core.diagnostics.name(reply.node_id)


def validate_fold_at_sites(grid: Any, core: Any, settings: Any) -> dict[str, dict[str, Any]]:
    """Ask every site for its whole-case validation of the fold's global model; write the fold's results.

    ``core`` is the run's ``NnUNetFedAvg`` (its global model is the fold's final one), ``settings`` its
    :class:`~flwr_nnunet.apps.run_config.RunSettings`. Returns ``{site name: {case: counts}}`` of the accepted
    replies (nothing is written when there is none).
    """
    fold, server_round = int(settings.fold), core.checkpoints.completed_rounds
    labels = DatasetLabels.from_plans(core.model_folder.plans, core.model_folder.dataset_json)
    if settings.fraction_evaluate < 1.0:
        log(
            WARNING,
            "crossval: fraction-evaluate %g: only the sites sampled validate fold %d",
            settings.fraction_evaluate,
            fold,
        )
    log(
        INFO,
        "flwr-nnunet: cross-validation fold %d: every site validates the fold's global model (round %d) on its own "
        "validation cases; predictions stay at the sites, counts come back",
        fold,
        server_round,
    )
    config = ConfigRecord({**settings.train_config(), FOLD_KEY: fold})
    messages = core.configure_evaluate(server_round, None, config, grid)  # handed to the validator there
    replies = grid.send_and_receive(messages=messages, timeout=settings.round_timeout)
    per_site: dict[str, dict[str, Any]] = {}
    refused: dict[str, str] = {}
    for reply in core.validator.accept(server_round, replies, weight=None, minimum=1):
        name = _site_name(core, reply)
        what = f"crossval: fold {fold}: the reply of site {name} (node {reply.node_id})"
        keep_counts(per_site, refused, name, counts_of(reply, labels), what)
    if not per_site:
        log(WARNING, "crossval: fold %d: no site's counts accepted: nothing written", fold)
        return per_site
    write_fold_results(core.model_folder.path, fold, per_site, labels, server_round=server_round, refused=refused)
    return per_site


def finish_fold(grid: Any, core: Any, settings: Any, *, load: Callable[[], Any] | None = None) -> None:
    """After a fold's last round: the sites' validation unless the fold's counts are written, then the merge.

    ``load`` puts the fold's final global model into ``core`` first when the sites must validate it (a resumed
    run that had finished its rounds). The merge of folds 0-4 happens once all five folds' counts are there; a
    merge that fails is logged (the fold's results stay).
    """
    folder = core.model_folder
    if counts_file(folder.path, int(settings.fold)).is_file():
        log(
            INFO,
            "crossval: fold %s validated already (%s)",
            settings.fold,
            counts_file(folder.path, int(settings.fold)),
        )
    else:
        if load is not None:
            load()
        validate_fold_at_sites(grid, core, settings)
    try:
        merge_folds(folder.path, folder.plans, folder.dataset_json)
    except (ValueError, OSError) as error:  # CountsError is a ValueError; a damaged counts file: JSON's
        log(WARNING, "crossval: the folds are not merged: %s", error)
