"""Checks of client replies against the global model: reject, never crash.

A :class:`ReplyValidator` turns each reply ``Message`` into either an
:class:`AcceptedReply` (canonical tensors that view the received bytes, the
reply's weight and metrics) or a :class:`Rejection` (the node and one line that
says why). Nothing here raises on bad input and nothing is unpickled.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.supercore import log

from flwr_nnunet.core.aliasing import AliasConflictError, AliasMap, strip_wrapper_prefixes
from flwr_nnunet.core.codec import PayloadError, from_array_record
from flwr_nnunet.errors import KeyMismatchError

__all__ = [
    "AcceptedReply",
    "Rejection",
    "ReplyValidator",
    "aggregate_metrics",
    "canonical_message",
    "check_weight",
    "enough_replies",
    "log_rejection",
    "non_finite_reason",
    "tensors_problem",
    "without_non_finite",
]

PLANS_SHA256_KEY = "plans-sha256"


@dataclass(frozen=True)
class Rejection:
    """A reply that was dropped: the sending node and why."""

    node_id: int
    reason: str


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
    """

    message: Message
    tensors: OrderedDict[str, torch.Tensor] = field(repr=False)
    metrics: MetricRecord
    num_examples: float

    @property
    def node_id(self) -> int:
        """The node that sent the reply."""
        return self.message.metadata.src_node_id


def check_weight(value: object, key: str) -> str | None:
    """Why ``value`` is not a usable aggregation weight, or None when it is (finite, > 0, int or float)."""
    if value is None:
        return f"metric {key!r} is missing"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"metric {key!r} is a {type(value).__name__}, not a number"
    if not math.isfinite(value):
        return f"metric {key!r} is {value}, not finite"
    if value <= 0:
        return f"metric {key!r} is {value}, must be > 0"
    return None


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


def canonical_message(message: Message, keys: Sequence[str], arrayrecord_key: str = "arrays") -> Message:
    """``message`` itself when its arrays are exactly ``keys`` in order, else a copy whose ``ArrayRecord`` holds
    only the arrays of ``keys`` (``_orig_mod.``/``module.`` prefixes removed), in order.

    The copy shares the ``Array`` objects (no bytes are copied) and keeps the
    message's other records (metrics, config).
    """
    record = message.content[arrayrecord_key]
    if list(record.keys()) == list(keys):
        return message
    records = {name: value for name, value in message.content.items() if name != arrayrecord_key}
    names = strip_wrapper_prefixes({name: name for name in record})  # canonical -> the reply's name
    records[arrayrecord_key] = ArrayRecord(OrderedDict((k, record[names[k]]) for k in keys))
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
        log(WARNING, "%s: metrics could not be aggregated (%s); skipping them", stage, error)
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


class ReplyValidator:
    """Checks replies against the global model's canonical tensors.

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
    ) -> None:
        self.alias_map = alias_map
        self.reference = reference
        self.plans_sha256 = plans_sha256
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key = arrayrecord_key
        self.optional_keys = frozenset(optional_keys)
        self.required_metrics = tuple(required_metrics)

    def accept(
        self,
        server_round: int,
        replies: Iterable[Message],
        *,
        weight: Callable[[AcceptedReply], float] | None,
        minimum: int,
        check_finite: bool = True,
    ) -> list[AcceptedReply]:
        """Check replies, log one line per rejected one, return the accepted ones sorted by node id (so the
        floating-point result does not depend on arrival order), or none when fewer than ``minimum`` are.

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
        accepted: list[AcceptedReply] = []
        for message in replies:
            if weight is None:
                result = self.check_evaluate(message)
            else:
                result = self.check_train(message, check_finite=check_finite)
                reason = check_weight(weight(result), "reply_weight()") if isinstance(result, AcceptedReply) else None
                result = Rejection(result.node_id, reason) if reason else result
            if isinstance(result, Rejection):
                log_rejection(stage, server_round, result)
            else:
                accepted.append(result)
        log(INFO, "%s: round %d: %d of %d replies accepted", stage, server_round, len(accepted), len(replies))
        if not enough_replies(stage, server_round, len(accepted), minimum):
            return []
        return sorted(accepted, key=lambda a: a.node_id)

    def check_train(self, message: Message, *, check_finite: bool = True) -> AcceptedReply | Rejection:
        """Validate a training reply: error, records, weight, plans digest, keys, shapes, dtypes, finiteness.

        ``check_finite=False`` leaves out the NaN/Inf pass over the tensors for
        callers that detect non-finite values in their result instead.
        """
        rejected = self._check_common(message)
        if isinstance(rejected, Rejection):
            return rejected
        metrics, weight = rejected
        node = message.metadata.src_node_id
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

    def check_evaluate(self, message: Message) -> AcceptedReply | Rejection:
        """Validate an evaluation reply: error, one MetricRecord, weight, plans digest, finite metrics."""
        checked = self._check_common(message)
        if isinstance(checked, Rejection):
            return checked
        metrics, weight = checked
        for key, value in metrics.items():
            values = value if isinstance(value, list) else [value]
            if not all(math.isfinite(v) for v in values):
                return Rejection(message.metadata.src_node_id, f"metric {key!r} is not finite ({value})")
        return AcceptedReply(message, OrderedDict(), metrics, weight)

    def _check_common(self, message: Message) -> tuple[MetricRecord, float] | Rejection:
        node = message.metadata.src_node_id
        if message.has_error():
            return Rejection(node, f"the node reported an error: {message.error.reason}")
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
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                return Rejection(node, f"metric {key!r} must be a finite number, got {value!r}")
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
