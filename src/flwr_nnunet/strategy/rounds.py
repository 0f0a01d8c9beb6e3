"""Running rounds of an :class:`~flwr_nnunet.strategy.fedavg.NnUNetFedAvg`: Flower's loop that checkpoints and resumes.

``run_rounds`` is ``Strategy.start`` continuing after the last completed round
and writing ``checkpoint_latest.pth`` each round; ``resume_run`` loads the
model folder's newest intact checkpoint into the network and the strategy
state, refusing a run whose plans, run config or strategy differ.
:class:`RoundRunner` gives both as ``start``/``resume`` methods.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Mapping
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info
from flwr.supercore import log

from flwr_nnunet.core.reduce import check_updates
from flwr_nnunet.core.aliasing import AliasConflictError
from flwr_nnunet.nnunet.model_folder import STATE_KEY, CheckpointError

if TYPE_CHECKING:
    from flwr_nnunet.strategy.fedavg import NnUNetFedAvg

__all__ = [
    "RUN_CONFIG_IGNORED_KEYS",
    "ResumeError",
    "RoundRunner",
    "comparable_run_config",
    "resume_run",
    "run_config_sha256",
    "run_rounds",
]


RUN_CONFIG_IGNORED_KEYS = ("num-server-rounds", "resume")
"""Run-config keys a resumed run may change (how far to go, whether to resume)."""


class ResumeError(RuntimeError):
    """A run cannot be resumed from the model folder (different plans, run config or strategy)."""


def comparable_run_config(run_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The run config without :data:`RUN_CONFIG_IGNORED_KEYS`, keys sorted."""
    return {k: v for k, v in sorted((run_config or {}).items()) if k not in RUN_CONFIG_IGNORED_KEYS}


def run_config_sha256(run_config: Mapping[str, Any] | None) -> str:
    """A digest of a run config, ignoring :data:`RUN_CONFIG_IGNORED_KEYS`."""
    text = json.dumps(comparable_run_config(run_config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class RoundRunner:
    """``start`` and ``resume`` for :class:`NnUNetFedAvg` and the wrappers around it (``self.core``)."""

    core: NnUNetFedAvg

    def resume(self, run_config: Mapping[str, Any] | None = None) -> int:
        """Load the model folder's newest intact checkpoint; return the last completed round (0: none).

        :meth:`start` then continues at the next round. See :func:`resume_run`.
        """
        return resume_run(self, self.core, run_config)

    # pylint: disable=too-many-arguments
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run rounds ``core.completed_rounds + 1`` to ``num_rounds`` (see :func:`run_rounds`)."""
        return run_rounds(
            self, self.core, grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn
        )


def resume_run(strategy: Strategy, core: NnUNetFedAvg, run_config: Mapping[str, Any] | None = None) -> int:
    """Continue a killed run: load ``core.model_folder``'s newest intact checkpoint into ``core``'s network.

    Parameters
    ----------
    strategy
        The strategy that runs the rounds (``core`` itself, or a wrapper around it).
    core
        The :class:`NnUNetFedAvg` holding the network and the model folder.
    run_config
        This run's config (default: ``core.run_config``); it must equal the
        killed run's except for :data:`RUN_CONFIG_IGNORED_KEYS`.

    Returns
    -------
    int
        The last completed round (0 when the folder has no checkpoint yet).

    Raises
    ------
    ResumeError
        If there is no model folder, no intact checkpoint, or the plans, run
        config, strategy or network differ from the killed run's.
    """
    folder = core.model_folder
    if folder is None:
        raise ResumeError("resume needs a model_folder to read the run's checkpoints from")
    try:
        found = folder.load_latest()
    except CheckpointError as error:
        raise ResumeError(str(error)) from None
    if found is None:
        log(INFO, "resume: no checkpoint in %s yet; starting at round 1", folder.fold_dir)
        return 0
    checkpoint, path = found
    state = checkpoint[STATE_KEY]
    if state.get("plans_sha256") != core.plans_sha256:
        raise ResumeError(
            f"cannot resume from {path}: it was trained with other plans (plans-sha256 "
            f"{str(state.get('plans_sha256'))[:12]}... vs {str(core.plans_sha256)[:12]}...); use the original plans "
            "or a new results folder"
        )
    if run_config is not None:
        core.run_config = dict(run_config)
    if state.get("run_config_sha256") != run_config_sha256(core.run_config):
        saved = json.loads(state.get("run_config") or "{}")
        current = json.loads(json.dumps(comparable_run_config(core.run_config), default=str))
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:5])
        raise ResumeError(
            f"cannot resume from {path}: the run config differs from the killed run's ({details}); "
            "restore those values or start a new run"
        )
    if state.get("strategy") != type(strategy).__name__:
        raise ResumeError(
            f"cannot resume from {path}: it was written by {state.get('strategy')}, not {type(strategy).__name__}"
        )
    weights = checkpoint["network_weights"]
    try:
        canonical = core.alias_map.collapse(weights)
    except (KeyError, AliasConflictError) as error:
        raise ResumeError(f"cannot resume from {path}: its network differs from this one ({error.args[0]})") from None
    try:
        check_updates(core.all_tensors, [canonical])
    except ValueError as error:
        raise ResumeError(f"cannot resume from {path}: {error}") from None
    core.assign_all_(canonical)
    strategy.load_strategy_state(state.get("strategy_state") or {})
    core.completed_rounds = core.current_round = int(state["server_round"])
    core.best_dice = state.get("best_dice")
    log(
        INFO,
        "resume: loaded round %d from %s; continuing at round %d",
        core.completed_rounds,
        path,
        core.completed_rounds + 1,
    )
    return core.completed_rounds


# pylint: disable=too-many-arguments,too-many-locals
def run_rounds(
    strategy: Strategy,
    core: NnUNetFedAvg,
    grid: Grid,
    initial_arrays: ArrayRecord | None,
    num_rounds: int,
    timeout: float,
    train_config: ConfigRecord | None,
    evaluate_config: ConfigRecord | None,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
) -> Result:
    """Flower's round loop, continuing after ``core.completed_rounds`` and checkpointing each round.

    Like ``Strategy.start`` but: ``initial_arrays`` defaults to the network
    (when given, they are loaded into it, except after a resume); rounds run from
    ``core.completed_rounds + 1`` to ``num_rounds`` (the run's total); after each
    round :meth:`NnUNetFedAvg.end_round` writes ``checkpoint_latest.pth``; at
    the end ``checkpoint_final.pth`` is written and ``result.arrays`` is the
    global model even when no round changed it.
    """
    if initial_arrays is not None and core.completed_rounds > 0:
        log(
            WARNING,
            "resumed after round %d: ignoring initial_arrays, the network holds the resumed model",
            core.completed_rounds,
        )
        initial_arrays = None
    arrays = core.sync_global(initial_arrays)
    first = core.completed_rounds + 1
    log(INFO, "Starting %s strategy (rounds %d to %d):", type(strategy).__name__, first, num_rounds)
    log_strategy_start_info(num_rounds, arrays, train_config, evaluate_config)
    strategy.summary()
    train_config = ConfigRecord() if train_config is None else train_config
    evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
    if core.model_folder is not None:
        core.model_folder.write_metadata()
    result = Result()
    started = time.time()
    if evaluate_fn and first == 1:
        res = evaluate_fn(0, arrays)
        log(INFO, "Initial global evaluation results: %s", res)
        if res is not None:
            result.evaluate_metrics_serverapp[0] = res
    for server_round in range(first, num_rounds + 1):
        log(INFO, "")
        log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
        replies = grid.send_and_receive(
            messages=strategy.configure_train(server_round, arrays, train_config, grid), timeout=timeout
        )
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        if train_metrics is not None:
            log(INFO, "\t└──> Aggregated MetricRecord: %s", train_metrics)
            result.train_metrics_clientapp[server_round] = train_metrics
        replies = grid.send_and_receive(
            messages=strategy.configure_evaluate(server_round, arrays, evaluate_config, grid), timeout=timeout
        )
        evaluate_metrics = strategy.aggregate_evaluate(server_round, replies)
        if evaluate_metrics is not None:
            log(INFO, "\t└──> Aggregated MetricRecord: %s", evaluate_metrics)
            result.evaluate_metrics_clientapp[server_round] = evaluate_metrics
        if evaluate_fn:
            res = evaluate_fn(server_round, arrays)
            log(INFO, "Global evaluation: %s", res)
            if res is not None:
                result.evaluate_metrics_serverapp[server_round] = res
        core.end_round(server_round, strategy)
    result.arrays = core.global_record()
    if core.model_folder is not None:
        path = core.model_folder.save_checkpoint(
            "final", core.network_weights(), core.checkpoint_state(core.completed_rounds)
        )
        log(INFO, "Wrote the final global model to %s", path)
    log(INFO, "Strategy execution finished in %.2fs", time.time() - started)
    for line in io.StringIO(str(result)):
        log(INFO, "\t%s", line.strip("\n"))
    return result
