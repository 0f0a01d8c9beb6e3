"""Checks of client replies against the global model: reject, never crash.

A :class:`ReplyValidator` turns each reply ``Message`` into either an
:class:`AcceptedReply` (canonical tensors that view the received bytes, the
reply's weight and metrics) or a :class:`Rejection` (the node and one line that
says why). Nothing here raises on bad input and nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore import log

from flwr_nnunet.core.aliasing import AliasConflictError, AliasMap, strip_wrapper_prefixes
from flwr_nnunet.core.codec import PayloadError, from_array_record
from flwr_nnunet.errors import FlwrNnUNetError, KeyMismatchError

__all__ = [
    "METRIC_RANGES",
    "AcceptedReply",
    "Rejection",
    "ReplyValidator",
    "RoundRefused",
    "aggregate_metrics",
    "bounded",
    "canonical_message",
    "check_weight",
    "content_order",
    "enough_replies",
    "error_reason",
    "instruction_nodes",
    "log_aggregated",
    "log_rejection",
    "metric_problem",
    "non_finite_reason",
    "reduce_accepted",
    "tensors_problem",
    "total_weight_problem",
    "without_non_finite",
]

PLANS_SHA256_KEY = "plans-sha256"
MAX_REASON_CHARS = 500
"""Longest reason (or error text) written to the log; longer ones are cut (see :func:`bounded`)."""
METRIC_RANGES: Mapping[str, tuple[float, float]] = {
    "dice": (0.0, 1.0),
    "dice-per-class": (0.0, 1.0),
    "pseudo-dice": (0.0, 1.0),
    "pseudo-dice-per-class": (0.0, 1.0),
}
"""The closed range of each metric the sites send that has one (every value of a list metric); every other
numeric metric (losses included) must only be finite."""


class RoundRefused(FlwrNnUNetError, ArithmeticError):
    """Raised by a reduction hook (``reduce_all_``) when the round's result as a whole must be refused, with no
    reply to blame (a server-optimizer step that would go non-finite): ``aggregate_train`` rolls the model back
    and logs the message once."""


def bounded(text: object, limit: int = MAX_REASON_CHARS) -> str:
    """``str(text)`` on one line and at most ``limit`` characters plus ``"... (N characters)"`` when cut."""
    text = str(text)
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters)"
    return text.replace("\r", "\\r").replace("\n", "\\n")


@dataclass(frozen=True)
class Rejection:
    """A reply that was dropped: the sending node and why."""

    node_id: int
    reason: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", bounded(self.reason))


@dataclass
class AcceptedReply:
    """A reply that passed every check.

    Attributes
    ----------
    message
        The reply as received.
    tensors
        Canonical key -> tensor (read-only views of the received bytes; empty for
        evaluate replies).
    metrics
        The reply's ``MetricRecord``.
    num_examples
        The validated weight value (``weighted_by_key``) as a float.
    weight
        The aggregation weight (training: ``reply_weight()``, capped at the strategy's ``max_reply_weight``;
        evaluation: ``num_examples``).
    """

    message: Message
    tensors: OrderedDict[str, torch.Tensor] = field(repr=False)
    metrics: MetricRecord
    num_examples: float
    weight: float = 0.0

    def __post_init__(self) -> None:
        if not self.weight:
            self.weight = self.num_examples

    @property
    def node_id(self) -> int:
        """The node that sent the reply."""
        return self.message.metadata.src_node_id


def check_weight(value: object, key: str) -> str | None:
    """Why ``value`` is not a usable aggregation weight, or None when it is: an int or float that is finite and
    > 0 as a float64 (an integer beyond float64's range is refused, not raised on)."""
    if value is None:
        return f"metric {key!r} is missing"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"metric {key!r} is a {type(value).__name__}, not a number"
    try:
        number = float(value)
    except OverflowError:
        return f"metric {key!r} is an integer of {value.bit_length()} bits, beyond float64's range"
    if not math.isfinite(number):
        return f"metric {key!r} is {value}, not finite"
    if number <= 0:
        return f"metric {key!r} is {value}, must be > 0"
    return None


def total_weight_problem(weights: Sequence[float]) -> str | None:
    """Why the float64 sum of ``weights`` (each finite and > 0) cannot normalize them, or None."""
    total = sum(float(w) for w in weights)
    if math.isfinite(total):
        return None
    return (
        f"the accepted weights sum to {total} in float64 (largest {max(weights):g}): set max_reply_weight to cap "
        "each reply's weight"
    )


def metric_problem(key: str, value: object, valid_range: tuple[float, float] | None = None) -> str | None:
    """Why metric ``key`` (a number or a list of numbers) is not finite or not in ``valid_range``, or None."""
    for item in value if isinstance(value, list) else [value]:
        try:
            number = float(item)
        except (OverflowError, TypeError, ValueError):
            return f"metric {key!r} holds {bounded(repr(item), 40)}, not a finite number"
        if not math.isfinite(number):
            return f"metric {key!r} is not finite ({bounded(repr(value), 80)})"
        if valid_range is not None and not valid_range[0] <= number <= valid_range[1]:
            return f"metric {key!r} holds {number:g}, outside [{valid_range[0]:g}, {valid_range[1]:g}]"
    return None


def instruction_nodes(sent: Iterable[Message]) -> dict[str, int]:
    """Message id -> destination node of the instructions ``sent`` that have an id (the grid sets ids on the
    message objects when it pushes them: ``InMemoryGrid`` a uuid, the SuperLink grids the object id)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}


def non_finite_reason(key: str, tensor: torch.Tensor) -> str | None:
    """Why a floating tensor holds non-finite values, or None.

    A sum in float32 or wider is a single fast pass; only when it is not finite
    are NaN and Inf counted (an overflowing but finite sum passes).
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    total = tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    if torch.isfinite(total):
        return None
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    if nan == 0 and inf == 0:
        return None
    return f"{key!r} holds {nan} NaN and {inf} Inf values"


def tensors_problem(
    reference: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], *, check_finite: bool = True
) -> str | None:
    """Why ``tensors`` (``reference``'s keys) differ from ``reference`` in shape or dtype or are not finite, or None."""
    for key, like in reference.items():
        tensor = tensors[key]
        if tensor.shape != like.shape:
            return f"{key!r} has shape {tuple(tensor.shape)}, expected {tuple(like.shape)}"
        if tensor.dtype != like.dtype:
            return f"{key!r} has dtype {tensor.dtype}, expected {like.dtype}"
    for key, tensor in tensors.items() if check_finite else ():
        reason = non_finite_reason(key, tensor)
        if reason:
            return reason
    return None


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


def log_rejection(stage: str, server_round: int, rejection: Rejection) -> None:
    """One warning line naming the stage, round, node and reason."""
    log(
        WARNING,
        "%s: round %d: rejected reply from node %d: %s",
        stage,
        server_round,
        rejection.node_id,
        rejection.reason,
    )


def enough_replies(stage: str, server_round: int, count: int, minimum: int) -> bool:
    """Whether ``count`` valid replies meet ``minimum`` (at least 1); logs what happens when they do not."""
    needed = max(1, minimum)
    if count >= needed:
        return True
    outcome = "global model unchanged" if stage == "aggregate_train" else "no metrics this round"
    log(
        WARNING,
        "%s: round %d: %d valid replies, fewer than the %d required: %s",
        stage,
        server_round,
        count,
        needed,
        outcome,
    )
    return False


def canonical_message(
    message: Message,
    keys: Sequence[str],
    arrayrecord_key: str = "arrays",
    *,
    weight: tuple[str, float] | None = None,
) -> Message:
    """``message`` itself when its arrays are exactly ``keys`` in order (and its weight metric is ``weight``),
    else a copy whose ``ArrayRecord`` holds only the arrays of ``keys`` (``_orig_mod.``/``module.`` prefixes
    removed), in order, and whose metric ``weight[0]`` is ``weight[1]`` (a capped weight, for Flower's code
    that reads weights from the messages).

    The copy shares the ``Array`` objects (no bytes are copied) and keeps the
    message's other records (metrics, config).
    """
    record = message.content[arrayrecord_key]
    (metrics_name, metrics), *_ = message.content.metric_records.items()
    reweigh = weight is not None and metrics.get(weight[0]) != weight[1]
    if list(record.keys()) == list(keys) and not reweigh:
        return message
    records = {name: value for name, value in message.content.items() if name != arrayrecord_key}
    names = strip_wrapper_prefixes({name: name for name in record})  # canonical -> the reply's name
    records[arrayrecord_key] = ArrayRecord(OrderedDict((k, record[names[k]]) for k in keys))
    if reweigh:
        records[metrics_name] = MetricRecord({**metrics, weight[0]: weight[1]})
    return make_message(message.metadata, content=RecordDict(records))


def aggregate_metrics(
    aggregate: Callable[[list[RecordDict], str], MetricRecord],
    accepted: Sequence[AcceptedReply],
    weighted_by_key: str,
    stage: str,
) -> MetricRecord | None:
    """``aggregate`` (a Flower metric aggregation function) of the accepted replies, or None (logged) when it
    fails on them."""
    try:
        return aggregate([a.message.content for a in accepted], weighted_by_key)
    except (ValueError, TypeError, KeyError, ZeroDivisionError) as error:
        log(WARNING, "%s: metrics could not be aggregated (%s); skipping them", stage, bounded(error))
        return None


def without_non_finite(
    server_round: int, accepted: Sequence[AcceptedReply], key: str, minimum: int
) -> list[AcceptedReply]:
    """The replies whose group ``key`` is finite, each other one rejected with a log line; none (the global model
    stays unchanged) when every reply's group is finite (their reduction overflowed) or fewer than ``minimum``
    remain."""
    kept = []
    for reply in accepted:
        reason = non_finite_reason(key, reply.tensors[key])
        if reason:
            log_rejection("aggregate_train", server_round, Rejection(reply.node_id, reason))
        else:
            kept.append(reply)
    if len(kept) == len(accepted):
        log(WARNING, "aggregate_train: round %d: the mean of %r overflowed: global model unchanged", server_round, key)
        return []
    return kept if enough_replies("aggregate_train", server_round, len(kept), minimum) else []


def reduce_accepted(
    server_round: int,
    accepted: list[AcceptedReply],
    reduce: Callable[[list[Mapping[str, torch.Tensor]], list[float]], list[str]],
    roll_back: Callable[[], None],
    minimum: int,
) -> list[AcceptedReply]:
    """Reduce the accepted replies by their weights; return those reduced, or none (the model rolled back).

    ``reduce(updates, weights)`` writes into the model and returns the keys whose result is not finite: then the
    model is rolled back and the replies whose group is not finite are dropped (:func:`without_non_finite`)
    before reducing again. When it raises :class:`RoundRefused` the model is rolled back and the refusal logged
    once.
    """
    while accepted:
        try:
            non_finite = reduce([a.tensors for a in accepted], [a.weight for a in accepted])
        except RoundRefused as refused:
            roll_back()
            log(WARNING, "aggregate_train: round %d: %s: global model unchanged", server_round, refused)
            return []
        if not non_finite:
            return accepted
        roll_back()
        accepted = without_non_finite(server_round, accepted, non_finite[0], minimum)
    return []


def log_aggregated(
    server_round: int, accepted: Sequence[AcceptedReply], groups: int, nbytes: int, seconds: float
) -> None:
    """One line for an aggregated training round: nodes, total weight, groups, size, time."""
    log(
        INFO,
        "aggregate_train: round %d: aggregated %d replies (nodes %s, total weight %g) into %d groups "
        "(%.1f MB) in place in %.2f s",
        server_round,
        len(accepted),
        sorted(a.node_id for a in accepted),
        sum(a.weight for a in accepted),
        groups,
        nbytes / 1e6,
        seconds,
    )


_ORDER_SAMPLES = 64
"""Elements of each tensor that :func:`content_order` reads."""


def content_order(reply: AcceptedReply) -> tuple[bytes, int]:
    """A sort key from the reply's contents: a digest of its weight, metrics and evenly spaced elements of each
    tensor (``_ORDER_SAMPLES`` per tensor, so it costs microseconds, not a pass over the model).

    Node ids are drawn at random by the SuperLink in every run and replies arrive in any order, so sorting
    by this key is what makes the same replies give a bit-identical aggregate in every run; replies whose
    samples agree exactly fall back to the node id (such replies are, in practice, identical).
    """
    digest = hashlib.sha256(repr((reply.weight, sorted(reply.metrics.items()))).encode())
    for key, tensor in reply.tensors.items():
        flat = tensor.reshape(-1)
        step = max(1, flat.numel() // _ORDER_SAMPLES)
        digest.update(key.encode())
        digest.update(flat[::step][:_ORDER_SAMPLES].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.digest(), reply.node_id


class ReplyValidator:
    """Checks replies against the global model's canonical tensors.

    Rules, in order, for each reply of a round (arrival order):

    - Only the first reply from a node counts; a later one from the same node is rejected as a duplicate.
    - An error reply is rejected with its reason; one the SuperLink generated for a lost node (its sender is
      the SuperLink) is logged under the node the instruction went to (see :meth:`expect`).
    - Exactly one ``MetricRecord``; its weight ``weighted_by_key`` finite and > 0 in float64; every numeric
      metric finite, and within :data:`METRIC_RANGES` (``metric_ranges``) where it has a range.
    - The plans digest, then keys, shapes, dtypes and finiteness of the arrays (training replies).
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
        Metrics every reply must carry as a finite number (e.g. the training
        loss q-FedAvg weighs replies with); extend it on the instance as needed.
    max_reply_weight
        None, or the largest weight one training reply may have: larger ones are clipped to it (logged).
    metric_ranges
        Metric name -> (low, high): replies with a value outside are rejected (default :data:`METRIC_RANGES`).
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
        record = message.content.array_records.get(self.arrayrecord_key)
        if not isinstance(record, ArrayRecord):
            return Rejection(node, f"no ArrayRecord under {self.arrayrecord_key!r}")
        try:
            tensors = self._canonical(from_array_record(record))
        except PayloadError as error:
            return Rejection(node, f"undecodable payload: {error}")
        except (KeyError, AliasConflictError) as error:
            return Rejection(node, str(error.args[0]))
        reason = self.check_tensors(tensors, check_finite=check_finite)
        if reason:
            return Rejection(node, reason)
        return AcceptedReply(message, tensors, metrics, weight)

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
        for key in self.required_metrics:
            value = metrics.get(key)
            if not isinstance(value, (int, float)) or metric_problem(key, value):
                return Rejection(node, f"metric {key!r} must be a finite number, got {bounded(repr(value), 80)}")
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
