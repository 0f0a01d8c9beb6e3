"""Per-round checks of client replies against the global model: reject, never crash.

A :class:`ReplyValidator` turns each reply ``Message`` into either an
:class:`~flwr_nnunet.strategy.replies.AcceptedReply` or a
:class:`~flwr_nnunet.strategy.replies.Rejection`, and names the node a reply speaks for when the SuperLink
answered for a lost one. Nothing here raises on bad input and nothing is unpickled.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore import log

from flwr_nnunet.core.aliasing import AliasConflictError, AliasMap, strip_wrapper_prefixes
from flwr_nnunet.core.codec import PayloadError, from_array_record
from flwr_nnunet.core.delta_codec import BASE_KEY, COMPRESSION_KEY, SCALES_RECORD, apply_delta, decode_delta
from flwr_nnunet.errors import KeyMismatchError
from flwr_nnunet.strategy.aggregation import enough_replies, log_rejection
from flwr_nnunet.strategy.model_sender import ModelSender
from flwr_nnunet.strategy.replies import (
    METRIC_RANGES,
    AcceptedReply,
    Rejection,
    bounded,
    check_weight,
    content_order,
    decompressed_message,
    metric_problem,
    tensors_problem,
    total_weight_problem,
)

__all__ = ["ReplyValidator", "error_reason", "instruction_nodes"]

PLANS_SHA256_KEY = "plans-sha256"


def instruction_nodes(sent: Iterable[Message]) -> dict[str, int]:
    """Message id -> destination node of the instructions ``sent`` that have an id (the grid sets ids on the
    message objects when it pushes them: ``InMemoryGrid`` a uuid, the SuperLink grids the object id)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}


def error_reason(message: Message, node: int, unanswered: Sequence[int] = ()) -> str:
    """The rejection reason of an error reply: the node's own error, or the SuperLink's when it answered in the
    place of ``node`` (a lost node: its sender is the SuperLink). When the instruction is not known
    (``node`` is the SuperLink's id), ``unanswered`` lists the nodes of the round that sent no reply of their own.
    """
    error = message.error
    if message.metadata.src_node_id != SUPERLINK_NODE_ID:
        return f"the node reported an error: {error.reason}"
    if node != SUPERLINK_NODE_ID:
        target = f"node {node}"
    else:
        target = f"one of the nodes that did not reply, {list(unanswered)[:20]} (its instruction id is unknown)"
    return f"the SuperLink answered for {target} (error code {error.code}): {error.reason}"


class ReplyValidator:
    """Checks replies against the global model's canonical tensors.

    Rules, in order, for each reply of a round (arrival order):

    - Only the first reply from a node counts; a later one from the same node is rejected as a duplicate.
    - An error reply is rejected with its reason; one the SuperLink generated for a lost node (its sender is
      the SuperLink) is logged under the node the instruction went to (see :meth:`expect`).
    - Exactly one ``MetricRecord``; its weight ``weighted_by_key`` finite and > 0 in float64; every numeric
      metric finite, one number where :data:`~flwr_nnunet.strategy.replies.SCALAR_METRICS` names it, and within
      :data:`METRIC_RANGES` (``metric_ranges``) where it has a range.
    - The plans digest, then keys, shapes, dtypes and finiteness of the arrays (training replies). A compressed
      reply (run-config ``compression``) must use the run's scheme and start from the model sent this round; its
      delta is checked (:func:`~flwr_nnunet.core.delta_codec.decode_delta`) and added to the round's global
      model (:meth:`~flwr_nnunet.strategy.model_sender.ModelSender.global_values`), and
      the reply goes on as an uncompressed one holding that sum (:func:`decompressed_message`).
    - Training: the weight (``reply_weight()``) finite and > 0, clipped to ``max_reply_weight`` when given; the
      accepted weights must sum to a finite float64, or the round is refused.

    Parameters
    ----------
    alias_map
        The global network's alias map; a reply carrying every key of it (a full
        state_dict) is collapsed to canonical tensors when its aliases agree.
    reference
        Canonical key -> tensor of the global model for the groups that are
        aggregated: replies must carry exactly these keys (or a superset allowed
        by ``optional_keys``) with the same shapes and dtypes.
    plans_sha256
        The server's plans digest; a reply whose ``ConfigRecord`` carries a
        different ``plans-sha256`` is rejected. None disables the check.
    weighted_by_key
        The metric holding the reply's weight (``num-examples``).
    arrayrecord_key
        Where the reply's ``ArrayRecord`` is expected.
    optional_keys
        Canonical keys a reply may carry besides ``reference`` (groups that stay
        local at each site); they are dropped.
    required_metrics
        Metrics every training reply must carry as a finite number (e.g. the training
        loss q-FedAvg weighs replies with); extend it on the instance as needed.
    max_reply_weight
        None, or the largest weight one training reply may have: larger ones are clipped to it (logged).
    metric_ranges
        Metric name -> (low, high): replies with a value outside are rejected (default :data:`METRIC_RANGES`).
    model_sender
        With compression: what the sites were sent (its scheme and current digest); None: replies are never
        compressed.
    """

    def __init__(
        self,
        alias_map: AliasMap,
        reference: Mapping[str, torch.Tensor],
        *,
        plans_sha256: str | None = None,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        optional_keys: Collection[str] = (),
        required_metrics: Collection[str] = (),
        max_reply_weight: float | None = None,
        metric_ranges: Mapping[str, tuple[float, float]] = METRIC_RANGES,
        model_sender: ModelSender | None = None,
    ) -> None:
        if max_reply_weight is not None and check_weight(max_reply_weight, "max_reply_weight"):
            raise ValueError(f"max_reply_weight must be a finite number > 0 or None, got {max_reply_weight!r}")
        self.alias_map = alias_map
        self.reference = reference
        self.plans_sha256 = plans_sha256
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key = arrayrecord_key
        self.optional_keys = frozenset(optional_keys)
        self.required_metrics = tuple(required_metrics)
        self.max_reply_weight = None if max_reply_weight is None else float(max_reply_weight)
        self.metric_ranges = dict(metric_ranges)
        self.model_sender = model_sender
        self.sent: list[Message] = []
        self.unanswered: tuple[int, ...] = ()

    def expect(self, messages: Iterable[Message]) -> list[Message]:
        """Remember the round's instructions (returned as a list) to name, for a reply the SuperLink generates,
        the node its instruction went to: the grid gives each message its id when it pushes it, and the reply's
        ``reply_to_message_id`` is that id."""
        self.sent = list(messages)
        return self.sent

    def sender(self, message: Message, sent_to: Mapping[str, int]) -> int:
        """The node a reply speaks for: when the SuperLink answered in its place, the destination of the
        instruction whose id is the reply's ``reply_to_message_id`` (else the one node of the round that sent no
        reply of its own, else the SuperLink's id); otherwise the reply's sender."""
        metadata = message.metadata
        if metadata.src_node_id != SUPERLINK_NODE_ID:
            return metadata.src_node_id
        fallback = self.unanswered[0] if len(self.unanswered) == 1 else SUPERLINK_NODE_ID
        return sent_to.get(metadata.reply_to_message_id, fallback)

    def accept(
        self,
        server_round: int,
        replies: Iterable[Message],
        *,
        weight: Callable[[AcceptedReply], float] | None,
        minimum: int,
        check_finite: bool = True,
    ) -> list[AcceptedReply]:
        """Check replies (the rules of the class), log one line per rejected one, return the accepted ones in
        :func:`content_order` (so the floating-point result depends neither on arrival order nor on node ids), or none when fewer than
        ``minimum`` are or their weights do not sum to a finite float64.

        Parameters
        ----------
        weight
            For training replies: the aggregation weight of an accepted reply (it must be finite and > 0);
            None for evaluation replies.
        check_finite
            See :meth:`check_train`.
        """
        stage = "aggregate_evaluate" if weight is None else "aggregate_train"
        replies = list(replies)
        sent_to = instruction_nodes(self.sent)
        answered = {m.metadata.src_node_id for m in replies}
        self.unanswered = tuple(sorted({m.metadata.dst_node_id for m in self.sent} - answered))
        accepted: list[AcceptedReply] = []
        seen: set[int] = set()
        for message in replies:
            node = self.sender(message, sent_to)
            unresolved = node == SUPERLINK_NODE_ID and message.has_error()  # the SuperLink, for an unknown node
            if node in seen and not unresolved:
                result = Rejection(node, "a second reply from this node in the round: only the first one counts")
            elif weight is None:
                result = self.check_evaluate(message, node)
            else:
                result = self._weighed(server_round, self.check_train(message, check_finite=check_finite), weight)
            seen.add(node)
            if isinstance(result, Rejection):
                log_rejection(stage, server_round, result)
            else:
                accepted.append(result)
        silent = [node for node in self.unanswered if node not in seen]
        if silent:
            log(
                WARNING,
                "%s: round %d: no reply from node(s) %s before the round timeout (run-config round-timeout)",
                stage,
                server_round,
                silent[:20],
            )
        log(INFO, "%s: round %d: %d of %d replies accepted", stage, server_round, len(accepted), len(replies))
        problem = total_weight_problem([a.weight for a in accepted]) if accepted else None
        if problem:
            nodes = [a.node_id for a in accepted]
            log(WARNING, "%s: round %d: nodes %s: %s: round refused", stage, server_round, nodes[:20], problem)
            return []
        if not enough_replies(stage, server_round, len(accepted), minimum):
            return []
        return sorted(accepted, key=content_order)

    def _weighed(
        self,
        server_round: int,
        result: AcceptedReply | Rejection,
        weight: Callable[[AcceptedReply], float],
    ) -> AcceptedReply | Rejection:
        """``result`` with its weight set (clipped to ``max_reply_weight``), or rejected for a bad weight."""
        if isinstance(result, Rejection):
            return result
        value = weight(result)
        reason = check_weight(value, "reply_weight()")
        if reason:
            return Rejection(result.node_id, reason)
        result.weight = float(value)
        if self.max_reply_weight is not None and result.weight > self.max_reply_weight:
            log(
                INFO,
                "aggregate_train: round %d: node %d: weight %g clipped to max_reply_weight %g",
                server_round,
                result.node_id,
                result.weight,
                self.max_reply_weight,
            )
            result.weight = self.max_reply_weight
        return result

    def check_train(self, message: Message, *, check_finite: bool = True) -> AcceptedReply | Rejection:
        """Validate a training reply: error, records, weight, metrics, plans digest, keys, shapes, dtypes,
        finiteness.

        ``check_finite=False`` leaves out the NaN/Inf pass over the tensors for
        callers that detect non-finite values in their result instead.
        """
        node = self.sender(message, instruction_nodes(self.sent))
        rejected = self._check_common(message, node)
        if isinstance(rejected, Rejection):
            return rejected
        metrics, weight = rejected
        for key in self.required_metrics:
            value = metrics.get(key)
            if not isinstance(value, (int, float)) or metric_problem(key, value):
                return Rejection(node, f"metric {key!r} must be a finite number, got {bounded(repr(value), 80)}")
        record = message.content.array_records.get(self.arrayrecord_key)
        if not isinstance(record, ArrayRecord):
            return Rejection(node, f"no ArrayRecord under {self.arrayrecord_key!r}")
        scheme = _reply_config(message, COMPRESSION_KEY)
        if scheme is not None:
            reason = self._compression_problem(scheme, _reply_config(message, BASE_KEY))
            if reason:
                return Rejection(node, reason)
        try:
            if scheme is None:
                tensors = self._canonical(from_array_record(record))
            else:
                delta = (record, message.content.array_records.get(SCALES_RECORD, ArrayRecord()))
                sent = self.model_sender.global_values()
                tensors = apply_delta(sent, decode_delta(delta, sent, self.model_sender.scheme))
        except PayloadError as error:
            return Rejection(node, f"undecodable payload: {error}")
        except (KeyError, AliasConflictError) as error:
            return Rejection(node, str(error.args[0]))
        reason = self.check_tensors(tensors, check_finite=check_finite)
        if reason:
            return Rejection(node, reason)
        if scheme is not None:  # the reply holds its decoded model once: the tensors view the new record's bytes
            message = decompressed_message(message, tensors, self.arrayrecord_key)
            tensors = from_array_record(message.content[self.arrayrecord_key])
        return AcceptedReply(message, tensors, metrics, weight)

    def _compression_problem(self, scheme: object, base: object) -> str | None:
        """Why a reply compressed with ``scheme`` from the model of digest ``base`` cannot be decoded, or None."""
        if self.model_sender is None:
            return (
                f"the reply is compressed ({bounded(repr(scheme), 40)}), but this run's run-config compression is none"
            )
        if scheme != self.model_sender.scheme.name:
            return (
                f"the reply is compressed with {bounded(repr(scheme), 40)}, but this run's run-config compression is "
                f"{self.model_sender.scheme.name}"
            )
        if base != self.model_sender.digest:
            return (
                f"the reply's update is from model {bounded(base, 12)}..., not from the model sent this round "
                f"({str(self.model_sender.digest)[:12]}...)"
            )
        return None

    def check_evaluate(self, message: Message, node: int | None = None) -> AcceptedReply | Rejection:
        """Validate an evaluation reply: error, one MetricRecord, weight, plans digest, finite metrics in range."""
        node = self.sender(message, instruction_nodes(self.sent)) if node is None else node
        checked = self._check_common(message, node)
        if isinstance(checked, Rejection):
            return checked
        metrics, weight = checked
        return AcceptedReply(message, OrderedDict(), metrics, weight)

    def _check_common(self, message: Message, node: int) -> tuple[MetricRecord, float] | Rejection:
        if message.has_error():
            return Rejection(node, error_reason(message, node, self.unanswered))
        if not message.has_content():
            return Rejection(node, "the reply has no content")
        metric_records = message.content.metric_records
        if len(metric_records) != 1:
            return Rejection(node, f"expected exactly one MetricRecord, got {len(metric_records)}")
        metrics = next(iter(metric_records.values()))
        reason = check_weight(metrics.get(self.weighted_by_key), self.weighted_by_key)
        if reason:
            return Rejection(node, reason)
        for key, value in metrics.items():
            reason = metric_problem(key, value, self.metric_ranges.get(key))
            if reason:
                return Rejection(node, reason)
        reason = self._check_plans(message.content.config_records.values())
        if reason:
            return Rejection(node, reason)
        return metrics, float(metrics[self.weighted_by_key])

    def _check_plans(self, configs: Collection[ConfigRecord]) -> str | None:
        if self.plans_sha256 is None:
            return None
        for config in configs:
            digest = config.get(PLANS_SHA256_KEY)
            if digest is not None and digest != self.plans_sha256:
                return (
                    f"plans-sha256 {str(digest)[:12]}... differs from the server's {self.plans_sha256[:12]}...: "
                    "the site trains with other plans (re-run nnUNetv2_preprocess with the federation's plans)"
                )
        return None

    def _canonical(self, tensors: OrderedDict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        """The reply's tensors for the aggregated groups.

        ``_orig_mod.``/``module.`` prefixes (a compiled or DDP-wrapped client
        network) are removed, and a full state_dict is collapsed first.
        """
        tensors = strip_wrapper_prefixes(tensors)
        if len(tensors) == len(self.alias_map.keys) and set(tensors) == set(self.alias_map.keys):
            tensors = self.alias_map.collapse(tensors)
        KeyMismatchError.check(
            tensors,
            self.reference,
            what="the reply's arrays",
            against="the global model",
            fix="the site must build its network from the server's plans, configuration and trainer",
            optional=self.optional_keys,
        )
        return OrderedDict((k, tensors[k]) for k in self.reference)

    def check_tensors(self, tensors: Mapping[str, torch.Tensor], *, check_finite: bool = True) -> str | None:
        """Why ``tensors`` (the reference's keys) do not fit the reference's shapes and dtypes or are not finite."""
        return tensors_problem(self.reference, tensors, check_finite=check_finite)


def _reply_config(message: Message, key: str) -> object:
    """The value of ``key`` in the reply's config records, or None."""
    for config in message.content.config_records.values():
        if key in config:
            return config[key]
    return None
