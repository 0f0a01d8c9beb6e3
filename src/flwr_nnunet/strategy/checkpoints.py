"""The run's global checkpoints: what each holds, when they are written, and resuming from them.

A :class:`RunCheckpoints` ties a :class:`~flwr_nnunet.strategy.global_model.GlobalModel`
to its nnU-Net model folder: ``checkpoint_latest.pth`` after every round (with
the strategy's state), ``checkpoint_best.pth`` when the aggregated Dice
improves, ``checkpoint_final.pth`` at the end; :meth:`RunCheckpoints.resume`
loads the newest intact one, refusing a run whose plans, run config, strategy
or network differ. Without a model folder nothing is written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from flwr_nnunet.core.aliasing import AliasConflictError
from flwr_nnunet.core.reduce import check_updates
from flwr_nnunet.errors import FlwrNnUNetError
from flwr_nnunet.nnunet.digests import canonical_json_sha256, tensors_sha256
from flwr_nnunet.nnunet.model_folder import STATE_KEY, CheckpointError, NnUNetModelFolder
from flwr_nnunet.strategy.global_model import GlobalModel

__all__ = [
    "RUN_CONFIG_IGNORED_KEYS",
    "ResumeError",
    "RunCheckpoints",
    "StatefulStrategy",
    "comparable_run_config",
    "run_config_sha256",
]

RUN_CONFIG_IGNORED_KEYS = ("num-server-rounds", "resume", "node-wait")
"""Run-config keys a resumed run may change (how far to go, whether to resume, how long to wait for nodes)."""


class ResumeError(FlwrNnUNetError, RuntimeError):
    """A run cannot be resumed from the model folder (different plans, run config or strategy)."""


@runtime_checkable
class StatefulStrategy(Protocol):
    """A strategy with state a resumed run needs besides the weights (server-optimizer moments, clipping norm)."""

    def strategy_state(self) -> dict[str, Any]:
        """The state to store in ``checkpoint_latest.pth``."""

    def load_strategy_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`strategy_state` returned."""


def comparable_run_config(run_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The run config without :data:`RUN_CONFIG_IGNORED_KEYS`, keys sorted."""
    return {k: v for k, v in sorted((run_config or {}).items()) if k not in RUN_CONFIG_IGNORED_KEYS}


def run_config_sha256(run_config: Mapping[str, Any] | None) -> str:
    """A digest of a run config, ignoring :data:`RUN_CONFIG_IGNORED_KEYS`."""
    return canonical_json_sha256(comparable_run_config(run_config), default=str)


class RunCheckpoints:
    """Checkpoints of one run of a global model, and the run's progress.

    Parameters
    ----------
    model
        The global model.
    folder
        The nnU-Net model folder, or None (then nothing is written and resume is refused).
    plans_sha256
        Digest of the plans the run trains with (stored, and checked on resume).
    run_config
        The run config; its digest is stored, and resume refuses a different one.

    Attributes
    ----------
    completed_rounds
        The last round whose ``checkpoint_latest.pth`` was written (or resumed from).
    best_dice
        The best aggregated evaluation Dice so far.
    """

    def __init__(
        self,
        model: GlobalModel,
        folder: NnUNetModelFolder | None,
        *,
        plans_sha256: str | None,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.folder = folder
        self.plans_sha256 = plans_sha256
        self.run_config = dict(run_config or {})
        self.completed_rounds = 0
        self.best_dice: float | None = None

    def state(self, server_round: int, strategy: Strategy | None = None) -> dict[str, Any]:
        """What a checkpoint stores besides the weights: round, digests, best Dice, the strategy and its state."""
        return {
            "server_round": server_round,
            "weights_sha256": tensors_sha256(self.model.all_tensors),
            "plans_sha256": self.plans_sha256,
            "run_config": json.dumps(comparable_run_config(self.run_config), default=str),
            "run_config_sha256": run_config_sha256(self.run_config),
            "best_dice": self.best_dice,
            "strategy": None if strategy is None else type(strategy).__name__,
            "strategy_state": strategy.strategy_state() if isinstance(strategy, StatefulStrategy) else {},
        }

    def prepare_folder(self) -> None:
        """A run starts (or resumes): write the model folder's metadata and remove the temp files a killed
        server left in it (logged); nothing without a model folder."""
        if self.folder is None:
            return
        for orphan in self.folder.remove_orphan_temp_files():
            log(INFO, "removed %s, left by a server killed while it wrote", orphan)
        self.folder.write_metadata()

    def save(self, name: str, server_round: int, strategy: Strategy | None = None) -> Path | None:
        """Write ``checkpoint_<name>.pth`` (None without a model folder) and log it."""
        if self.folder is None:
            return None
        path = self.folder.save_checkpoint(name, self.model.network_weights(), self.state(server_round, strategy))
        log(INFO, "round %d: wrote %s", server_round, path)
        return path

    def end_round(self, server_round: int, strategy: Strategy) -> None:
        """A round is complete: write ``checkpoint_latest.pth`` with ``strategy``'s state."""
        self.completed_rounds = server_round
        self.save("latest", server_round, strategy)

    def note_dice(self, server_round: int, dice: Any) -> None:
        """Keep the best aggregated Dice; write ``checkpoint_best.pth`` when ``dice`` improves on it.

        A value that is not a number in [0, 1] is ignored (logged): it never becomes ``best_dice``.
        """
        if isinstance(dice, bool) or not isinstance(dice, (int, float)) or not 0.0 <= dice <= 1.0:
            if dice is not None:
                log(WARNING, "aggregate_evaluate: round %d: dice %.80r is not in [0, 1]: ignored", server_round, dice)
            return
        if self.best_dice is not None and dice <= self.best_dice:
            return
        previous, self.best_dice = self.best_dice, float(dice)
        log(INFO, "aggregate_evaluate: round %d: aggregated dice %.4f improves on %s", server_round, dice, previous)
        self.save("best", server_round)

    def resume(self, strategy: Strategy, run_config: Mapping[str, Any] | None = None) -> int:
        """Continue a killed run: load the model folder's newest intact checkpoint into the model and ``strategy``.

        Parameters
        ----------
        strategy
            The strategy that runs the rounds; it must be of the killed run's class,
            and receives its state when it is a :class:`StatefulStrategy`.
        run_config
            This run's config (default: the one given at construction); it must
            equal the killed run's except for :data:`RUN_CONFIG_IGNORED_KEYS`.

        Returns
        -------
        int
            The last completed round (0 when the folder has no checkpoint yet).

        Raises
        ------
        ResumeError
            If there is no model folder or no intact checkpoint, or the plans, run
            config, strategy or network differ from the killed run's.
        """
        if self.folder is None:
            raise ResumeError("resume needs a model_folder to read the run's checkpoints from")
        if run_config is not None:
            self.run_config = dict(run_config)
        try:
            found = self.folder.load_latest()
        except CheckpointError as error:
            raise ResumeError(str(error)) from None
        if found is None:
            log(INFO, "resume: no checkpoint in %s yet; starting at round 1", self.folder.fold_dir)
            return 0
        checkpoint, path = found
        state = checkpoint[STATE_KEY]
        self._check_compatible(state, path, strategy)
        try:
            canonical = self.model.alias_map.collapse(checkpoint["network_weights"])
            check_updates(self.model.all_tensors, [canonical])
        except (KeyError, AliasConflictError, ValueError) as error:
            raise ResumeError(
                f"cannot resume from {path}: its network differs from this one ({error.args[0]})"
            ) from None
        self.model.assign_all_(canonical)
        if isinstance(strategy, StatefulStrategy):
            strategy.load_strategy_state(state.get("strategy_state") or {})
        self.completed_rounds = int(state["server_round"])
        self.best_dice = state.get("best_dice")
        log(
            INFO,
            "resume: loaded round %d from %s; continuing at round %d",
            self.completed_rounds,
            path,
            self.completed_rounds + 1,
        )
        return self.completed_rounds

    def _check_compatible(self, state: Mapping[str, Any], path: Path, strategy: Strategy) -> None:
        if state.get("plans_sha256") != self.plans_sha256:
            raise ResumeError(
                f"cannot resume from {path}: it was trained with other plans (plans-sha256 "
                f"{str(state.get('plans_sha256'))[:12]}... vs {str(self.plans_sha256)[:12]}...); use the original "
                "plans or a new results folder"
            )
        if state.get("run_config_sha256") != run_config_sha256(self.run_config):
            saved = json.loads(state.get("run_config") or "{}")
            current = json.loads(json.dumps(comparable_run_config(self.run_config), default=str))
            changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:5])
            raise ResumeError(
                f"cannot resume from {path}: the run config differs from the killed run's ({details}); "
                "restore those values or start a new run"
            )
        if state.get("strategy") is None and path.name != self.folder.checkpoint_path("latest").name:
            log(
                WARNING,
                "resume: %s holds no strategy state (only checkpoint_latest/previous do); %s continues with "
                "fresh state (server-optimizer moments, clipping norm start afresh)",
                path,
                type(strategy).__name__,
            )
        elif state.get("strategy") != type(strategy).__name__:
            raise ResumeError(
                f"cannot resume from {path}: it was written by {state.get('strategy')}, not {type(strategy).__name__}"
            )
