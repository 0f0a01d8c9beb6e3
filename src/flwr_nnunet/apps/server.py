"""The server side of a run: the data plugged in, planning, global nnU-Net network, strategy, rounds.

``server_app.py`` calls :func:`run_server`. It reads the run config
(``[tool.flwr.app.config]``, schema in :mod:`flwr_nnunet.apps.run_config`),
lets the :class:`RunData` the ServerApp plugs in make or check its data with
``make-demo = true`` (the synthetic demo's), plans with the sites before
round 1 (``planning = "federated"``, :mod:`flwr_nnunet.apps.planning_phase`),
builds the global network from the shared plans exactly as the sites' trainer
class builds it, runs the strategy, and leaves behind the nnU-Net model folder
with ``flwr_history.json`` and ``flwr_progress.png`` (:mod:`flwr_nnunet.apps.history`).
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO
from typing import TYPE_CHECKING, Any, Protocol

from flwr.supercore import log

from flwr_nnunet.apps.config_errors import ServerConfigError, install_one_line_errors
from flwr_nnunet.apps.history import RunHistory
from flwr_nnunet.apps.own_plans import check_layer_matching_settings
from flwr_nnunet.apps.run_config import RunSettings
from flwr_nnunet.apps.server_model import (
    global_model_folder,
    global_network,
    round_options,
    server_files,
    strategy_options_named,
)
from flwr_nnunet.strategy.checkpoints import ResumeError

if TYPE_CHECKING:
    from flwr_nnunet.apps.planning_phase import PlanningOptions

__all__ = [
    "PERSONALIZATIONS",
    "RunData",
    "build_strategy",
    "check_personal_settings",
    "check_strategy_settings",
    "finished_round",
    "plan_before_training",
    "planning_options",
    "prepare_data",
    "read_settings",
    "run_server",
]

PERSONALIZATIONS = ("", "mr-mtl")
"""Run-config ``personalization`` values: one global model, or MR-MTL personal models."""


class RunData(Protocol):
    """The data a ServerApp plugs into the run for ``make-demo = true`` (``server_app.py``: the synthetic demo's)."""

    def prepare(self, settings: RunSettings) -> None:
        """Before planning: check the run config against the data, make them under ``data-root`` or check them
        there; a problem is a :class:`ServerConfigError` naming the fix."""

    def planning_options(self, settings: RunSettings) -> PlanningOptions:
        """The planning phase's options for these data."""


def read_settings(run_config: Mapping[str, Any]) -> RunSettings:
    """:meth:`RunSettings.from_run_config`, a bad value reported as a :class:`ServerConfigError`."""
    try:
        return RunSettings.from_run_config(run_config)
    except ValueError as error:
        raise ServerConfigError(f'{error}; fix it in the run config (flwr run . -c "key=value")') from None


def prepare_data(settings: RunSettings, data: RunData | None = None) -> None:
    """With ``make-demo``: ``data`` makes or checks its data under ``data-root`` (:meth:`RunData.prepare`).

    Raises
    ------
    ServerConfigError
        From ``data``, or if no ``data`` was plugged in.
    """
    if settings.make_demo:
        _plugged_in(data).prepare(settings)


def planning_options(settings: RunSettings, data: RunData | None = None) -> PlanningOptions:
    """The planning phase's :class:`~flwr_nnunet.apps.planning_phase.PlanningOptions`: ``data``'s with make-demo."""
    if settings.make_demo:
        return _plugged_in(data).planning_options(settings)
    from flwr_nnunet.apps.planning_phase import PlanningOptions

    return PlanningOptions.from_settings(settings)


def _plugged_in(data: RunData | None) -> RunData:
    if data is None:
        raise ServerConfigError(
            "make-demo=true, but this ServerApp plugs in no data to make (run_server(grid, context, data=None)): "
            "set make-demo=false and data-root to the sites' data, or run server_app.py's ServerApp"
        )
    return data


def build_strategy(settings: RunSettings, run_config: Mapping[str, Any]) -> Any:
    """The global network (from the shared plans) and the named strategy around it, with its model folder; with
    ``layer-matching = "role"`` one global network and model folder per plans the server holds
    (:func:`flwr_nnunet.apps.own_plans.build_role_strategy`)."""
    plans, dataset_json, fingerprint = server_files(settings)
    if settings.layer_matching:
        from flwr_nnunet.apps.own_plans import build_role_strategy

        return build_role_strategy(settings, run_config, plans, dataset_json, fingerprint)
    network = global_network(settings, plans, dataset_json)
    model_folder = global_model_folder(settings, plans, dataset_json, fingerprint)
    options = dict(settings.strategy_options)
    if settings.strategy.replace("-", "").replace("_", "").lower() == "fedprox":
        options.setdefault("proximal_mu", settings.proximal_mu)
    with strategy_options_named(settings):
        return _strategy(settings, network, plans, model_folder, run_config, options)


def _resumes_with_plans(settings: RunSettings) -> bool:
    """resume=true and the server's dataset folder holds the plans (the run resumed was planned before)."""
    return settings.resume and (settings.server_dataset_folder / f"{settings.plans}.json").is_file()


def plan_before_training(
    grid: Any, settings: RunSettings, *, check_only: bool = False, data: RunData | None = None
) -> Any:
    """With ``planning = "federated"``: the planning phase (:mod:`flwr_nnunet.apps.planning_phase`) before round 1.

    With ``resume`` and plans in the server's dataset folder nothing is planned again: those plans (the ones
    the checkpoints were trained with, checked by the resume) go to every site, which preprocesses with them
    where it has not. ``check_only`` checks ``planning`` / ``planner`` / ``plans`` and asks no site; ``data``
    gives the planning options with ``make-demo`` (:func:`planning_options`). Returns the
    :class:`~flwr_nnunet.apps.planning_phase.PlanningResult` of a planning phase or of the plans sent again,
    else None.

    Raises
    ------
    ServerConfigError
        If the planning settings do not fit, or the planning phase stops (a site failed, or the sites' datasets
        disagree: naming the sites and fields), before any training.
    """
    from flwr_nnunet.apps.planning_phase import (
        PlanningPhaseError,
        check_planning_settings,
        resend_plans,
        run_planning_phase,
    )

    try:
        check_planning_settings(settings)
        if settings.planning != "federated" or check_only:
            return None
        if _resumes_with_plans(settings):
            log(INFO, "flwr-nnunet: resume: the run's plans in %s, not planned again", settings.server_dataset_folder)
            return resend_plans(grid, settings)
        return run_planning_phase(grid, settings, planning_options(settings, data))
    except PlanningPhaseError as error:
        raise ServerConfigError(str(error)) from None


def check_strategy_settings(settings: RunSettings) -> None:
    """The run config's ``strategy`` and ``dp`` must name a known strategy and wrapper.

    Raises
    ------
    ServerConfigError
        Naming the accepted values, before any data are made or network built.
    """
    from flwr_nnunet.strategy.registry import DP_WRAPPERS, STRATEGIES

    if settings.strategy.strip().lower().replace("-", "").replace("_", "") not in STRATEGIES:
        raise ServerConfigError(
            f"unknown strategy {settings.strategy!r}: set run-config strategy to one of {', '.join(sorted(STRATEGIES))}"
        )
    if settings.dp and settings.dp not in DP_WRAPPERS:
        raise ServerConfigError(
            f"unknown dp {settings.dp!r}: set run-config dp to one of {', '.join(sorted(DP_WRAPPERS))}, or ''"
        )
    check_compression_settings(settings)
    check_personal_settings(settings)


def check_compression_settings(settings: RunSettings) -> None:
    """``compression`` must name a scheme, and the sites' own DP clipping cannot read compressed messages.

    Raises
    ------
    ServerConfigError
        Naming the key and the values it takes.
    """
    from flwr_nnunet.core.quantize import scheme_named

    try:
        scheme = scheme_named(settings.compression)
    except ValueError as error:
        raise ServerConfigError(f"run-config {error}") from None
    if scheme is not None and settings.dp.startswith("client-"):
        raise ServerConfigError(
            f"run-config dp={settings.dp!r} clips on the sites with Flower's mods, which read the messages' arrays "
            f"as whole models: use compression='none' with it, or dp='server-fixed' / 'server-adaptive' (the "
            f"server clips the decompressed updates)"
        )


def check_personal_settings(settings: RunSettings) -> None:
    """``flagged-weight``, ``personalization``, ``personal-mu`` and ``fine-tune-epochs`` must fit together.

    Raises
    ------
    ServerConfigError
        Naming the key and the values it takes, before any data are made or network built.
    """
    if not 0.0 <= settings.flagged_weight <= 1.0:
        raise ServerConfigError(
            f"run-config flagged-weight must be in [0, 1] (1: keep a flagged site, 0: exclude it), got "
            f"{settings.flagged_weight}"
        )
    if settings.personalization not in PERSONALIZATIONS:
        raise ServerConfigError(
            f"unknown personalization {settings.personalization!r}: set run-config personalization to '' or 'mr-mtl'"
        )
    if settings.personal_mu < 0:
        raise ServerConfigError(f"run-config personal-mu must be >= 0, got {settings.personal_mu}")
    if settings.fine_tune_epochs < 0:
        raise ServerConfigError(f"run-config fine-tune-epochs must be >= 0, got {settings.fine_tune_epochs}")
    if settings.personalization and settings.fine_tune_epochs:
        raise ServerConfigError(
            "personalization='mr-mtl' already gives every site its personal model: set fine-tune-epochs=0, or "
            "personalization='' to fine-tune the global model after the run"
        )


def _strategy(settings, network, plans, model_folder, run_config, options):
    from flwr_nnunet.strategy.registry import strategy_from_name

    return strategy_from_name(
        settings.strategy,
        network=network,
        dp=settings.dp or None,
        dp_options=settings.dp_options,
        plans=plans,
        model_folder=model_folder,
        run_config=dict(run_config),
        compression=settings.compression,
        **round_options(settings),
        **options,
    )


def _core(strategy: Any) -> Any:
    """The NnUNetFedAvg inside a DP wrapper (or the strategy itself)."""
    return getattr(strategy, "strategy", strategy)


def finished_round(folder: Any, num_rounds: int) -> int | None:
    """The round of ``folder``'s newest intact checkpoint when it is ``num_rounds`` or later (the run is done), else None.

    Reads only (nothing is written or logged); a folder without an intact checkpoint gives None (the resume
    itself then reports why).
    """
    from flwr_nnunet.nnunet.checkpoint_io import CheckpointError
    from flwr_nnunet.nnunet.model_folder import STATE_KEY

    try:
        found = folder.load_latest()
    except CheckpointError:
        return None
    if found is None:
        return None
    server_round = int(found[0].get(STATE_KEY, {}).get("server_round", 0))
    return server_round if server_round >= num_rounds else None


def _result(core: Any) -> Any:
    """Flower's ``Result`` holding the global model (for a run that has nothing left to do)."""
    from flwr.serverapp.strategy import Result

    result = Result()
    result.arrays = core.model.record()
    return result


def run_server(grid: Any, context: Any, data: RunData | None = None) -> Any:
    """The ServerApp's main: data, planning, global network, strategy, rounds, model folder, history and plot.

    Every message's arrays travel packed (:class:`~flwr_nnunet.apps.packed_messages.PackedGrid`) unless run-config
    ``packed-arrays`` is false.

    ``data`` is what ``make-demo = true`` makes (``server_app.py`` plugs in the synthetic demo's). Returns
    Flower's ``Result`` of the strategy (a ``find-best-configuration`` run: nnU-Net's inference information,
    :mod:`flwr_nnunet.apps.model_selection`). A :class:`ServerConfigError` is logged as its one line before it ends
    the run.
    """
    from flwr_nnunet.apps.forked_children import default_signals_in_forked_children

    default_signals_in_forked_children()  # nnU-Net's planner forks a pool: its workers must not end the run
    one_line = install_one_line_errors()
    try:
        return _run(grid, context, data)
    except ServerConfigError as error:
        one_line.report(error)
        raise


def _resume(strategy: Any, run_config: Mapping[str, Any]) -> None:
    """``strategy.resume``: the model folder's newest intact checkpoint loaded, a refusal as a ServerConfigError."""
    try:
        strategy.resume(run_config)
    except ResumeError as error:
        raise ServerConfigError(f"resume=true: {error}") from None


def _run(grid: Any, context: Any, data: RunData | None) -> Any:
    from flwr.app import ConfigRecord

    from flwr_nnunet.apps.cross_site import check_cross_site_settings
    from flwr_nnunet.apps.crossval_phase import check_crossval_settings, finish_fold, forget_fold
    from flwr_nnunet.apps.packed_messages import PackedGrid

    settings = read_settings(context.run_config)
    if settings.packed_arrays:
        grid = PackedGrid(grid)
    check_layer_matching_settings(settings)
    if settings.find_best_configuration:  # a model selection run trains nothing
        from flwr_nnunet.apps.model_selection import select_configuration

        return select_configuration(grid, settings)
    check_strategy_settings(settings)
    check_crossval_settings(settings)
    check_cross_site_settings(settings)
    plan_before_training(grid, settings, check_only=True)
    prepare_data(settings, data)
    planned_before = _resumes_with_plans(settings)
    planned = None if planned_before else plan_before_training(grid, settings, data=data)
    strategy = build_strategy(settings, context.run_config)
    core = _core(strategy)
    for node, line in (planned.label_warnings if planned is not None else {}).items():
        name = planned.sites[node]
        core.diagnostics.flag_before_training(node, name, line.removeprefix(f"{name}: "))
    history = RunHistory(
        core.model_folder.fold_dir if settings.crossval else core.model_folder.path,
        dataset=settings.dataset,
        configuration=settings.configuration,
        strategy=settings.strategy + (f" + dp {settings.dp}" if settings.dp else ""),
    )
    core.train_metrics_aggr_fn = history.train_metrics
    core.evaluate_metrics_aggr_fn = history.evaluate_metrics
    core.post_round_fn = lambda server_round, _: history.end_round(
        server_round, diagnostics=core.diagnostics.report(server_round)
    )
    if settings.resume:
        finished = finished_round(core.model_folder, settings.num_rounds)
        if finished is not None:
            log(
                INFO,
                "flwr-nnunet: resume: the run in %s already finished (round %d, num-server-rounds=%d): nothing to "
                "do, nothing written; raise num-server-rounds to train more rounds",
                core.model_folder.path,
                finished,
                settings.num_rounds,
            )
            if settings.crossval:  # unless the sites validated this fold already (then only the merge is tried)
                finish_fold(grid, core, settings, load=lambda: _resume(strategy, context.run_config))
            return _result(core)
        history.load()
        _resume(strategy, context.run_config)
        if planned_before:  # the checkpoint's plans digest checked: these plans to every site
            planned = plan_before_training(grid, settings, data=data)
    if settings.layer_matching:
        from flwr_nnunet.apps.own_plans import survey_site_plans

        survey_site_plans(grid, core, settings)
    log(
        INFO,
        "flwr-nnunet: %s, %s, %d round(s) x %d local epoch(s), strategy %s; global model in %s",
        settings.dataset,
        settings.configuration,
        settings.num_rounds,
        settings.local_epochs,
        settings.strategy,
        core.model_folder.path,
    )
    if settings.crossval:
        forget_fold(core.model_folder, int(settings.fold))
    if planned is not None:  # a site lost during planning gets the plans before its first instruction
        from flwr_nnunet.apps.planning_phase import PlansForLateSites

        grid = PlansForLateSites(grid, planned, settings)
    config = ConfigRecord(settings.train_config())
    result = strategy.start(
        grid,
        num_rounds=settings.num_rounds,
        timeout=settings.round_timeout,
        node_wait=None if settings.node_wait < 0 else settings.node_wait,
        streaming=settings.streaming,
        quorum=settings.quorum,
        grace=settings.grace,
        train_config=config,
        evaluate_config=ConfigRecord(settings.train_config()),
    )
    history.write()
    if settings.crossval and core.checkpoints.completed_rounds >= settings.num_rounds:
        finish_fold(grid, core, settings)
    if settings.fine_tune_epochs and core.checkpoints.completed_rounds >= settings.num_rounds:
        from flwr_nnunet.apps.fine_tuning import fine_tune_sites

        fine_tune_sites(grid, core, settings, history)
    if settings.cross_site_evaluation and core.checkpoints.completed_rounds >= settings.num_rounds:
        from flwr_nnunet.apps.cross_site import evaluate_across_sites

        evaluate_across_sites(grid, core, settings, history.folder)
    return result
