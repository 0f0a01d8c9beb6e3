"""The server's planning phase: one set of nnU-Net plans from every site's statistics, before round 1.

Three rounds of Flower ``query`` messages (the sites' side:
:mod:`flwr_nnunet.apps.site_planning`):

1. ``survey``: each site's dataset.json fields, reader/writer, case count and
   foreground min/max. Sites that disagree on channel names, labels (or
   regions), file ending or reader stop the run here, before any training,
   with a message naming the sites and fields.
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
where :func:`flwr_nnunet.apps.server.build_strategy` reads them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.supercore import log

from flwr_nnunet.errors import FlwrNnUNetError

__all__ = [
    "PLANNING_MODES",
    "PlanningPhaseError",
    "PlanningResult",
    "ask_sites",
    "check_planning_settings",
    "plan_federation",
    "run_planning_phase",
]

PLANNING_MODES = ("fixed", "federated")
"""Run-config ``planning``: the plans file on the server as it is, or plans made before round 1 from the sites."""


class PlanningPhaseError(FlwrNnUNetError, RuntimeError):
    """The planning phase cannot finish (a site failed or did not answer, or the sites disagree)."""


@dataclass(frozen=True)
class PlanningResult:
    """What the planning phase produced (also written to ``folder``)."""

    plans: dict
    dataset_json: dict
    fingerprint: dict
    folder: Path
    sites: dict[int, str]
    """Node id -> site name."""


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
        Naming each node that answered with an error (and its reason) or not at all.
    """
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"planning-stage": stage, **config})}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
            group_id=f"planning-{stage}",
        )
        for node in node_ids
    ]
    answers, problems = {}, []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = int(reply.metadata.src_node_id)
        if reply.has_error():
            problems.append(f"node {node}: {reply.error.reason}")
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
    max_features: int = 0,
    width_divisor: int = 1,
) -> tuple[dict, dict, dict]:
    """``(plans, dataset_json, fingerprint)`` from the sites' surveys and statistics (keyed by site name)."""
    from flwr_nnunet.nnunet.fingerprint import federation_dataset_json, merge_site_statistics
    from flwr_nnunet.nnunet.planning import plan_from_fingerprint, shrink_plans

    fingerprint = merge_site_statistics([statistics[name] for name in surveys], bins)
    dataset_json = federation_dataset_json(surveys, name=dataset)
    reader_writer = next(iter(surveys.values()))["reader_writer"]
    plans = plan_from_fingerprint(
        fingerprint, dataset_json, dataset, reader_writer, planner=planner, plans_name=plans_name
    )
    if configuration not in plans["configurations"]:
        raise PlanningPhaseError(
            f"nnU-Net planned {', '.join(sorted(plans['configurations']))} for this federation, not "
            f"{configuration!r}: set run-config configuration to one of them"
        )
    if max_features > 0 or width_divisor > 1:
        plans = shrink_plans(plans, max_features=max_features or 10**9, width_divisor=max(1, width_divisor))
    return plans, dataset_json, fingerprint


def run_planning_phase(grid: Any, settings: Any, *, total_samples: float | None = None) -> PlanningResult:
    """The planning phase of a run (:mod:`this module <flwr_nnunet.apps.planning_phase>`), from its settings.

    ``settings`` is the run's :class:`~flwr_nnunet.apps.run_config.RunSettings`
    (``planner``, ``plans``, ``configuration``, ``dataset``, ``plans-max-features``,
    ``plans-width-divisor``, ``min-available-nodes``, ``node-wait``, ``round-timeout``).
    ``total_samples`` is the foreground samples over the federation (default nnU-Net's 1e8,
    :data:`~flwr_nnunet.nnunet.fingerprint.NNUNET_FOREGROUND_SAMPLES`), split equally over the cases.

    Raises
    ------
    PlanningPhaseError
        If a site fails, does not answer, or the sites' datasets disagree (naming sites and fields).
    """
    from flwr_nnunet.nnunet.digests import plans_sha256
    from flwr_nnunet.nnunet.fingerprint import (
        NNUNET_FOREGROUND_SAMPLES,
        FederationMismatchError,
        agreed_bins,
        check_consistency,
        samples_per_case,
    )
    from flwr_nnunet.nnunet.planning import install_plans, planner_preset

    check_planning_settings(settings)
    planner, plans_name = planner_preset(settings.planner)
    timeout = float(settings.round_timeout)
    nodes = _node_ids(grid, int(settings.min_available_nodes), float(settings.node_wait))
    log(INFO, "flwr-nnunet: federated planning with %d site(s): survey", len(nodes))
    answers = ask_sites(grid, nodes, "survey", {}, timeout)
    names = {node: name for node, (name, _) in answers.items()}
    surveys = {names[node]: answer for node, (_, answer) in sorted(answers.items())}
    try:
        check_consistency(surveys)
    except FederationMismatchError as error:
        raise PlanningPhaseError(f"federated planning stopped before training: {error}") from None
    bins = agreed_bins(surveys)
    total_cases = sum(int(s["num_cases"]) for s in surveys.values())
    samples = samples_per_case(total_cases, NNUNET_FOREGROUND_SAMPLES if total_samples is None else total_samples)
    log(INFO, "flwr-nnunet: federated planning: statistics (%d foreground samples per case)", samples)
    answers = ask_sites(grid, nodes, "statistics", {"bins": json.dumps(bins), "samples-per-case": samples}, timeout)
    statistics = {names[node]: answer for node, (_, answer) in answers.items()}
    plans, dataset_json, fingerprint = plan_federation(
        surveys,
        statistics,
        bins,
        dataset=settings.dataset,
        planner=planner,
        plans_name=plans_name,
        configuration=settings.configuration,
        max_features=int(settings.plans_max_features),
        width_divisor=int(settings.plans_width_divisor),
    )
    folder = settings.server_dataset_folder
    install_plans(plans, dataset_json, folder, fingerprint)
    digest = plans_sha256(plans)
    log(INFO, "flwr-nnunet: federated planning: plans %s (sha256 %s) to every site", plans_name, digest[:12])
    config = {
        "plans": json.dumps(plans),
        "dataset-json": json.dumps(dataset_json),
        "fingerprint": json.dumps(fingerprint),
        "configuration": settings.configuration,
    }
    answers = ask_sites(grid, nodes, "plans", config, timeout)
    wrong = [
        f"{name} has {answer.get('plans-sha256')}"
        for name, answer in answers.values()
        if answer.get("plans-sha256") != digest
    ]
    if wrong:
        raise PlanningPhaseError(f"sites installed other plans than {digest}: {'; '.join(wrong)}")
    return PlanningResult(plans, dataset_json, fingerprint, Path(folder), names)
