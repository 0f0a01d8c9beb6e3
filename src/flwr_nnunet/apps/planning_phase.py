"""The server's planning phase: one set of nnU-Net plans from every site's statistics, before round 1.

Three rounds of Flower ``query`` messages (the sites' side:
:mod:`flwr_nnunet.apps.site_planning`):

1. ``survey``: each site's dataset.json fields, reader/writer, case count,
   foreground min/max and voxels per label. Sites that disagree on channel
   names, labels (or regions), file ending or reader stop the run here, before
   any training, with a message naming the sites and fields; a site whose label
   volumes contradict every other site's (two labels' volume ratio reversed, a
   label missing) is named in a warning, and the run goes on.
2. ``statistics``: with the bins over the federation's foreground range and
   nnU-Net's per-case sample count, each site's aggregate statistics; the
   server merges them exactly (:func:`~flwr_nnunet.nnunet.fingerprint.merge_site_statistics`)
   and runs nnU-Net's planner on the merged fingerprint, supplying the
   reader/writer the sites reported (the server holds no image).
3. ``plans``: the plans, ``dataset.json`` and fingerprint go to every site,
   which preprocesses its cases (or finds them preprocessed with the same
   plans) and answers the plans digest.

The plans, ``dataset.json`` and ``dataset_fingerprint.json`` are written to
the server's dataset folder (``<data-root>/server/nnUNet_preprocessed/<dataset>``),
where :func:`flwr_nnunet.apps.server.build_strategy` reads them. A resumed run
does not plan again: :func:`resend_plans` sends the plans already there (those
its checkpoints were trained with) in the third stage alone.

The stages run over any ``ask(stage, config)`` that returns each site's answer
(:func:`plan_with_sites`): Flower query messages in a run, the sites' own
functions called in one process for the demo (:mod:`flwr_nnunet.demo.data`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.supercore import log

from flwr_nnunet.errors import FlwrNnUNetError

__all__ = [
    "PLANNING_MODES",
    "Ask",
    "PlanningOptions",
    "PlanningPhaseError",
    "PlanningResult",
    "ask_sites",
    "check_planning_settings",
    "plan_federation",
    "plan_with_sites",
    "resend_plans",
    "run_planning_phase",
]

PLANNING_MODES = ("fixed", "federated")
"""Run-config ``planning``: the plans file on the server as it is, or plans made before round 1 from the sites."""


Ask = Callable[[str, Mapping[str, Any]], Mapping[Any, tuple[str, dict]]]
"""``ask(stage, config)``: one planning query to every site, ``{site key: (site name, answer)}``."""


class PlanningPhaseError(FlwrNnUNetError, RuntimeError):
    """The planning phase cannot finish (a site failed or did not answer, or the sites disagree)."""


@dataclass(frozen=True)
class PlanningOptions:
    """How the planned plans are narrowed, and how many foreground samples each case gives.

    Attributes
    ----------
    max_features, width_divisor
        Every stage's width divided by ``width_divisor``, then capped at ``max_features`` (0 and 1: nnU-Net's).
    only_configuration
        Keep only the run's configuration in the plans (nnU-Net plans several).
    samples_per_case
        Foreground samples per case for the intensity statistics (0: nnU-Net's rule, 1e8 over the
        federation's cases).
    """

    max_features: int = 0
    width_divisor: int = 1
    only_configuration: bool = False
    samples_per_case: int = 0

    @classmethod
    def from_settings(cls, settings: Any) -> PlanningOptions:
        """Run-config ``plans-max-features`` and ``plans-width-divisor``; nnU-Net's sample count, every configuration."""
        return cls(int(settings.plans_max_features), int(settings.plans_width_divisor))


@dataclass(frozen=True)
class PlanningResult:
    """What the planning phase produced (also written to ``folder``)."""

    plans: dict
    dataset_json: dict
    fingerprint: dict
    folder: Path
    sites: dict[int, str]
    """Node id -> site name."""
    label_warnings: dict[int, str] = field(default_factory=dict)
    """Node id -> the label-convention warning naming that site
    (:func:`~flwr_nnunet.nnunet.label_convention.label_convention_warnings`)."""


def check_planning_settings(settings: Any) -> None:
    """Run-config ``planning``, ``planner`` and ``plans`` must fit together; checked before any data are made.

    Raises
    ------
    PlanningPhaseError
        Naming the key to change and its accepted values.
    """
    from flwr_nnunet.nnunet.planning import PLANNERS

    if settings.planning not in PLANNING_MODES:
        raise PlanningPhaseError(
            f"unknown planning {settings.planning!r}: set run-config planning to 'federated' (plan from the sites' "
            "statistics before round 1) or 'fixed' (use the plans file on the server)"
        )
    if settings.planning != "federated":
        return
    if str(settings.planner).strip().lower() not in PLANNERS:
        raise PlanningPhaseError(
            f"unknown planner {settings.planner!r}: set run-config planner to one of {', '.join(PLANNERS)}"
        )
    plans_name = PLANNERS[str(settings.planner).strip().lower()][1]
    if settings.plans != plans_name:
        raise PlanningPhaseError(
            f"planner {settings.planner!r} writes plans {plans_name!r} but run-config plans is {settings.plans!r}: "
            f"set plans='{plans_name}'"
        )


def _node_ids(grid: Any, wanted: int, wait: float) -> list[int]:
    deadline = time.monotonic() + max(0.0, wait)
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= wanted or (wait >= 0 and time.monotonic() >= deadline):
            break
        time.sleep(1.0)
    if len(nodes) < max(1, wanted):
        raise PlanningPhaseError(
            f"federated planning needs every site: {len(nodes)} node(s) connected after {wait:.0f} s, "
            f"min-available-nodes is {wanted}; start the missing SuperNodes or lower min-available-nodes"
        )
    return nodes


def ask_sites(
    grid: Any, node_ids: list[int], stage: str, config: Mapping[str, Any], timeout: float
) -> dict[int, tuple]:
    """Send one planning query to every node; ``{node id: (site name, answer)}`` once all have answered.

    Raises
    ------
    PlanningPhaseError
        Naming each node that answered with an error (and its reason; a node the SuperLink answered for, lost,
        by its own id) or not at all.
    """
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID

    from flwr_nnunet.strategy.validator import error_reason, instruction_nodes

    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"planning-stage": stage, **config})}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
            group_id=f"planning-{stage}",
        )
        for node in node_ids
    ]
    replies = grid.send_and_receive(messages, timeout=timeout)
    sent_to = instruction_nodes(messages)  # the grid gave each instruction its id as it pushed it
    answers, problems = {}, []
    for reply in replies:
        node = int(reply.metadata.src_node_id)
        if node == SUPERLINK_NODE_ID:  # the SuperLink answered for a lost node: name the node, not the SuperLink
            node = int(sent_to.get(reply.metadata.reply_to_message_id, node))
        if reply.has_error():
            problems.append(f"node {node}: {error_reason(reply, node)}")
            continue
        try:
            about = reply.content["config"]
            answers[node] = (str(about["site-name"]), json.loads(about["planning"]))
        except (KeyError, TypeError, ValueError) as error:
            problems.append(f"node {node}: a malformed {stage} answer ({error})")
    missing = [n for n in node_ids if n not in answers and not any(p.startswith(f"node {n}:") for p in problems)]
    problems += [f"node {n}: no answer within {timeout:.0f} s" for n in missing]
    if problems:
        raise PlanningPhaseError(f"federated planning ({stage}) stopped: " + "; ".join(problems))
    return answers


def plan_federation(
    surveys: Mapping[str, Mapping],
    statistics: Mapping[str, Mapping],
    bins: list[dict],
    *,
    dataset: str,
    planner: str,
    plans_name: str,
    configuration: str,
    options: PlanningOptions = PlanningOptions(),
    labels: Mapping[str, int] | None = None,
) -> tuple[dict, dict, dict]:
    """``(plans, dataset_json, fingerprint)`` from the sites' surveys and statistics (keyed by site name); the
    dataset.json's labels are the declared ``labels`` when given (partial labels), else the sites' own."""
    from flwr_nnunet.nnunet.fingerprint import federation_dataset_json, merge_site_statistics
    from flwr_nnunet.nnunet.planning import plan_from_fingerprint, shrink_plans

    fingerprint = merge_site_statistics([statistics[name] for name in surveys], bins)
    dataset_json = federation_dataset_json(surveys, name=dataset, labels=labels)
    reader_writer = next(iter(surveys.values()))["reader_writer"]
    plans = plan_from_fingerprint(
        fingerprint, dataset_json, dataset, reader_writer, planner=planner, plans_name=plans_name
    )
    if configuration not in plans["configurations"]:
        raise PlanningPhaseError(
            f"nnU-Net planned {', '.join(sorted(plans['configurations']))} for this federation, not "
            f"{configuration!r}: set run-config configuration to one of them"
        )
    if options.max_features > 0 or options.width_divisor > 1:
        plans = shrink_plans(
            plans, max_features=options.max_features or 10**9, width_divisor=max(1, options.width_divisor)
        )
    if options.only_configuration:
        plans["configurations"] = {configuration: plans["configurations"][configuration]}
    return plans, dataset_json, fingerprint


def _send_plans(ask: Ask, plans: dict, dataset_json: dict, fingerprint: dict, configuration: str) -> None:
    from flwr_nnunet.nnunet.digests import plans_sha256

    digest = plans_sha256(plans)
    log(INFO, "flwr-nnunet: federated planning: plans %s (sha256 %s) to every site", plans["plans_name"], digest[:12])
    config = {
        "plans": json.dumps(plans),
        "dataset-json": json.dumps(dataset_json),
        "fingerprint": json.dumps(fingerprint),
        "configuration": configuration,
    }
    answers = ask("plans", config)
    wrong = [
        f"{name} has {answer.get('plans-sha256')}"
        for name, answer in answers.values()
        if answer.get("plans-sha256") != digest
    ]
    if wrong:
        raise PlanningPhaseError(f"sites installed other plans than {digest}: {'; '.join(wrong)}")


def plan_with_sites(ask: Ask, settings: Any, options: PlanningOptions | None = None) -> PlanningResult:
    """The three stages over ``ask``; the plans written to ``settings.server_dataset_folder`` and sent to every site.

    ``settings`` is the run's :class:`~flwr_nnunet.apps.run_config.RunSettings` (``planner``, ``plans``,
    ``configuration``, ``dataset``); ``options`` default to :meth:`PlanningOptions.from_settings`.
    The sites' statistics are merged in the order of their names, so the plans do not depend on node ids.
    A site whose label volumes contradict the others' is logged as a warning
    (:func:`~flwr_nnunet.nnunet.label_convention.label_convention_warnings`); planning goes on.

    Raises
    ------
    PlanningPhaseError
        If the sites' datasets disagree (naming sites and fields), or a site installed other plans.
    """
    from flwr_nnunet.nnunet.fingerprint import (
        NNUNET_FOREGROUND_SAMPLES,
        FederationMismatchError,
        agreed_bins,
        check_consistency,
        samples_per_case,
    )
    from flwr_nnunet.nnunet.label_convention import label_convention_warnings
    from flwr_nnunet.nnunet.planning import install_plans, planner_preset

    check_planning_settings(settings)
    options = options or PlanningOptions.from_settings(settings)
    planner, plans_name = planner_preset(settings.planner)
    answers = ask("survey", {})
    names = {key: name for key, (name, _) in answers.items()}
    surveys = {name: answer for name, answer in sorted(answers.values(), key=lambda item: item[0])}
    labels = declared_labels(settings)
    try:
        check_consistency(surveys, labels)
    except FederationMismatchError as error:
        raise PlanningPhaseError(f"federated planning stopped before training: {error}") from None
    for site, share in _partial_labels(surveys, labels).items():
        log(
            INFO,
            "flwr-nnunet: federated planning: %s annotated %s of the federation's labels %s: it trains with the "
            "marginal loss (the others merged with background) and is scored on its own labels",
            site,
            share,
            list(labels),
        )
    label_warnings = label_convention_warnings(surveys)
    for line in label_warnings.values():
        log(WARNING, "flwr-nnunet: federated planning: %s", line)
    bins = agreed_bins(surveys)
    total_cases = sum(int(s["num_cases"]) for s in surveys.values())
    samples = options.samples_per_case or samples_per_case(total_cases, NNUNET_FOREGROUND_SAMPLES)
    log(INFO, "flwr-nnunet: federated planning: statistics (%d foreground samples per case)", samples)
    answers = ask("statistics", {"bins": json.dumps(bins), "samples-per-case": samples})
    statistics = dict(answers.values())
    plans, dataset_json, fingerprint = plan_federation(
        surveys,
        statistics,
        bins,
        dataset=settings.dataset,
        planner=planner,
        plans_name=plans_name,
        configuration=settings.configuration,
        options=options,
        labels=labels,
    )
    folder = settings.server_dataset_folder
    install_plans(plans, dataset_json, folder, fingerprint)
    _send_plans(ask, plans, dataset_json, fingerprint, settings.configuration)
    warned = {node: label_warnings[name] for node, name in names.items() if name in label_warnings}
    return PlanningResult(plans, dataset_json, fingerprint, Path(folder), names, warned)


def declared_labels(settings: Any) -> dict[str, int] | None:
    """Run-config ``labels``, the federation's declared label set (:mod:`flwr_nnunet.nnunet.label_sets`), or None.

    Raises
    ------
    PlanningPhaseError
        If it is not nnU-Net's background 0 and consecutive values, naming the form that fits.
    """
    from flwr_nnunet.nnunet.label_sets import check_label_set

    if not settings.labels:
        return None
    try:
        return check_label_set(settings.labels)
    except ValueError as error:
        raise PlanningPhaseError(str(error)) from None


def _partial_labels(surveys: Mapping[str, Mapping], labels: Mapping[str, int] | None) -> dict[str, list[str]]:
    """The sites that annotated a subset of the declared ``labels``, with their labels (none without a declared set).

    Raises
    ------
    PlanningPhaseError
        If a site declares a label outside the set, or no site annotated one of it.
    """
    from flwr_nnunet.nnunet.label_sets import partial_label_shares

    if labels is None:
        return {}
    try:
        return partial_label_shares({site: survey["labels"] for site, survey in surveys.items()}, labels)
    except ValueError as error:
        raise PlanningPhaseError(f"federated planning stopped before training: {error}") from None


def _grid_ask(grid: Any, settings: Any) -> Ask:
    nodes = _node_ids(grid, int(settings.min_available_nodes), float(settings.node_wait))
    timeout = float(settings.round_timeout)
    log(INFO, "flwr-nnunet: federated planning with %d site(s)", len(nodes))
    return lambda stage, config: ask_sites(grid, nodes, stage, config, timeout)


def run_planning_phase(grid: Any, settings: Any, options: PlanningOptions | None = None) -> PlanningResult:
    """The planning phase of a run (:func:`plan_with_sites` over Flower query messages to the connected nodes).

    Waits for ``min-available-nodes`` (at most ``node-wait`` seconds); each stage waits ``round-timeout``.

    Raises
    ------
    PlanningPhaseError
        If too few nodes connect, a site fails or does not answer, or the sites' datasets disagree
        (naming sites and fields).
    """
    check_planning_settings(settings)
    return plan_with_sites(_grid_ask(grid, settings), settings, options)


def resend_plans(grid: Any, settings: Any) -> Path:
    """For a resumed run: the plans already in the server's dataset folder to every site (no new planning).

    The sites preprocess with them where they have not yet. Returns the plans file.

    Raises
    ------
    PlanningPhaseError
        If a site fails or does not answer, or installed other plans.
    """
    folder = settings.server_dataset_folder
    plans_file = folder / f"{settings.plans}.json"
    plans, dataset_json, fingerprint = (
        json.loads((folder / name).read_text())
        for name in (plans_file.name, "dataset.json", "dataset_fingerprint.json")
    )
    _send_plans(_grid_ask(grid, settings), plans, dataset_json, fingerprint, settings.configuration)
    return plans_file
