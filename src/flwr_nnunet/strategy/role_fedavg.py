"""RoleMatchedFedAvg: federated averaging across sites whose nnU-Net plans differ, layers matched by role.

Each plans is one :class:`~flwr_nnunet.strategy.fedavg.NnUNetFedAvg` *member*: its own global network
(:class:`~flwr_nnunet.strategy.global_model.GlobalModel`), reply checks
(:class:`~flwr_nnunet.strategy.validator.ReplyValidator`) and model folder
(:class:`~flwr_nnunet.strategy.checkpoints.RunCheckpoints`). The members' tensors are matched once by role
(:func:`~flwr_nnunet.nnunet.layer_roles.match_layers`) and the matched ones made equal before round 1; every
round each site gets exactly its plans' model and each unit of matched layers is averaged once over the sites
of every plans that has it, weighted by cases (:func:`~flwr_nnunet.strategy.role_aggregation.role_weighted_mean_`).
A layer without a match is averaged over its own plans' sites only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any, ClassVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.supercore import log
from torch import nn

from flwr_nnunet.nnunet.layer_roles import match_layers, role_keys
from flwr_nnunet.nnunet.model_folder import NnUNetModelFolder
from flwr_nnunet.strategy.aggregation import aggregate_metrics, aggregate_site_metrics, enough_replies
from flwr_nnunet.strategy.checkpoints import ResumeError
from flwr_nnunet.strategy.fedavg import NnUNetFedAvg
from flwr_nnunet.strategy.global_model import GlobalModel
from flwr_nnunet.strategy.replies import AcceptedReply
from flwr_nnunet.strategy.role_aggregation import align_matched_, role_weighted_mean_
from flwr_nnunet.strategy.rounds import run_rounds
from flwr_nnunet.strategy.site_diagnostics import SiteDiagnostics
from flwr_nnunet.strategy.validator import instruction_nodes

__all__ = ["Identify", "PlansCheckpoints", "RoleMatchedFedAvg"]

Identify = Callable[[Grid, list[int]], tuple[Mapping[int, str], Mapping[int, str]]]
"""``identify(grid, nodes)``: which plans each node trains, ``({node: plans name}, {node: why it is refused})``."""


class PlansCheckpoints:
    """Every plans' :class:`~flwr_nnunet.strategy.checkpoints.RunCheckpoints`, as the round loop sees one: each
    checkpoint is written to every plans' model folder, and a resume continues every one from the same round."""

    def __init__(self, members: Mapping[str, NnUNetFedAvg]) -> None:
        self.members = members

    @property
    def completed_rounds(self) -> int:
        """The last round every plans' folder holds."""
        return min(member.checkpoints.completed_rounds for member in self.members.values())

    def prepare_folder(self) -> None:
        """Each plans' model folder's metadata written, temp files a killed server left removed."""
        for member in self.members.values():
            member.checkpoints.prepare_folder()

    def end_round(self, server_round: int, strategy: Any) -> None:
        """``checkpoint_latest.pth`` in every plans' folder, with ``strategy``'s state."""
        for member in self.members.values():
            member.checkpoints.end_round(server_round, strategy)

    def save(self, name: str, server_round: int, strategy: Any = None) -> None:
        """``checkpoint_<name>.pth`` in every plans' folder."""
        for member in self.members.values():
            member.checkpoints.save(name, server_round, strategy)

    def resume(self, strategy: Any, run_config: Mapping[str, Any] | None = None) -> int:
        """Load every plans' newest intact checkpoint; return the round they all completed.

        Raises
        ------
        ResumeError
            If a folder cannot be resumed (see :meth:`RunCheckpoints.resume`), or the folders hold different
            rounds (one missing: it holds none), naming each plans' round.
        """
        rounds = {name: member.checkpoints.resume(strategy, run_config) for name, member in self.members.items()}
        if len(set(rounds.values())) > 1:
            held = ", ".join(f"{name}: round {r}" for name, r in rounds.items())
            raise ResumeError(
                f"the plans' model folders hold different rounds ({held}; 0: no checkpoint): every plans' folder "
                "must come from the same run; restore the missing folder's checkpoints, or start in a new "
                "results-dir"
            )
        return next(iter(rounds.values()))


class RoleMatchedFedAvg(FedAvg):
    """Federated averaging of sites that train different nnU-Net plans, each unit of matched layers once.

    Parameters
    ----------
    networks : Mapping[str, torch.nn.Module]
        Plans name -> the global network built from those plans (the same seed for every one); the first is the
        run's main plans (its model folder holds the run's history). Their parameters are overwritten in place;
        the matched ones are made equal to the first network that has them at construction.
    plans : Mapping[str, dict]
        Plans name -> the plans; their digest travels as ``plans-sha256`` to the sites of that plans.
    model_folders : Mapping[str, NnUNetModelFolder], optional
        Plans name -> where that plans' global checkpoints go (``checkpoint_latest.pth`` each round,
        ``checkpoint_best.pth`` when its sites' aggregated ``dice`` improves, ``checkpoint_final.pth``).
    site_plans : Mapping[int, str], optional
        Node id -> the plans it trains, where already known.
    identify : Identify, optional
        Asked which plans a sampled node trains the first time one without a plans comes up; a node it refuses
        (or every such node without it) is left out of each round, with one log line.
    run_config : Mapping, optional
        The run config; its digest is stored in every checkpoint and a resume refuses a different one.
    roles : callable (default: :func:`~flwr_nnunet.nnunet.layer_roles.role_keys`)
        Key -> role key of one network's keys: which layers correspond across plans.
    local_keys : callable, optional
        ``key -> bool``; alias groups in which any key matches stay at each site (e.g.
        :func:`~flwr_nnunet.nnunet.networks.is_normalization_key`, FedBN): not sent, not matched, not averaged.
    post_round_fn : callable, optional
        ``(server_round, strategy) -> None``, called after each round.
    diagnostics : SiteDiagnostics, optional
        Shared by every plans (each compares its own sites' replies); default ``SiteDiagnostics()``.
    flagged_weight : float (default: 1.0)
        What a flagged site's replies count for (see :class:`~flwr_nnunet.strategy.fedavg.NnUNetFedAvg`).
    **kwargs
        Every argument of :class:`flwr.serverapp.strategy.FedAvg`; ``min_train_nodes`` and
        ``min_evaluate_nodes`` count the accepted replies of every plans together.
    """

    streams: ClassVar[bool] = False
    """A round needs every plans' replies at once."""

    def __init__(
        self,
        networks: Mapping[str, nn.Module],
        plans: Mapping[str, dict],
        *,
        model_folders: Mapping[str, NnUNetModelFolder] | None = None,
        site_plans: Mapping[int, str] | None = None,
        identify: Identify | None = None,
        run_config: Mapping[str, Any] | None = None,
        roles: Callable[[Iterable[str]], dict[str, str]] = role_keys,
        local_keys: Callable[[str], bool] | None = None,
        post_round_fn: Callable[[int, RoleMatchedFedAvg], None] | None = None,
        diagnostics: SiteDiagnostics | None = None,
        flagged_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if not networks or set(networks) != set(plans):
            raise ValueError(f"networks and plans must name the same plans, got {list(networks)} and {list(plans)}")
        kwargs.setdefault("evaluate_metrics_aggr_fn", aggregate_site_metrics)
        super().__init__(**kwargs)
        self.diagnostics = SiteDiagnostics() if diagnostics is None else diagnostics
        folders = dict(model_folders or {})
        self.members = {
            name: NnUNetFedAvg(
                network,
                plans=plans[name],
                model_folder=folders.get(name),
                run_config=run_config,
                local_keys=local_keys,
                diagnostics=self.diagnostics,
                flagged_weight=flagged_weight,
                min_train_nodes=1,
                min_evaluate_nodes=1,
                weighted_by_key=self.weighted_by_key,
                arrayrecord_key=self.arrayrecord_key,
                configrecord_key=self.configrecord_key,
            )
            for name, network in networks.items()
        }
        self.main = next(iter(self.members))
        shapes = {name: {k: tuple(t.shape) for k, t in m.model.tensors.items()} for name, m in self.members.items()}
        self.matching = match_layers(shapes, roles)
        align_matched_(self._models(), self.matching)
        for member in self.members.values():
            member.model.changed()
        self.checkpoints = PlansCheckpoints(self.members)
        self.site_plans: dict[int, str] = dict(site_plans or {})
        self.refused: dict[int, str] = {}
        """Node id -> why it is left out (its plans refused, or not known)."""
        self.identify = identify
        self.post_round_fn = post_round_fn

    @property
    def model(self) -> GlobalModel:
        """The main plans' global model."""
        return self.members[self.main].model

    @property
    def model_folder(self) -> NnUNetModelFolder | None:
        """The main plans' model folder."""
        return self.members[self.main].model_folder

    def _models(self) -> dict[str, Mapping[str, Any]]:
        return {name: member.model.tensors for name, member in self.members.items()}

    # -------------------------------------------------------------- sites

    def identify_nodes(self, grid: Grid, nodes: Sequence[int]) -> None:
        """Ask ``identify`` which plans the ``nodes`` not known yet train; remember the answers and refusals."""
        unknown = [int(n) for n in nodes if n not in self.site_plans and n not in self.refused]
        if not unknown:
            return
        found, refused = self.identify(grid, unknown) if self.identify is not None else ({}, {})
        for node in unknown:
            if found.get(node) in self.members:
                self.site_plans[node] = found[node]
            else:
                self.refused[node] = refused.get(node) or "which plans it trains is not known to the server"

    def _by_plans(self, server_round: int, stage: str, nodes: Sequence[int], grid: Grid) -> dict[str, list[int]]:
        """The sampled ``nodes`` by the plans each trains; each node left out logged once for the round."""
        self.identify_nodes(grid, nodes)
        by_plans: dict[str, list[int]] = {}
        for node in nodes:
            if node in self.site_plans:
                by_plans.setdefault(self.site_plans[node], []).append(node)
            else:
                log(WARNING, "%s: round %d: node %d left out: %s", stage, server_round, node, self.refused[node])
        return by_plans

    # -------------------------------------------------------------- configure

    def _instructions(
        self, server_round: int, sampled: Iterable[Message], config: ConfigRecord, grid: Grid, *, train: bool
    ) -> list[Message]:
        """Per sampled node: its plans' canonical tensors with that plans' wire config (alias map, digest)."""
        stage = "configure_train" if train else "configure_evaluate"
        kind = MessageType.TRAIN if train else MessageType.EVALUATE
        by_plans = self._by_plans(server_round, stage, [m.metadata.dst_node_id for m in sampled], grid)
        messages = []
        for name, member in self.members.items():
            record = RecordDict(
                {
                    self.arrayrecord_key: member.model.record(),
                    self.configrecord_key: member.wire_config(ConfigRecord(dict(config))),
                }
            )
            mine = list(self._construct_messages(record, by_plans.get(name, []), kind))
            messages += member.validator.expect(member.without_excluded(server_round, mine) if train else mine)
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's node sampling; each sampled node gets its own plans' model (``arrays`` is not sent)."""
        sampled = super().configure_train(server_round, ArrayRecord(), config, grid)
        return self._instructions(server_round, sampled, config, grid, train=True)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's node sampling; each sampled node gets its own plans' model to evaluate."""
        sampled = super().configure_evaluate(server_round, ArrayRecord(), config, grid)
        return self._instructions(server_round, sampled, config, grid, train=False)

    @property
    def min_train_replies(self) -> int:
        """The accepted training replies a round needs: ``min_train_nodes``, less the flagged sites excluded."""
        return max(1, self.min_train_nodes - sum(len(member.excluded) for member in self.members.values()))

    # ---------------------------------------------------------------- replies

    def _accepted(
        self, server_round: int, replies: Iterable[Message], *, is_train: bool
    ) -> list[tuple[str, AcceptedReply]]:
        """Each reply checked by the validator of the plans its node trains: ``(plans name, accepted reply)``."""
        sent_to = instruction_nodes([m for member in self.members.values() for m in member.validator.sent])
        routed: dict[str, list[Message]] = {name: [] for name in self.members}
        for reply in replies:
            node = reply.metadata.src_node_id
            if node == SUPERLINK_NODE_ID:  # the SuperLink answered for a lost node: route it as its instruction
                node = sent_to.get(reply.metadata.reply_to_message_id, node)
            routed[self.site_plans.get(node, self.main)].append(reply)
        return [
            (name, reply)
            for name, member in self.members.items()
            if member.validator.sent or routed[name]
            for reply in member.accept_replies(server_round, routed[name], is_train=is_train)
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply against its plans, then average every unit of matched layers once, in place.

        Returns the main plans' ``ArrayRecord`` and the metrics aggregated over every site, or ``(None, None)``
        when fewer than :attr:`min_train_replies` are valid or a mean is not finite; then every plans' global
        model is bit-identical to before.
        """
        start = time.perf_counter()
        accepted = self._accepted(server_round, replies, is_train=True)
        if not enough_replies("aggregate_train", server_round, len(accepted), self.min_train_replies):
            return None, None
        snapshots = {name: member.model.snapshot() for name, member in self.members.items()}
        non_finite = role_weighted_mean_(
            self._models(), self.matching, [(name, reply.tensors, reply.weight) for name, reply in accepted]
        )
        if non_finite:
            for name, member in self.members.items():
                member.model.roll_back_(snapshots[name])
            log(
                WARNING,
                "aggregate_train: round %d: the mean of %s is not finite: every plans' global model unchanged",
                server_round,
                non_finite[:5],
            )
            return None, None
        for member in self.members.values():
            member.model.changed()
        replies_only = [reply for _, reply in accepted]
        metrics = aggregate_metrics(self.train_metrics_aggr_fn, replies_only, self.weighted_by_key, "aggregate_train")
        self._log_round(server_round, accepted, time.perf_counter() - start)
        return self.model.record(), metrics

    def _log_round(self, server_round: int, accepted: Sequence[tuple[str, AcceptedReply]], seconds: float) -> None:
        """One line: how many replies (which nodes, what weight) each plans got, and how many units were shared."""
        parts = []
        for name in self.members:
            nodes = sorted(reply.node_id for plans, reply in accepted if plans == name)
            weight = sum(reply.weight for plans, reply in accepted if plans == name)
            parts.append(
                f"{name} {len(nodes)} repl{'y' if len(nodes) == 1 else 'ies'} (nodes {nodes}, weight {weight:g})"
            )
        shared = sum(1 for unit in self.matching.units if len(unit) > 1)
        log(
            INFO,
            "aggregate_train: round %d: by role: %s; %d units matched across plans, %d local to one plans, in %.2f s",
            server_round,
            ", ".join(parts),
            shared,
            len(self.matching.units) - shared,
            seconds,
        )

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Metrics aggregated over every site; each plans' ``checkpoint_best.pth`` follows its own sites' ``dice``."""
        accepted = self._accepted(server_round, replies, is_train=False)
        if not enough_replies("aggregate_evaluate", server_round, len(accepted), self.min_evaluate_nodes):
            return None
        for name, member in self.members.items():
            own = [reply for plans, reply in accepted if plans == name]
            metrics = aggregate_metrics(aggregate_site_metrics, own, self.weighted_by_key, "aggregate_evaluate")
            if own and metrics is not None:
                member.checkpoints.note_dice(server_round, metrics.get("dice"))
        replies_only = [reply for _, reply in accepted]
        return aggregate_metrics(
            self.evaluate_metrics_aggr_fn, replies_only, self.weighted_by_key, "aggregate_evaluate"
        )

    # -------------------------------------------------------- rounds & resume

    def on_round_end(self, server_round: int) -> None:
        """Called at the end of every round of :meth:`start` (default: ``post_round_fn``)."""
        if self.post_round_fn is not None:
            self.post_round_fn(server_round, self)

    def strategy_state(self) -> dict[str, Any]:
        """What a resumed run needs besides the weights: the :attr:`diagnostics`' flags."""
        return {"site-diagnostics": self.diagnostics.state()}

    def load_strategy_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`strategy_state` returned."""
        self.diagnostics.load_state(state.get("site-diagnostics") or {})

    def resume(self, run_config: Mapping[str, Any] | None = None) -> int:
        """Continue every plans' model folder from its newest intact checkpoint (see
        :meth:`PlansCheckpoints.resume`); return the last completed round."""
        return self.checkpoints.resume(self, run_config)

    def start(self, grid: Grid, num_rounds: int = 3, **kwargs: Any) -> Result:
        """Run rounds ``checkpoints.completed_rounds + 1`` to ``num_rounds``, checkpointing every plans' model
        each round (see :func:`~flwr_nnunet.strategy.rounds.run_rounds`; ``kwargs``: ``timeout``,
        ``train_config``, ``evaluate_config``, ``evaluate_fn``, ``node_wait``). ``result.arrays`` is the main
        plans' model."""
        return run_rounds(
            self, self.model, self.checkpoints, grid, num_rounds=num_rounds, on_round_end=self.on_round_end, **kwargs
        )
