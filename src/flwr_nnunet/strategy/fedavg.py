"""NnUNetFedAvg: Flower's FedAvg on an nnU-Net network, one alias group at a time, in place.

The strategy's global model *is* the network it is given: ``configure_train``
sends the network's canonical tensors (one per alias group) with the alias map
and the plans digest; ``aggregate_train`` validates each reply (bad replies are
dropped with one log line, never raising) and writes the weighted mean into the
network's parameters in place, so ``network.state_dict()`` is always the
current global model with every alias still shared.

Override points for research code
---------------------------------
``reduce_group_(key, target, values, weights)``
    How one group is reduced into its target tensor (default: weighted mean).
``reply_weight(reply)``
    The weight of an accepted reply (default: its ``num-examples``).
``on_round_end(server_round)``
    Called after each round of :meth:`NnUNetFedAvg.start` (default: calls
    ``post_round_fn(server_round, strategy)`` when given).
``local_keys=predicate``
    Personalization (FedBN-style): groups in which any key matches stay local
    at each site and are neither sent nor aggregated.
"""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.supercore import log
from torch import nn

from flwr_nnunet.core.reduce import assign_, check_updates, weighted_mean_
from flwr_nnunet.core.aliasing import AliasMap, strip_wrapper_prefixes
from flwr_nnunet.nnunet.model_folder import NnUNetModelFolder, tensors_sha256
from flwr_nnunet.core.codec import from_array_record, to_array_record
from flwr_nnunet.nnunet.networks import build_trainer_network, plans_sha256
from flwr_nnunet.strategy.rounds import ResumeError, RoundRunner, comparable_run_config, run_config_sha256
from flwr_nnunet.strategy.replies import AcceptedReply, Rejection, ReplyValidator, check_weight, non_finite_reason

__all__ = ["NnUNetFedAvg", "ResumeError"]


class _NonFiniteResult(ArithmeticError):
    """An aggregated group holds NaN/Inf (some reply did)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _cast_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` in ``like``'s dtype; integer targets take rounded values."""
    if value.dtype == like.dtype:
        return value
    if not like.is_floating_point() and value.is_floating_point():
        value = value.round()
    return value.to(like.dtype)


class NnUNetFedAvg(RoundRunner, FedAvg):
    """Federated averaging of an nnU-Net network, each alias group once, in place.

    Parameters
    ----------
    network : torch.nn.Module
        The global model (normally ``flwr_nnunet.nnunet.networks.build_network`` of the
        plans). Its parameters are overwritten in place every round; move it to
        its device before building the strategy.
    plans : dict, optional
        The nnU-Net plans every site trains with; their digest travels as
        ``plans-sha256`` and replies carrying another digest are rejected.
        Defaults to ``model_folder.plans`` when a model folder is given.
    model_folder : NnUNetModelFolder, optional
        Where :meth:`start` writes the global checkpoints in nnU-Net's layout
        (``checkpoint_latest.pth`` each round, ``checkpoint_best.pth`` when the
        aggregated ``dice`` improves, ``checkpoint_final.pth`` at the end) and
        from where :meth:`resume` continues a killed run.
    run_config : Mapping, optional
        The run config (``context.run_config``); its digest is stored in every
        checkpoint, and :meth:`resume` refuses a different one.
    local_keys : callable, optional
        ``key -> bool``; alias groups in which any key matches stay local at
        each site (e.g. ``lambda k: ".norm." in k`` for FedBN). They are not
        sent, not aggregated, and listed in the config as ``local-keys``.
    accumulate_dtype : torch.dtype (default: torch.float32)
        Accumulation dtype of the in-place reductions (``torch.float64`` for
        bit-stable sums).
    post_round_fn : callable, optional
        ``(server_round, strategy) -> None``, called by :meth:`on_round_end`.
    **kwargs
        Every argument of :class:`flwr.serverapp.strategy.FedAvg`
        (``fraction_train``, ``min_train_nodes``, ``weighted_by_key``, ...).
    """

    def __init__(
        self,
        network: nn.Module,
        *,
        plans: dict | None = None,
        model_folder: NnUNetModelFolder | None = None,
        run_config: Mapping[str, Any] | None = None,
        local_keys: Callable[[str], bool] | None = None,
        accumulate_dtype: torch.dtype = torch.float32,
        post_round_fn: Callable[[int, NnUNetFedAvg], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if plans is None and model_folder is not None:
            plans = model_folder.plans
        if plans is not None and model_folder is not None and plans_sha256(plans) != plans_sha256(model_folder.plans):
            raise ValueError("plans and model_folder.plans differ: pass the plans the model folder was made with")
        self.network = network
        self.plans = plans
        self.plans_sha256 = None if plans is None else plans_sha256(plans)
        self.model_folder = model_folder
        self.run_config = dict(run_config or {})
        self.accumulate_dtype = accumulate_dtype
        self.post_round_fn = post_round_fn
        self.alias_map = AliasMap.from_module(network)
        self.local_groups = self.alias_map.select(local_keys) if local_keys is not None else ()
        self.all_tensors = self.alias_map.collapse(network.state_dict())
        self.global_tensors = OrderedDict((k, t) for k, t in self.all_tensors.items() if k not in self.local_groups)
        self.validator = ReplyValidator(
            self.alias_map,
            self.global_tensors,
            plans_sha256=self.plans_sha256,
            weighted_by_key=self.weighted_by_key,
            arrayrecord_key=self.arrayrecord_key,
            optional_keys=self.local_groups,
        )
        self.completed_rounds = 0
        self.current_round = 0
        self.best_dice: float | None = None
        self._record: ArrayRecord | None = None
        self._check_results = False

    @classmethod
    def from_model_folder(cls, model_folder: NnUNetModelFolder, **kwargs: Any) -> NnUNetFedAvg:
        """The strategy on the network ``model_folder.trainer_name`` builds from the folder's plans and dataset.json.

        ``kwargs`` are the other constructor arguments.
        """
        network = build_trainer_network(
            model_folder.plans, model_folder.dataset_json, model_folder.configuration, model_folder.trainer_name
        )
        return cls(network, model_folder=model_folder, **kwargs)

    # ------------------------------------------------------------------ model

    def global_record(self) -> ArrayRecord:
        """The global model's shared canonical tensors as an ``ArrayRecord`` (cached until the model changes)."""
        if self._record is None:
            self._record = to_array_record(self.global_tensors)
        return self._record

    def load_global_(self, arrays: ArrayRecord, *, cast: bool = False) -> None:
        """Write ``arrays`` (canonical keys, or every state_dict key with agreeing aliases) into the network.

        Parameters
        ----------
        arrays
            The new global model.
        cast
            Cast each array to its group's dtype first (integers rounded), for
            results of numpy code that turns int64 buffers into float64.

        Raises
        ------
        ValueError
            If keys, shapes or dtypes differ from the network's, or values are
            not finite; the network is left unchanged.
        """
        tensors = from_array_record(arrays)
        if set(tensors) == set(self.alias_map.keys):
            tensors = self.alias_map.collapse(tensors)
        tensors = OrderedDict((k, v) for k, v in tensors.items() if k not in self.local_groups)
        check_updates(self.global_tensors, [tensors])
        if cast:
            tensors = OrderedDict((k, _cast_like(v, self.global_tensors[k])) for k, v in tensors.items())
        problem = self.validator.check_tensors(tensors)
        if problem:
            raise ValueError(f"global arrays: {problem}")
        assign_(self.global_tensors, tensors)
        self._record = None

    def assign_all_(self, canonical: Mapping[str, torch.Tensor]) -> None:
        """Copy canonical tensors for every group, local ones included, into the network."""
        assign_(self.all_tensors, canonical)
        self._record = None

    def network_weights(self) -> OrderedDict[str, torch.Tensor]:
        """Every state_dict key on the CPU, the keys of a group sharing one tensor (what checkpoints hold)."""
        return self.alias_map.expand(OrderedDict((k, t.detach().cpu()) for k, t in self.all_tensors.items()))

    # -------------------------------------------------------------- configure

    def wire_config(self, config: ConfigRecord) -> ConfigRecord:
        """Add ``alias-map``, ``plans-sha256`` and ``local-keys`` to ``config``.

        In place, as Flower adds ``server-round``.
        """
        config["alias-map"] = self.alias_map.to_json()
        if self.plans_sha256 is not None:
            config["plans-sha256"] = self.plans_sha256
        if self.local_groups:
            config["local-keys"] = json.dumps(list(self.local_groups))
        return config

    def sync_global(self, arrays: ArrayRecord | None) -> ArrayRecord:
        """The record to send: the network's, after loading ``arrays`` into it if they are not already it."""
        if arrays is not None and arrays is not self._record:
            self.load_global_(arrays)
        return self.global_record()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure a training round: the network's canonical tensors plus the wire config."""
        return super().configure_train(server_round, self.sync_global(arrays), self.wire_config(config), grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure an evaluation round: the network's canonical tensors plus the wire config."""
        return super().configure_evaluate(server_round, self.sync_global(arrays), self.wire_config(config), grid)

    # ------------------------------------------------------------- validation

    def reply_weight(self, reply: AcceptedReply) -> float:
        """The aggregation weight of an accepted reply (override point; default: ``num-examples``)."""
        return reply.num_examples

    def accept_replies(
        self, server_round: int, replies: Sequence[Message], *, is_train: bool, check_finite: bool = True
    ) -> list[AcceptedReply]:
        """Validate replies; log one line per rejected reply; return the accepted ones by node id.

        Sorting makes the floating-point result independent of arrival order.
        ``check_finite=False`` leaves NaN/Inf to :meth:`aggregate_train`'s check of the result.
        """
        stage = "aggregate_train" if is_train else "aggregate_evaluate"
        accepted: list[AcceptedReply] = []
        for message in replies:
            if is_train:
                result = self.validator.check_train(message, check_finite=check_finite)
            else:
                result = self.validator.check_evaluate(message)
            if isinstance(result, AcceptedReply) and is_train:
                reason = check_weight(self.reply_weight(result), "reply_weight()")
                result = Rejection(result.node_id, reason) if reason else result
            if isinstance(result, Rejection):
                self._log_rejection(stage, server_round, result)
            else:
                accepted.append(result)
        log(INFO, "%s: round %d: %d of %d replies accepted", stage, server_round, len(accepted), len(replies))
        return sorted(accepted, key=lambda a: a.node_id)

    @staticmethod
    def _log_rejection(stage: str, server_round: int, rejection: Rejection) -> None:
        log(
            WARNING,
            "%s: round %d: rejected reply from node %d: %s",
            stage,
            server_round,
            rejection.node_id,
            rejection.reason,
        )

    def _enough(self, server_round: int, accepted: Sequence[AcceptedReply], minimum: int, stage: str) -> bool:
        needed = max(1, minimum)
        if len(accepted) >= needed:
            return True
        outcome = "global model unchanged" if stage == "aggregate_train" else "no metrics this round"
        log(
            WARNING,
            "%s: round %d: %d valid replies, fewer than the %d required: %s",
            stage,
            server_round,
            len(accepted),
            needed,
            outcome,
        )
        return False

    def canonical_message(self, reply: AcceptedReply, keys: Sequence[str] | None = None) -> Message:
        """The reply itself when its arrays are exactly ``keys`` in order, else a copy whose ``ArrayRecord``
        holds only the canonical arrays for ``keys`` (default: every aggregated group), in order.

        The copy shares the ``Array`` objects (no bytes are copied) and keeps the
        reply's other records (metrics, config).
        """
        keys = list(self.global_tensors) if keys is None else list(keys)
        content = reply.message.content
        record = content[self.arrayrecord_key]
        if list(record.keys()) == keys:
            return reply.message
        records = {name: value for name, value in content.items() if name != self.arrayrecord_key}
        names = strip_wrapper_prefixes({name: name for name in record})  # canonical -> the reply's name
        records[self.arrayrecord_key] = ArrayRecord(OrderedDict((k, record[names[k]]) for k in keys))
        return make_message(reply.message.metadata, content=RecordDict(records))

    def valid_messages(self, server_round: int, replies: Iterable[Message], *, is_train: bool) -> list[Message]:
        """The valid replies (canonical, for training), or none when fewer than ``min_*_nodes`` are valid."""
        accepted = self.accept_replies(server_round, list(replies), is_train=is_train)
        minimum = self.min_train_nodes if is_train else self.min_evaluate_nodes
        if not self._enough(server_round, accepted, minimum, "aggregate_train" if is_train else "aggregate_evaluate"):
            return []
        return [self.canonical_message(a) if is_train else a.message for a in accepted]

    def _check_and_log_replies(
        self, replies: Iterable[Message], is_train: bool, validate: bool = True
    ) -> tuple[list[Message], list[Message]]:
        """Flower's reply check, replaced: invalid replies are dropped and logged, never raised.

        Returns the valid replies (see :meth:`valid_messages`) and the others.
        """
        replies = list(replies)
        valid = self.valid_messages(self.current_round, replies, is_train=is_train)
        kept = {m.metadata.message_id for m in valid}
        return valid, [m for m in replies if m.metadata.message_id not in kept]

    # ------------------------------------------------------------ aggregation

    def reduce_group_(
        self, key: str, target: torch.Tensor, values: Sequence[torch.Tensor], weights: Sequence[float]
    ) -> None:
        """Reduce one alias group's client values into ``target`` in place (override point; default: weighted mean)."""
        weighted_mean_({key: target}, [{key: v} for v in values], weights, accumulate_dtype=self.accumulate_dtype)

    def aggregate_(
        self,
        targets: Mapping[str, torch.Tensor],
        updates: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
    ) -> None:
        """Reduce every group into ``targets`` (the network's canonical tensors) with :meth:`reduce_group_`.

        The default weighted mean reduces all groups in one pass over the thread
        pool. In :meth:`aggregate_train`'s single-pass mode, raises
        ``_NonFiniteResult`` naming the first group whose result holds NaN/Inf
        (it then rolls back and rejects the replies that caused it).
        """
        if type(self).reduce_group_ is NnUNetFedAvg.reduce_group_:
            non_finite = weighted_mean_(
                targets, updates, weights, accumulate_dtype=self.accumulate_dtype, check_finite=self._check_results
            )
            if non_finite:
                raise _NonFiniteResult(non_finite[0])
            return
        for key, target in targets.items():
            self.reduce_group_(key, target, [u[key] for u in updates], weights)
            if self._check_results and target.is_floating_point() and non_finite_reason(key, target):
                raise _NonFiniteResult(key)

    def _aggregate_metrics(
        self, aggregate: Callable[[list[RecordDict], str], MetricRecord], messages: Sequence[Message], stage: str
    ) -> MetricRecord | None:
        try:
            return aggregate([m.content for m in messages], self.weighted_by_key)
        except (ValueError, TypeError, KeyError, ZeroDivisionError) as error:
            log(WARNING, "%s: metrics could not be aggregated (%s); skipping them", stage, error)
            return None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies and write their aggregate into the network in place.

        Returns the new global ``ArrayRecord`` (canonical) and the aggregated
        metrics, or ``(None, None)`` when too few replies are valid; then the
        global model is unchanged.
        """
        self.current_round = server_round
        replies = list(replies)
        start = time.perf_counter()
        single_pass = self._single_pass_finite_check()
        accepted = self.accept_replies(server_round, replies, is_train=True, check_finite=not single_pass)
        while True:
            if not self._enough(server_round, accepted, self.min_train_nodes, "aggregate_train"):
                return None, None
            weights = [self.reply_weight(a) for a in accepted]
            bad_group = self._aggregate_finite(accepted, weights, single_pass)
            if bad_group is None:
                break
            accepted = self._drop_non_finite(server_round, accepted, bad_group)
            if accepted is None:
                return None, None
        self._record = None
        seconds = time.perf_counter() - start
        metrics = self._aggregate_metrics(self.train_metrics_aggr_fn, [a.message for a in accepted], "aggregate_train")
        log(
            INFO,
            "aggregate_train: round %d: aggregated %d replies (nodes %s, total weight %g) into %d groups "
            "(%.1f MB) in place in %.2f s",
            server_round,
            len(accepted),
            [a.node_id for a in accepted],
            sum(weights),
            len(self.global_tensors),
            sum(t.numel() * t.element_size() for t in self.global_tensors.values()) / 1e6,
            seconds,
        )
        return self.global_record(), metrics

    def _single_pass_finite_check(self) -> bool:
        """Whether NaN/Inf can be found in the result instead of in every reply (one read of the replies, not two).

        True for the weighted mean (any non-finite input makes its group's mean
        non-finite) when the pre-round model is at hand to roll back to: the
        record last sent. Strategies with their own ``reduce_group_`` (a median
        may hide a NaN) check every reply first.
        """
        return self._record is not None and type(self).reduce_group_ is NnUNetFedAvg.reduce_group_

    def _aggregate_finite(
        self, accepted: Sequence[AcceptedReply], weights: Sequence[float], single_pass: bool
    ) -> str | None:
        """Aggregate in place; with ``single_pass``, return the first group whose result is not finite (rolled back)."""
        self._check_results = single_pass
        try:
            self.aggregate_(self.global_tensors, [a.tensors for a in accepted], weights)
        except _NonFiniteResult as error:
            assign_(self.global_tensors, from_array_record(self._record))
            return error.key
        finally:
            self._check_results = False
        return None

    def _drop_non_finite(
        self, server_round: int, accepted: Sequence[AcceptedReply], key: str
    ) -> list[AcceptedReply] | None:
        """Reject the replies whose ``key`` holds NaN/Inf; None (model unchanged) if none does (the mean overflowed)."""
        kept = []
        for reply in accepted:
            reason = non_finite_reason(key, reply.tensors[key])
            if reason:
                self._log_rejection("aggregate_train", server_round, Rejection(reply.node_id, reason))
            else:
                kept.append(reply)
        if len(kept) == len(accepted):
            log(
                WARNING,
                "aggregate_train: round %d: the mean of %r overflowed: global model unchanged",
                server_round,
                key,
            )
            return None
        return kept

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Aggregate valid evaluation metrics; save ``checkpoint_best.pth`` when the aggregated ``dice`` improves."""
        self.current_round = server_round
        replies = list(replies)
        accepted = self.accept_replies(server_round, replies, is_train=False)
        if not self._enough(server_round, accepted, self.min_evaluate_nodes, "aggregate_evaluate"):
            return None
        metrics = self._aggregate_metrics(
            self.evaluate_metrics_aggr_fn, [a.message for a in accepted], "aggregate_evaluate"
        )
        dice = None if metrics is None else metrics.get("dice")
        if isinstance(dice, (int, float)) and math.isfinite(dice) and (self.best_dice is None or dice > self.best_dice):
            previous, self.best_dice = self.best_dice, float(dice)
            log(INFO, "aggregate_evaluate: round %d: aggregated dice %.4f improves on %s", server_round, dice, previous)
            if self.model_folder is not None:
                path = self.model_folder.save_checkpoint(
                    "best", self.network_weights(), self.checkpoint_state(server_round)
                )
                log(INFO, "aggregate_evaluate: wrote %s", path)
        return metrics

    # -------------------------------------------------------- rounds & resume

    def strategy_state(self) -> dict[str, Any]:
        """State a resumed run needs besides the weights (override with :meth:`load_strategy_state`)."""
        return {}

    def load_strategy_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`strategy_state` returned."""

    def checkpoint_state(self, server_round: int, strategy_state: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return {
            "server_round": server_round,
            "weights_sha256": tensors_sha256(self.all_tensors),
            "plans_sha256": self.plans_sha256,
            "run_config": json.dumps(comparable_run_config(self.run_config), default=str),
            "run_config_sha256": run_config_sha256(self.run_config),
            "best_dice": self.best_dice,
            "strategy_state": dict(strategy_state or {}),
        }

    def end_round(self, server_round: int, strategy: Strategy | None = None) -> None:
        """Finish a round: write ``checkpoint_latest.pth`` (weights + strategy state), then :meth:`on_round_end`."""
        self.completed_rounds = server_round
        owner = strategy or self
        if self.model_folder is not None:
            state = self.checkpoint_state(server_round, owner.strategy_state())
            state["strategy"] = type(owner).__name__
            path = self.model_folder.save_checkpoint("latest", self.network_weights(), state)
            log(INFO, "round %d: wrote %s", server_round, path)
        self.on_round_end(server_round)

    def on_round_end(self, server_round: int) -> None:
        """Called at the end of every round of :meth:`start` (override point; default: ``post_round_fn``)."""
        if self.post_round_fn is not None:
            self.post_round_fn(server_round, self)

    @property
    def core(self) -> NnUNetFedAvg:
        """The strategy holding the network (itself; wrappers return the wrapped one)."""
        return self
