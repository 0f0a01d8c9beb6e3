"""NnUNetFedAvg: Flower's FedAvg on an nnU-Net network, one alias group at a time, in place.

The strategy's global model *is* the network it is given (a
:class:`~flwr_nnunet.strategy.global_model.GlobalModel`): ``configure_train``
sends its canonical tensors (one per alias group) with the alias map and the
plans digest; ``aggregate_train`` validates each reply (bad replies are dropped
with one log line, never raising) and writes the aggregate into the network's
parameters in place, so ``network.state_dict()`` is always the current global
model with every alias still shared.

Override points for research code
---------------------------------
``reduce_all_(server_round, targets, updates, weights)``
    How the accepted replies are reduced into the network (default: the
    weighted mean of every group in one fused pass).
``reduce_group_(key, target, values, weights)``
    How one group is reduced. A subclass that defines it is reduced group by
    group through it (its ``reduce_all_`` becomes :meth:`NnUNetFedAvg.reduce_groups_`).
``reply_weight(reply)``
    The weight of an accepted reply (default: its ``num-examples``).
``on_round_end(server_round)``
    Called after each round of :meth:`NnUNetFedAvg.start` (default: calls
    ``post_round_fn(server_round, strategy)`` when given).
``diagnostics``, ``flagged_weight``
    Which site disagrees with the federation (:class:`~flwr_nnunet.strategy.site_diagnostics.SiteDiagnostics`,
    read from every round's accepted replies) and what a flagged site's replies then count for.
``local_keys=predicate``
    Personalization (FedBN-style): groups in which any key matches stay local
    at each site and are neither sent nor aggregated.
``streams``
    Whether ``start(..., streaming=True)`` may fold each reply into a running
    sum as it arrives (:mod:`flwr_nnunet.strategy.streaming`); a subclass that
    overrides ``aggregate_train``, ``reduce_all_`` or ``reduce_group_`` does
    not stream unless it sets ``streams = True`` itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import WARNING
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx, Result, Strategy
from flwr.supercore import log
from torch import nn

from flwr_nnunet.core.quantize import scheme_named
from flwr_nnunet.core.reduce import Tensors, weighted_mean_
from flwr_nnunet.nnunet.digests import plans_sha256
from flwr_nnunet.nnunet.model_folder import NnUNetModelFolder
from flwr_nnunet.nnunet.networks import build_trainer_network
from flwr_nnunet.strategy.aggregation import (
    aggregate_metrics,
    aggregate_site_metrics,
    log_aggregated,
    reduce_accepted,
)
from flwr_nnunet.strategy.checkpoints import RunCheckpoints
from flwr_nnunet.strategy.global_model import GlobalModel
from flwr_nnunet.strategy.model_sender import ModelSender
from flwr_nnunet.strategy.replies import AcceptedReply, canonical_message, non_finite_reason
from flwr_nnunet.strategy.rounds import run_rounds
from flwr_nnunet.strategy.site_diagnostics import SiteDiagnostics
from flwr_nnunet.strategy.validator import ReplyValidator

__all__ = ["NnUNetFedAvg", "NnUNetFedProx"]


class NnUNetFedAvg(FedAvg):
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
    max_reply_weight : float, optional
        Weight rule: a reply's :meth:`reply_weight` must be finite and > 0 in float64; larger ones than this
        cap are clipped to it (logged); a round whose float64 sum is not finite is refused.
    diagnostics : SiteDiagnostics, optional
        Reads every round's accepted replies and flags a site whose data disagree with the rest (one log line
        naming it and the evidence); default ``SiteDiagnostics()``.
    flagged_weight : float (default: 1.0)
        What a flagged site's replies count for from the round after the flag: 1 as any site's, a value in
        (0, 1) multiplies its :meth:`reply_weight`, 0 excludes it from training rounds (it is still evaluated,
        and ``min_train_nodes`` counts only the sites asked). Logged each round.
    compression : str (default: "none")
        Run-config ``compression``: the sites get compressed deltas of the model
        (:class:`~flwr_nnunet.strategy.model_sender.ModelSender`) and may reply with compressed updates, which
        the validator turns back into floats before anything else reads them.
    **kwargs
        Every argument of :class:`flwr.serverapp.strategy.FedAvg`
        (``fraction_train``, ``min_train_nodes``, ``weighted_by_key``, ...).
    """

    result_shows_non_finite: ClassVar[bool] = True
    """Whether a NaN/Inf in any reply shows in the reduced result (a weighted mean does), so that checking the
    result replaces checking every reply; reducers that can hide one (median, trimmed mean, a custom
    ``reduce_group_``) set it False and every reply is checked first."""

    streams: ClassVar[bool] = True
    """Whether the reduction is the weighted mean, optionally followed by a server step that
    ``reduce_all_`` applies to the streamed mean passed as its one update of weight 1: then a round can
    fold replies as they arrive. Subclasses that override ``aggregate_train``, ``reduce_all_`` or
    ``reduce_group_`` get False unless they set it."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "reduce_group_" in cls.__dict__ and "reduce_all_" not in cls.__dict__:
            cls.reduce_all_ = NnUNetFedAvg.reduce_groups_
            cls.result_shows_non_finite = False
        overrides = {"aggregate_train", "reduce_all_", "reduce_group_"} & set(cls.__dict__)
        if overrides and "streams" not in cls.__dict__:
            cls.streams = False

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
        max_reply_weight: float | None = None,
        diagnostics: SiteDiagnostics | None = None,
        flagged_weight: float = 1.0,
        compression: str = "none",
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= flagged_weight <= 1.0:
            raise ValueError(
                f"flagged_weight must be in [0, 1] (1 keeps, 0 excludes a flagged site), got {flagged_weight}"
            )
        kwargs.setdefault("evaluate_metrics_aggr_fn", aggregate_site_metrics)
        super().__init__(**kwargs)
        self.diagnostics = SiteDiagnostics() if diagnostics is None else diagnostics
        self.flagged_weight = float(flagged_weight)
        self.excluded: frozenset[int] = frozenset()
        """The flagged nodes left out of the current training round (``flagged_weight`` 0)."""
        if plans is None and model_folder is not None:
            plans = model_folder.plans
        if plans is not None and model_folder is not None and plans_sha256(plans) != plans_sha256(model_folder.plans):
            raise ValueError("plans and model_folder.plans differ: pass the plans the model folder was made with")
        self.plans = plans
        self.plans_sha256 = None if plans is None else plans_sha256(plans)
        self.model = GlobalModel(network, local_keys=local_keys)
        self.checkpoints = RunCheckpoints(
            self.model, model_folder, plans_sha256=self.plans_sha256, run_config=run_config
        )
        self.accumulate_dtype = accumulate_dtype
        self.post_round_fn = post_round_fn
        scheme = scheme_named(compression)
        self.model_sender = None if scheme is None else ModelSender(scheme, self.arrayrecord_key)
        self.validator = ReplyValidator(
            self.model.alias_map,
            self.model.tensors,
            plans_sha256=self.plans_sha256,
            weighted_by_key=self.weighted_by_key,
            arrayrecord_key=self.arrayrecord_key,
            optional_keys=self.model.local_groups,
            max_reply_weight=max_reply_weight,
            model_sender=self.model_sender,
        )

    @classmethod
    def from_model_folder(cls, model_folder: NnUNetModelFolder, **kwargs: Any) -> NnUNetFedAvg:
        """The strategy on the network ``model_folder.trainer_name`` builds from the folder's plans and dataset.json.

        ``kwargs`` are the other constructor arguments.
        """
        network = build_trainer_network(
            model_folder.plans, model_folder.dataset_json, model_folder.configuration, model_folder.trainer_name
        )
        return cls(network, model_folder=model_folder, **kwargs)

    @property
    def model_folder(self) -> NnUNetModelFolder | None:
        """Where the global checkpoints go."""
        return self.checkpoints.folder

    # -------------------------------------------------------------- configure

    def wire_config(self, config: ConfigRecord) -> ConfigRecord:
        """Add ``alias-map``, ``plans-sha256`` and ``local-keys`` to ``config`` (in place, as Flower adds
        ``server-round``)."""
        config["alias-map"] = self.model.alias_map.to_json()
        if self.plans_sha256 is not None:
            config["plans-sha256"] = self.plans_sha256
        if self.model.local_groups:
            config["local-keys"] = json.dumps(list(self.model.local_groups))
        return config

    def sync_global(self, arrays: ArrayRecord | None) -> ArrayRecord:
        """The record to send: the model's, after loading ``arrays`` into it if they are not already it."""
        if arrays is not None:
            self.model.load_(arrays)
        return self.model.record()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure a training round: the network's canonical tensors plus the wire config (messages kept);
        with ``flagged_weight`` 0 flagged sites are not asked to train (logged)."""
        messages = super().configure_train(server_round, self.sync_global(arrays), self.wire_config(config), grid)
        return self.validator.expect(self.addressed(self.without_excluded(server_round, messages)))

    def without_excluded(self, server_round: int, messages: Iterable[Message]) -> list[Message]:
        """``messages`` without those to flagged sites when ``flagged_weight`` is 0 (one log line per site)."""
        messages = list(messages)
        nodes = {m.metadata.dst_node_id for m in messages}
        self.excluded = frozenset(n for n in nodes if self.flagged_weight == 0 and self.diagnostics.is_flagged(n))
        for node in sorted(self.excluded):
            log(
                WARNING,
                "configure_train: round %d: site %s (node %d) is flagged: excluded from training "
                "(run-config flagged-weight=0)",
                server_round,
                self.diagnostics.name(node),
                node,
            )
        return [m for m in messages if m.metadata.dst_node_id not in self.excluded]

    @property
    def min_train_replies(self) -> int:
        """The accepted training replies a round needs: ``min_train_nodes``, less the sites excluded this round."""
        return max(1, self.min_train_nodes - len(self.excluded))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure an evaluation round: the network's canonical tensors plus the wire config."""
        messages = super().configure_evaluate(server_round, self.sync_global(arrays), self.wire_config(config), grid)
        return self.validator.expect(self.addressed(messages))

    def addressed(self, messages: Iterable[Message]) -> list[Message]:
        """``messages`` as run-config ``compression`` sends them (see :meth:`ModelSender.address`), else as they are."""
        return list(messages) if self.model_sender is None else self.model_sender.address(self.model, messages)

    # ---------------------------------------------------------------- replies

    def reply_weight(self, reply: AcceptedReply) -> float:
        """The aggregation weight of an accepted reply (override point; default: ``num-examples``, times
        ``flagged_weight`` for a flagged site, logged)."""
        if self.flagged_weight == 1.0 or not self.diagnostics.is_flagged(reply.node_id):
            return reply.num_examples
        log(
            WARNING,
            "aggregate_train: site %s (node %d) is flagged: its weight %g is multiplied by %g (run-config "
            "flagged-weight)",
            self.diagnostics.name(reply.node_id),
            reply.node_id,
            reply.num_examples,
            self.flagged_weight,
        )
        return reply.num_examples * self.flagged_weight

    def accept_replies(
        self, server_round: int, replies: Iterable[Message], *, is_train: bool, check_finite: bool = True
    ) -> list[AcceptedReply]:
        """The valid replies by node id, weighed by :meth:`reply_weight` for training, or none when fewer than
        ``min_train_nodes`` / ``min_evaluate_nodes`` are (see :meth:`ReplyValidator.accept`); the
        :attr:`diagnostics` read them before the model changes."""
        accepted = self.validator.accept(
            server_round,
            replies,
            weight=self.reply_weight if is_train else None,
            minimum=self.min_train_replies if is_train else self.min_evaluate_nodes,
            check_finite=check_finite,
        )
        if self.model_sender is not None:
            self.model_sender.note([m.metadata.dst_node_id for m in self.validator.sent], accepted)
        if is_train:
            self.diagnostics.note_train(server_round, accepted, self.model.tensors)
        else:
            self.diagnostics.note_evaluate(server_round, accepted)
        return accepted

    def valid_messages(self, server_round: int, replies: Iterable[Message], *, is_train: bool) -> list[Message]:
        """The accepted replies as messages (canonical, weight capped, for training): what Flower's code takes."""
        accepted = self.accept_replies(server_round, replies, is_train=is_train)
        keys, weighted_by = list(self.model.tensors), self.weighted_by_key
        if not is_train:
            return [a.message for a in accepted]
        return [
            canonical_message(a.message, keys, self.arrayrecord_key, weight=(weighted_by, a.weight)) for a in accepted
        ]

    # ------------------------------------------------------------ aggregation

    def reduce_all_(
        self, server_round: int, targets: Tensors, updates: Sequence[Tensors], weights: Sequence[float]
    ) -> list[str]:
        """Reduce the updates into ``targets`` (the network's tensors) in place; return the keys whose result
        holds NaN/Inf (override point; default: the weighted mean of every group in one fused pass)."""
        return weighted_mean_(targets, updates, weights, accumulate_dtype=self.accumulate_dtype, check_finite=True)

    def reduce_groups_(
        self, server_round: int, targets: Tensors, updates: Sequence[Tensors], weights: Sequence[float]
    ) -> list[str]:
        """:meth:`reduce_all_` group by group through :meth:`reduce_group_`, stopping at the first non-finite
        result."""
        for key, target in targets.items():
            self.reduce_group_(key, target, [u[key] for u in updates], weights)
            if non_finite_reason(key, target):
                return [key]
        return []

    def reduce_group_(
        self, key: str, target: torch.Tensor, values: Sequence[torch.Tensor], weights: Sequence[float]
    ) -> None:
        """Reduce one alias group's client values into ``target`` in place (override point; default: weighted mean)."""
        weighted_mean_({key: target}, [{key: v} for v in values], weights, accumulate_dtype=self.accumulate_dtype)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies and reduce them into the network in place.

        NaN/Inf are found in each reduced group rather than in every reply (see
        :func:`~flwr_nnunet.strategy.aggregation.reduce_accepted`). Returns the new
        global ``ArrayRecord`` (canonical) and the aggregated metrics, or
        ``(None, None)`` when too few replies are valid or the round is refused;
        then the global model is bit-identical to before.
        """
        start = time.perf_counter()
        snapshot = self.model.snapshot()
        accepted = self.accept_replies(
            server_round, replies, is_train=True, check_finite=not self.result_shows_non_finite
        )
        accepted = reduce_accepted(
            server_round,
            accepted,
            lambda updates, weights: self.reduce_all_(server_round, self.model.tensors, updates, weights),
            lambda: self.model.roll_back_(snapshot),
            self.min_train_replies,
        )
        if not accepted:
            return None, None
        self.model.changed()
        metrics = aggregate_metrics(self.train_metrics_aggr_fn, accepted, self.weighted_by_key, "aggregate_train")
        log_aggregated(server_round, accepted, len(self.model.tensors), self.model.nbytes, time.perf_counter() - start)
        return self.model.record(), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Aggregate valid evaluation metrics; save ``checkpoint_best.pth`` when the aggregated ``dice`` improves."""
        accepted = self.accept_replies(server_round, replies, is_train=False)
        if not accepted:
            return None
        metrics = aggregate_metrics(self.evaluate_metrics_aggr_fn, accepted, self.weighted_by_key, "aggregate_evaluate")
        if metrics is not None:
            self.checkpoints.note_dice(server_round, metrics.get("dice"))
        return metrics

    # -------------------------------------------------------- rounds & resume

    def on_round_end(self, server_round: int) -> None:
        """Called at the end of every round of :meth:`start` (override point; default: ``post_round_fn``)."""
        if self.post_round_fn is not None:
            self.post_round_fn(server_round, self)

    def strategy_state(self) -> dict[str, Any]:
        """What a resumed run needs besides the weights (override point; subclasses add theirs): the
        :attr:`diagnostics`' flags."""
        return {"site-diagnostics": self.diagnostics.state()}

    def load_strategy_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`strategy_state` returned."""
        self.diagnostics.load_state(state.get("site-diagnostics") or {})

    def resume(self, run_config: Mapping[str, Any] | None = None) -> int:
        """Load the model folder's newest intact checkpoint; return the last completed round (0: none).

        :meth:`start` then continues at the next round (see :meth:`RunCheckpoints.resume`).
        """
        return self.checkpoints.resume(self, run_config)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int = 3,
        *,
        via: Strategy | None = None,
        **kwargs: Any,
    ) -> Result:
        """Run rounds ``checkpoints.completed_rounds + 1`` to ``num_rounds``, checkpointing each (see
        :func:`~flwr_nnunet.strategy.rounds.run_rounds`; ``kwargs``: ``timeout``, ``train_config``,
        ``evaluate_config``, ``evaluate_fn``, as Flower's ``Strategy.start``, and the streaming options
        ``streaming``, ``quorum``, ``grace``, ``poll_interval``). ``via``: a wrapper (DP) whose configure and
        aggregate methods run each round instead of this strategy's."""
        return run_rounds(
            via or self,
            self.model,
            self.checkpoints,
            grid,
            initial_arrays=initial_arrays,
            num_rounds=num_rounds,
            on_round_end=self.on_round_end,
            **kwargs,
        )


class NnUNetFedProx(NnUNetFedAvg, FedProx):
    """FedProx: FedAvg that sends ``proximal-mu`` in the train config (``proximal_mu``, default 0.0)."""
