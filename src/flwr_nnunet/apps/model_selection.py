"""A model selection run (run-config ``find-best-configuration``): ``nnUNetv2_find_best_configuration`` over sites.

After every configuration named has been cross-validated (``crossval = true``, folds 0-4, each merged into
``crossval_results_folds_0_1_2_3_4/``), one run with ``find-best-configuration = "2d 3d_fullres"`` trains nothing:

1. each configuration's score is its merged cross-validation's pooled foreground Dice;
2. for each pair, every site ensembles the two configurations' validation softmax of its own cases (a
   ``query.ensemble`` message; :func:`~flwr_nnunet.site.crossval_ensemble.ensemble_counts`) and replies with the
   per-case counts only; the ensemble's summaries (pooled and per site) and counts go to
   ``<results>/<dataset>/ensembles/<ensemble name>/``, nnU-Net's folder, and its score is their pooled Dice;
3. the best (nnU-Net's rule, :func:`~flwr_nnunet.nnunet.model_selection.best_candidate`) gets nnU-Net's
   postprocessing decision (a single configuration has it from its merge already), and
   ``inference_information.json`` and ``inference_instructions.txt`` are written beside the models.

A site's reply that is not only consistent counts is refused (logged) and the ensemble is scored on the others.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.supercore import log

from flwr_nnunet.apps.config_errors import ServerConfigError, read_required_json
from flwr_nnunet.apps.crossval_phase import checked_counts, keep_counts
from flwr_nnunet.apps.crossval_results import (
    FOLDS,
    MERGE_FILE,
    POOLED,
    DatasetLabels,
    merged_folder,
    pooled_dice_line,
    write_counts_and_summaries,
    write_postprocessing,
)
from flwr_nnunet.nnunet.model_selection import (
    Candidate,
    ModelSelectionError,
    best_candidate,
    candidates,
    check_configurations,
    inference_information,
    model_identifier,
    write_inference_information,
)
from flwr_nnunet.site.crossval_ensemble import FOLDS_KEY, MEMBERS_KEY
from flwr_nnunet.site.crossval_validation import COUNTS_KEY
from flwr_nnunet.strategy.nodes import wait_for_nodes
from flwr_nnunet.strategy.validator import error_reason, instruction_nodes

__all__ = ["ENSEMBLE_QUERY", "ask_sites_to_ensemble", "select_configuration"]

ENSEMBLE_QUERY = "query.ensemble"
"""The message type a site answers with its ensemble's counts (``client_app.py``'s ``@app.query("ensemble")``)."""


def _merged_results(model_folder: Path, configuration: str) -> dict:
    """The merged cross-validation's ``flwr_crossval.json`` of one configuration."""
    fix = (
        f"find-best-configuration: cross-validate configuration {configuration!r} first (folds 0-4: python scripts/run_crossval.py "
        f"--config \"configuration='{configuration}'\")"
    )
    return read_required_json(merged_folder(model_folder) / MERGE_FILE, fix)


def _reply_site(reply: Any, node: int) -> str:
    config = reply.content.config_records.get("config") if reply.has_content() else None
    name = config.get("site-name") if config is not None else None
    return name[:100] if isinstance(name, str) and name else f"node-{node}"


def ask_sites_to_ensemble(
    grid: Any, nodes: Sequence[int], members: Sequence[str], labels: DatasetLabels, timeout: float
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """One ``query.ensemble`` to every node; ``({site: {case: counts}}, {site or node: why refused})``."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID

    config = ConfigRecord({MEMBERS_KEY: list(members), FOLDS_KEY: list(FOLDS)})
    messages = [
        Message(RecordDict({"config": config}), dst_node_id=node, message_type=ENSEMBLE_QUERY, group_id="ensemble")
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    sent_to = instruction_nodes(messages)
    per_site: dict[str, dict[str, Any]] = {}
    refused: dict[str, str] = {}
    answered: set[int] = set()
    for reply in replies:
        node = int(reply.metadata.src_node_id)
        if node == SUPERLINK_NODE_ID:
            node = int(sent_to.get(reply.metadata.reply_to_message_id, node))
        answered.add(node)
        name = _reply_site(reply, node)
        if reply.has_error():
            checked = (None, error_reason(reply, node))
        else:
            metrics = reply.content.metric_records.get("metrics")
            config_record = reply.content.config_records.get("config")
            text = config_record.get(COUNTS_KEY) if config_record is not None else None
            checked = checked_counts(text, metrics.get("num-examples") if metrics is not None else None, labels)
        what = f"ensemble {' + '.join(members)}: the reply of {name} (node {node})"
        keep_counts(per_site, refused, name, checked, what)
    for node in nodes:
        if node not in answered:
            refused[f"node-{node}"] = f"no answer within {timeout:.0f} s"
    return per_site, refused


def _ensemble(
    grid: Any, nodes: Sequence[int], candidate: Candidate, folder: Path, labels: DatasetLabels, settings: Any
) -> tuple[dict[str, dict[str, Any]], float]:
    """The sites' counts of one ensemble, its summaries written in ``folder``; ``({site: {case: counts}}, pooled
    foreground Dice)``."""
    name, members = candidate
    per_site, refused = ask_sites_to_ensemble(grid, nodes, members, labels, settings.round_timeout)
    if not per_site:
        raise ServerConfigError(
            f"find-best-configuration: no site ensembled {' + '.join(members)} ({refused}); every site needs both "
            "configurations' cross-validation with their validation softmax (.npz), as scripts/run_crossval.py runs it"
        )
    about = {"members": list(members), "folds": list(FOLDS), "refused": refused}
    summaries = write_counts_and_summaries(folder, per_site, labels, about)
    first = folder.parents[1] / members[0]
    for file_name in ("plans.json", "dataset.json"):  # as nnU-Net's ensemble_crossvalidations copies them
        shutil.copyfile(first / file_name, folder / file_name)
    log(INFO, "find-best-configuration: %s: %s", name, pooled_dice_line(summaries))
    return per_site, summaries[POOLED]["foreground_mean"]["Dice"]


def select_configuration(grid: Any, settings: Any) -> dict[str, Any]:
    """The model selection run: scores, ensembles at the sites, the best and its postprocessing; nnU-Net's
    ``inference_information`` (also written, with ``inference_instructions.txt``, in ``<results>/<dataset>/``).

    Raises
    ------
    ServerConfigError
        Naming the fix when a configuration is not supported, not planned or not cross-validated, or no site
        could ensemble a pair.
    """
    configurations = settings.find_best_configuration.split()
    fix = "find-best-configuration needs the federation's plans, which planning writes (run a training run first)"
    plans = read_required_json(settings.server_dataset_folder / f"{settings.plans}.json", fix)
    dataset_json = read_required_json(settings.server_dataset_folder / "dataset.json", fix)
    try:
        check_configurations(configurations, list(plans.get("configurations", {})))
    except ModelSelectionError as error:
        raise ServerConfigError(f"find-best-configuration: {error}") from None
    results = settings.results_dir / settings.dataset
    models = [model_identifier(settings.trainer, settings.plans, c) for c in configurations]
    merged = {model: _merged_results(results / model, c) for model, c in zip(models, configurations)}
    labels = DatasetLabels.from_plans(plans, dataset_json)
    nodes = wait_for_nodes(
        grid, settings.min_available_nodes, max(settings.node_wait, 0.0), what="find-best-configuration"
    )
    scores: dict[str, float] = {}
    ensembles: dict[str, dict] = {}
    compared = candidates(models, FOLDS)
    for candidate in compared:
        name, members = candidate
        if len(members) == 1:
            scores[name] = float(merged[name]["foreground_dice"])
            continue
        ensembles[name], scores[name] = _ensemble(
            grid, nodes, candidate, results / "ensembles" / name, labels, settings
        )
    best = next(c for c in compared if c[0] == best_candidate(scores))
    if len(best[1]) == 1:
        source = merged_folder(results / best[0])
        decision = merged[best[0]]["postprocessing"]
        post_pp = scores[best[0]] if decision is None else decision["postprocessed"]["foreground_mean"]["Dice"]
    else:
        source = results / "ensembles" / best[0]
        decision = write_postprocessing(ensembles[best[0]], labels, source)
        post_pp = scores[best[0]] if decision is None else decision.after["foreground_mean"]["Dice"]
    information = inference_information(
        settings.dataset,
        configurations,
        trainer=settings.trainer,
        plans=settings.plans,
        folds=FOLDS,
        scores=scores,
        best=best,
        post_pp_dice=post_pp,
        source=source,
    )
    data, text = write_inference_information(information, settings.results_dir)
    for name, score in scores.items():
        log(INFO, "find-best-configuration: %-70s foreground Dice %.4f", name, score)
    log(
        INFO,
        "find-best-configuration: best %s (%.4f, %.4f after postprocessing); %s and %s",
        best[0],
        scores[best[0]],
        post_pp,
        data,
        text,
    )
    return information
