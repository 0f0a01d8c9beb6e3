"""A round's accepted replies: enough of them, their reduction (rolled back when not finite), their metrics,
and the round's log lines (a rejected reply, the aggregated round)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from logging import INFO, WARNING

import torch
from flwr.app import MetricRecord, RecordDict
from flwr.supercore import log

from flwr_nnunet.errors import FlwrNnUNetError
from flwr_nnunet.strategy.replies import AcceptedReply, Rejection, bounded, non_finite_reason

__all__ = [
    "ANNOTATED_METRIC",
    "RoundRefused",
    "aggregate_metrics",
    "aggregate_site_metrics",
    "enough_replies",
    "log_aggregated",
    "log_rejection",
    "reduce_accepted",
    "without_non_finite",
]


class RoundRefused(FlwrNnUNetError, ArithmeticError):
    """Raised by a reduction hook (``reduce_all_``) when the round's result as a whole must be refused, with no
    reply to blame (a server-optimizer step that would go non-finite): ``aggregate_train`` rolls the model back
    and logs the message once."""


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


ANNOTATED_METRIC = "annotated-per-class"
"""A site's 1/0 per foreground label: which of its ``-per-class`` values it scored (partial labels)."""


def aggregate_site_metrics(records: Sequence[RecordDict], weight_key: str) -> MetricRecord:
    """Flower's weighted mean of the replies' metrics, with every ``-per-class`` list averaged per class over the
    sites that scored that class only (:data:`ANNOTATED_METRIC`; a reply without it scored every class), so a
    label one site did not annotate is the mean of the sites that did."""
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

    aggregated = aggregate_metricrecords(list(records), weight_key)
    site_metrics = [next(iter(record.metric_records.values())) for record in records]
    if not any(ANNOTATED_METRIC in metrics for metrics in site_metrics):
        return aggregated
    for key in [k for k in aggregated if k.endswith("-per-class") and k != ANNOTATED_METRIC]:
        totals, weights = None, None
        for metrics in site_metrics:
            values = metrics.get(key)
            if not isinstance(values, list):
                continue
            mask = metrics.get(ANNOTATED_METRIC, [1] * len(values))
            weight = float(metrics[weight_key])
            if totals is None:
                totals, weights = [0.0] * len(values), [0.0] * len(values)
            for index, (value, scored) in enumerate(zip(values, mask)):
                totals[index] += weight * float(scored) * float(value)
                weights[index] += weight * float(scored)
        if totals is not None:
            aggregated[key] = [total / weight if weight > 0 else 0.0 for total, weight in zip(totals, weights)]
    return aggregated


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
