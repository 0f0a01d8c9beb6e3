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
In a run, a site lost on the way (the SuperLink answers for it, or it does not
answer) is left out while ``min-available-nodes`` sites answer; the run's grid
then gives it the plans before its first instruction should it come back
(:class:`PlansForLateSites`). With fewer, planning stops naming the lost nodes
and the fix.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
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
    "PlansForLateSites",
    "ask_sites",
    "check_planning_settings",
    "plan_federation",
    "plan_with_sites",
    "plans_query",
    "query_sites",
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

    def narrowed(self, plans: dict, configuration: str) -> dict:
        """``plans`` as these options narrow them: the widths divided and capped, only ``configuration`` kept."""
        from flwr_nnunet.nnunet.planning import shrink_plans

        if self.max_features > 0 or self.width_divisor > 1:
            plans = shrink_plans(
                plans, max_features=self.max_features or 10**9, width_divisor=max(1, self.width_divisor)
            )
        if self.only_configuration:
            plans = {**plans, "configurations": {configuration: plans["configurations"][configuration]}}
        return plans


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
    with_plans: frozenset[int] = frozenset()
    """The node ids that installed the plans (a site lost during planning is not one of them)."""


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
    grid: Any,
    node_ids: list[int],
    stage: str,
    config: Mapping[str, Any],
    timeout: float,
    *,
    needed: int | None = None,
) -> dict[int, tuple]:
    """Send one planning query to every node; ``{node id: (site name, answer)}`` of the nodes that answered.

    A node is *lost* when the SuperLink answered in its place (named by its own id) or it sent no answer within
    ``timeout``; planning goes on without the lost nodes (logged, naming them) while at least ``needed`` nodes
    answered (default: every node).

    Raises
    ------
    PlanningPhaseError
        Naming each node that answered with its own error or a malformed answer (and why), or, when fewer than
        ``needed`` answered, each lost node and the fix.
    """
    answers, problems, lost = query_sites(grid, node_ids, stage, config, timeout)
    if problems:
        named = "; ".join(f"node {node}: {why}" for node, why in {**problems, **lost}.items())
        raise PlanningPhaseError(f"federated planning ({stage}) stopped: {named}")
    if lost:
        _go_on_without(lost, stage, len(answers), len(node_ids) if needed is None else needed)
    return answers


def query_sites(
    grid: Any, node_ids: list[int], stage: str, config: Mapping[str, Any], timeout: float
) -> tuple[dict[int, tuple], dict[int, str], dict[int, str]]:
    """One query (``planning-stage`` ``stage``) to every node: the answers ``{node id: (site name, answer)}``, the
    nodes that answered an error or a malformed answer (node id -> why), and the lost nodes (node id -> why)."""
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
    answers, problems, lost = {}, {}, {}
    for reply in replies:
        node = int(reply.metadata.src_node_id)
        if node == SUPERLINK_NODE_ID:  # the SuperLink answered for a lost node: name the node, not the SuperLink
            node = int(sent_to.get(reply.metadata.reply_to_message_id, node))
            lost[node] = error_reason(reply, node)
        elif reply.has_error():
            problems[node] = error_reason(reply, node)
        else:
            try:
                about = reply.content["config"]
                answers[node] = (str(about["site-name"]), json.loads(about["planning"]))
            except (KeyError, TypeError, ValueError) as error:
                problems[node] = f"a malformed {stage} answer ({error})"
    lost |= {
        n: f"no answer within {timeout:.0f} s (run-config round-timeout)"
        for n in node_ids
        if n not in {*answers, *problems, *lost}
    }
    return answers, problems, lost


def _go_on_without(lost: Mapping[int, str], stage: str, answered: int, needed: int) -> None:
    """Log the ``lost`` nodes (node id -> why) when ``answered`` meets ``needed``; else stop, naming the fix."""
    named = "; ".join(f"node {node}: {why}" for node, why in lost.items())
    if answered < max(1, needed):
        raise PlanningPhaseError(
            f"federated planning ({stage}) stopped: {named}; {answered} site(s) answered, fewer than the "
            f"{needed} needed (run-config min-available-nodes). Nothing was trained and the server's plans and "
            "checkpoints are as they were: start the lost SuperNodes and submit the run again (resume=true "
            "continues from the last checkpoint), or lower run-config min-available-nodes"
        )
    log(
        WARNING,
        "flwr-nnunet: federated planning (%s) goes on with the %d site(s) that answered (min-available-nodes %d) "
        "without %s; a lost site that comes back gets the plans before its first instruction",
        stage,
        answered,
        needed,
        named,
    )


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
    from flwr_nnunet.nnunet.planning import plan_from_fingerprint

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
    return options.narrowed(plans, configuration), dataset_json, fingerprint


def plans_query(plans: dict, dataset_json: dict, fingerprint: dict, configuration: str) -> dict[str, str]:
    """The ``plans`` stage's config: what a site installs and preprocesses with."""
    return {
        "plans": json.dumps(plans),
        "dataset-json": json.dumps(dataset_json),
        "fingerprint": json.dumps(fingerprint),
        "configuration": configuration,
    }


def _send_plans(ask: Ask, plans: dict, dataset_json: dict, fingerprint: dict, configuration: str) -> dict:
    """The plans to the sites ``ask`` reaches; ``{site key: site name}`` of those that installed them.

    Raises
    ------
    PlanningPhaseError
        If a site installed other plans.
    """
    from flwr_nnunet.nnunet.digests import plans_sha256

    digest = plans_sha256(plans)
    log(INFO, "flwr-nnunet: federated planning: plans %s (sha256 %s) to every site", plans["plans_name"], digest[:12])
    answers = ask("plans", plans_query(plans, dataset_json, fingerprint, configuration))
    wrong = [
        f"{name} has {answer.get('plans-sha256')}"
        for name, answer in answers.values()
        if answer.get("plans-sha256") != digest
    ]
    if wrong:
        raise PlanningPhaseError(f"sites installed other plans than {digest}: {'; '.join(wrong)}")
    return {key: name for key, (name, _) in answers.items()}


def plan_with_sites(ask: Ask, settings: Any, options: PlanningOptions | None = None) -> PlanningResult:
    """The three stages over ``ask``; the plans written to ``settings.server_dataset_folder`` and sent to every site.

    ``settings`` is the run's :class:`~flwr_nnunet.apps.run_config.RunSettings` (``planner``, ``plans``,
    ``configuration``, ``dataset``); ``options`` default to :meth:`PlanningOptions.from_settings`.
    The sites' statistics are merged in the order of their names, so the plans do not depend on node ids.
    A site whose label volumes contradict the others' is logged as a warning
    (:func:`~flwr_nnunet.nnunet.label_convention.label_convention_warnings`); planning goes on. A site ``ask``
    no longer reaches (:func:`ask_sites`: lost, while enough others answer) leaves the later stages: the
    fingerprint merges the statistics of the sites that sent them.

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
    from flwr_nnunet.nnunet.label_sets import UNANNOTATED_DRAWN_AS
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
            "marginal loss (each other label merged with %s) and is scored on its own labels",
            site,
            share,
            list(labels),
            _drawn_as_words(surveys[site].get(UNANNOTATED_DRAWN_AS)),
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
    surveys = {name: survey for name, survey in surveys.items() if name in statistics}  # without the lost sites
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
    holders = _send_plans(ask, plans, dataset_json, fingerprint, settings.configuration)
    warned = {node: label_warnings[name] for node, name in names.items() if name in label_warnings}
    return PlanningResult(plans, dataset_json, fingerprint, Path(folder), names, warned, frozenset(holders))


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


def _drawn_as_words(drawn_as: Mapping[str, str] | None) -> str:
    """What a site drew its unannotated labels as, in words for the log."""
    within = ", ".join(f"{name!r} with {into!r}" for name, into in (drawn_as or {}).items())
    return f"background; {within}" if within else "background"


def _partial_labels(surveys: Mapping[str, Mapping], labels: Mapping[str, int] | None) -> dict[str, list[str]]:
    """The sites that annotated a subset of the declared ``labels``, with their labels (none without a declared set).

    Raises
    ------
    PlanningPhaseError
        If a site declares a label outside the set, or no site annotated one of it.
    """
    from flwr_nnunet.nnunet.label_sets import UNANNOTATED_DRAWN_AS, partial_label_shares

    if labels is None:
        return {}
    try:
        return partial_label_shares(
            {site: survey["labels"] for site, survey in surveys.items()},
            labels,
            {site: survey.get(UNANNOTATED_DRAWN_AS) for site, survey in surveys.items()},
        )
    except ValueError as error:
        raise PlanningPhaseError(f"federated planning stopped before training: {error}") from None


class _SiteQueries:
    """``ask`` over a grid: each stage to the nodes that answered the one before (:func:`ask_sites` leaves the
    lost ones out while ``needed`` answer)."""

    def __init__(self, grid: Any, nodes: list[int], needed: int, timeout: float):
        self.grid, self.nodes, self.needed, self.timeout = grid, nodes, needed, timeout

    def __call__(self, stage: str, config: Mapping[str, Any]) -> dict[int, tuple]:
        answers = ask_sites(self.grid, self.nodes, stage, config, self.timeout, needed=self.needed)
        self.nodes = [node for node in self.nodes if node in answers]
        return answers


def _grid_ask(grid: Any, settings: Any) -> Ask:
    nodes = _node_ids(grid, int(settings.min_available_nodes), float(settings.node_wait))
    log(INFO, "flwr-nnunet: federated planning with %d site(s)", len(nodes))
    return _SiteQueries(grid, nodes, int(settings.min_available_nodes), float(settings.round_timeout))


def run_planning_phase(grid: Any, settings: Any, options: PlanningOptions | None = None) -> PlanningResult:
    """The planning phase of a run (:func:`plan_with_sites` over Flower query messages to the connected nodes).

    Waits for ``min-available-nodes`` (at most ``node-wait`` seconds); each stage waits ``round-timeout``. A node
    lost on the way (the SuperLink answers for it, or it does not answer) is left out while at least
    ``min-available-nodes`` answer; it gets the plans before its first instruction should it come back
    (:class:`PlansForLateSites`).

    Raises
    ------
    PlanningPhaseError
        If too few nodes connect or answer, a site fails, or the sites' datasets disagree (naming sites and fields).
    """
    check_planning_settings(settings)
    return plan_with_sites(_grid_ask(grid, settings), settings, options)


def _read_plans(settings: Any) -> tuple[dict, dict, dict]:
    """``(plans, dataset_json, fingerprint)`` in the server's dataset folder (those of an earlier planning)."""
    folder = settings.server_dataset_folder
    return tuple(
        json.loads((folder / name).read_text())
        for name in (f"{settings.plans}.json", "dataset.json", "dataset_fingerprint.json")
    )


def resend_plans(grid: Any, settings: Any) -> PlanningResult:
    """For a resumed run: the plans already in the server's dataset folder to every site (no new planning).

    The sites preprocess with them where they have not yet; a lost site is left out as in
    :func:`run_planning_phase`. Returns them with the nodes that installed them.

    Raises
    ------
    PlanningPhaseError
        If too few sites answer, a site fails, or one installed other plans.
    """
    plans, dataset_json, fingerprint = _read_plans(settings)
    holders = _send_plans(_grid_ask(grid, settings), plans, dataset_json, fingerprint, settings.configuration)
    folder = settings.server_dataset_folder
    return PlanningResult(plans, dataset_json, fingerprint, folder, holders, with_plans=frozenset(holders))


class PlansForLateSites:
    """A grid that gives a node the run's plans before its first train or evaluate instruction, where the planning
    phase did not reach it (it was lost, or it joined later); every other call goes to ``grid`` as it is.

    A node is asked once (the ``plans`` stage, waiting ``round-timeout``); one that does not install the plans
    is logged, and its instruction still goes out: the site refuses an instruction whose ``plans-sha256`` it
    does not hold, as a failure of that round.
    """

    def __init__(self, grid: Any, planned: PlanningResult, settings: Any):
        self._grid = grid
        self._asked = set(planned.with_plans)
        self._query = plans_query(planned.plans, planned.dataset_json, planned.fingerprint, settings.configuration)
        self._timeout = float(settings.round_timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
        """Flower's ``Grid.push_messages``, after the plans went to the nodes that lack them."""
        messages = list(messages)
        self._plan_late_nodes(messages)
        return self._grid.push_messages(messages)

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Iterable[Any]:
        """Flower's ``Grid.send_and_receive``, after the plans went to the nodes that lack them."""
        messages = list(messages)
        self._plan_late_nodes(messages)
        return self._grid.send_and_receive(messages, timeout=timeout)

    def _plan_late_nodes(self, messages: list[Any]) -> None:
        from flwr.app import MessageType

        instructed = (MessageType.TRAIN, MessageType.EVALUATE)
        late = sorted(
            {int(m.metadata.dst_node_id) for m in messages if m.metadata.message_type in instructed} - self._asked
        )
        if not late:
            return
        self._asked.update(late)
        log(INFO, "flwr-nnunet: node(s) %s missed the planning phase: the run's plans go to them first", late)
        answers, problems, lost = query_sites(self._grid, late, "plans", self._query, self._timeout)
        for node, (name, answer) in answers.items():
            log(INFO, "flwr-nnunet: %s (node %d) installed the plans %s", name, node, answer.get("plans-sha256"))
        for node, why in {**problems, **lost}.items():
            log(
                WARNING,
                "flwr-nnunet: node %d did not install the plans (%s); its instruction goes out all the "
                "same and is refused",
                node,
                why,
            )
