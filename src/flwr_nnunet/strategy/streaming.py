"""Streaming training rounds: each reply is checked and folded into a running sum as it arrives, then released.

:func:`~flwr_nnunet.strategy.stream_round.stream_train_round` pushes a round's
instructions and pulls the replies as they come; a :class:`TrainStream` checks each reply when it
arrives, with the checks of ``aggregate_train`` (NaN/Inf included, before the
reply touches the accumulator), folds it into a
:class:`~flwr_nnunet.core.running.RunningWeightedSum` and keeps only its small
``MetricRecord``. The running sum of each float32 group lives in the global
network's own tensor plus a float32 low part (``in_place=True``; other groups
in float64); the pre-round model stays in the record sent this round. When the
round closes the mean is written into the network in place, then the
strategy's server step runs on it, with the guarantees of the batch path: a
round with too few valid replies, or whose result or server step is not
finite, or that fails, leaves the model bit-identical (rolled back from that
record). Server memory: the global network, the low parts (4 bytes per float32
element) and the replies in flight, whatever the number of sites.

Which strategies stream: those whose reduction is a weighted mean, optionally
followed by a server step on it (``streams = True`` on the class: StreamingStrategy,
NnUNetFedProx, FedBN-style local groups, the server optimizers), and the
fixed-clipping DP wrappers around one of them (their :class:`TrainStream`
clips each reply on arrival and adds the noise once when the round closes);
order statistics, Flower-adapted strategies and adaptive clipping keep the batch path.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from logging import INFO, WARNING
from typing import Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.serverapp import Grid
from flwr.supercore import log

from flwr_nnunet.core.reduce import Tensors
from flwr_nnunet.core.running import RunningWeightedSum
from flwr_nnunet.strategy.aggregation import aggregate_metrics, enough_replies, log_rejection
from flwr_nnunet.strategy.global_model import GlobalModel
from flwr_nnunet.strategy.model_sender import ModelSender
from flwr_nnunet.strategy.replies import AcceptedReply, Rejection, bounded, check_weight
from flwr_nnunet.strategy.validator import ReplyValidator


class StreamingStrategy(Protocol):
    """What a streaming round uses of its strategy (an NnUNetFedAvg family member whose class streams)."""

    model: GlobalModel
    validator: ReplyValidator
    model_sender: ModelSender | None
    min_train_replies: int
    weighted_by_key: str
    train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord]

    def reply_weight(self, reply: AcceptedReply) -> float:
        """The aggregation weight of an accepted reply."""

    def reduce_all_(
        self, server_round: int, targets: Tensors, updates: Sequence[Tensors], weights: Sequence[float]
    ) -> list[str]:
        """Reduce updates into targets; the keys whose result is not finite."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The round's instructions."""


class OpensStreams(Protocol):
    """A strategy (a wrapper, e.g. fixed-clipping DP) that makes its own :class:`TrainStream` for each round."""

    def train_stream(self, server_round: int) -> TrainStream:
        """The round's stream."""


__all__ = [
    "OpensStreams",
    "TrainStream",
    "open_stream",
    "release_arrays",
    "streams",
]

STAGE = "aggregate_train"


def streams(strategy: object) -> bool:
    """Whether ``strategy`` (an instance or a class) can run streaming rounds: its class sets ``streams = True``
    and, for a wrapper instance (one with a ``strategy`` attribute, as Flower's DP wrappers), so does what it wraps."""
    cls = strategy if isinstance(strategy, type) else type(strategy)
    if not getattr(cls, "streams", False):
        return False
    inner = None if isinstance(strategy, type) else getattr(strategy, "strategy", None)
    return inner is None or streams(inner)


def open_stream(strategy: StreamingStrategy | OpensStreams, server_round: int) -> TrainStream:
    """The round's :class:`TrainStream`: the strategy's own (``train_stream``) when it makes one."""
    make = getattr(strategy, "train_stream", None)
    return make(server_round) if callable(make) else TrainStream(strategy, server_round)


def release_arrays(message: Message) -> None:
    """Empty the reply's ``ArrayRecord``s so their bytes are freed now.

    Flower's ``RecordDict.array_records`` view is a reference cycle that keeps the
    records alive until the garbage collector runs; emptying them frees the
    payload as soon as the reply has been folded or rejected.
    """
    if not message.has_content():
        return
    for record in message.content.values():
        if isinstance(record, ArrayRecord):
            record.clear()


def _without_arrays(message: Message) -> Message:
    """A copy of ``message`` with its metric and config records only (what metric aggregation and the model
    sender read), sharing them."""
    content = RecordDict({**message.content.metric_records, **message.content.config_records})
    return make_message(message.metadata, content=content)


class TrainStream:
    """One streaming training round of ``strategy``: :meth:`offer` each reply as it arrives, then :meth:`finish`.

    Parameters
    ----------
    strategy
        A strategy of the NnUNetFedAvg family whose class streams (see :func:`streams`).
    server_round
        The round.

    Attributes
    ----------
    folded
        The accepted replies, each reduced to its metrics (no tensors).
    received
        How many replies were offered.

    Subclasses (fixed-clipping DP) change what is folded with :meth:`prepare` and the round's result with
    :meth:`on_result_`.
    """

    def __init__(self, strategy: StreamingStrategy, server_round: int) -> None:
        if not streams(strategy):
            raise TypeError(f"{type(strategy).__name__} does not stream: use aggregate_train")
        self.strategy = strategy
        self.server_round = server_round
        self.accumulator: RunningWeightedSum | None = None
        self.snapshot = strategy.model.snapshot()  # the record sent this round: the pre-round model
        self.folded: list[AcceptedReply] = []
        self.seen: set[int] = set()
        self.received = 0
        self.started = time.perf_counter()

    def check(self, message: Message) -> AcceptedReply | Rejection:
        """The checks of ``aggregate_train`` for one reply (NaN/Inf included): the accepted reply with its
        weight (``reply_weight()``, capped at the strategy's ``max_reply_weight`` when it has one), or why not."""
        strategy = self.strategy
        result = strategy.validator.check_train(message, check_finite=True)
        node = result.node_id
        if node in self.seen:
            return Rejection(node, "a second reply from this node in the round: only the first one counts")
        self.seen.add(node)
        if isinstance(result, Rejection):
            return result
        value = strategy.reply_weight(result)
        reason = check_weight(value, "reply_weight()")
        if reason:
            return Rejection(node, reason)
        weight = float(value)
        cap = getattr(strategy.validator, "max_reply_weight", None)
        if cap is not None and weight > cap:
            log(
                INFO,
                "%s: round %d: node %d: weight %g clipped to max_reply_weight %g",
                STAGE,
                self.server_round,
                node,
                weight,
                cap,
            )
            weight = cap
        result.weight = weight
        return result

    def offer(self, message: Message) -> bool:
        """Check one reply and, when it is valid, fold it into the accumulator; log a rejection. Then the reply is
        released: its ``ArrayRecord``s are emptied (:func:`release_arrays`). Returns whether it was folded."""
        try:
            return self._offer(message)
        finally:
            release_arrays(message)

    def prepare(self, reply: AcceptedReply) -> Tensors:
        """What is folded of an accepted reply (override point; default: its canonical tensors).

        Raises
        ------
        ArithmeticError, TypeError, ValueError
            When the reply cannot be prepared: it is rejected with the error as its reason.
        """
        return reply.tensors

    def on_result_(self, tensors: Tensors) -> list[str]:
        """Change the round's finite result in the network (``tensors``) in place; return the keys now not finite
        (override point, run after the server step; default: nothing)."""
        return []

    def _offer(self, message: Message) -> bool:
        self.received += 1
        result = self.check(message)
        if not isinstance(result, Rejection):
            try:
                tensors = self.prepare(result)
            except (ArithmeticError, TypeError, ValueError) as error:
                result = Rejection(result.node_id, f"{type(self).__name__}: {bounded(error)}")
        if isinstance(result, Rejection):
            log_rejection(STAGE, self.server_round, result)
            return False
        if self.accumulator is None:
            self.accumulator = RunningWeightedSum(self.strategy.model.tensors, in_place=True)
        self.accumulator.add_(tensors, result.weight)
        del tensors
        kept = AcceptedReply(_without_arrays(result.message), OrderedDict(), result.metrics, result.num_examples)
        kept.weight = result.weight
        self.folded.append(kept)
        return True

    def note_held(self) -> None:
        """Tell the strategy's model sender (run-config ``compression``) which reference each site of the round
        holds, as its folded reply names it; a site without a folded reply gets the whole model next time."""
        sender = self.strategy.model_sender
        if sender is not None:
            sender.note([m.metadata.dst_node_id for m in self.strategy.validator.sent], self.folded)

    def release(self) -> None:
        """Free the accumulator (the network keeps what it holds)."""
        if self.accumulator is not None:
            self.accumulator.release()
        self.accumulator = None

    def abort(self) -> None:
        """Abandon the round: free the accumulator and, if a reply was folded (the network holds a partial sum),
        roll the network back to the pre-round record, bit for bit."""
        touched = self.accumulator is not None
        self.release()
        if touched:
            self.strategy.model.roll_back_(self.snapshot)

    def finish(self) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Close the round: the mean written into the global network in place (then the server step, if any),
        and ``(record, metrics)`` as ``aggregate_train`` returns them; ``(None, None)`` with the model
        bit-identical to before when too few replies were folded or the result is refused."""
        strategy, server_round = self.strategy, self.server_round
        model = strategy.model
        folded = self.folded
        log(INFO, "%s: round %d: %d of %d replies accepted (streamed)", STAGE, server_round, len(folded), self.received)
        if not folded or not enough_replies(STAGE, server_round, len(folded), strategy.min_train_replies):
            self.abort()
            return None, None
        total = self.accumulator.total_weight
        if not math.isfinite(total):
            self.abort()
            log(
                WARNING,
                "%s: round %d: the accepted weights sum to %s in float64: round refused",
                STAGE,
                server_round,
                total,
            )
            return None, None
        try:
            non_finite = self.accumulator.finish_(model.tensors, check_finite=True)
            self.release()
            if not non_finite:
                # the strategy's own reduction of the streamed mean as its one update of weight 1: the mean
                # itself for FedAvg, the server step of a server optimizer
                non_finite = strategy.reduce_all_(server_round, model.tensors, [model.tensors], [1.0])
            if not non_finite:
                non_finite = self.on_result_(model.tensors)
        except ArithmeticError as refused:  # RoundRefused: a server step that would go non-finite
            self.release()
            model.roll_back_(self.snapshot)
            log(WARNING, "%s: round %d: %s: global model unchanged", STAGE, server_round, refused)
            return None, None
        except BaseException:
            self.release()
            model.roll_back_(self.snapshot)
            raise
        if non_finite:
            model.roll_back_(self.snapshot)
            log(
                WARNING,
                "%s: round %d: the result of %r is not finite (every folded reply was finite): global model unchanged",
                STAGE,
                server_round,
                non_finite[0],
            )
            return None, None
        model.changed()
        metrics = aggregate_metrics(strategy.train_metrics_aggr_fn, folded, strategy.weighted_by_key, STAGE)
        log(
            INFO,
            "%s: round %d: streamed %d replies (nodes %s, total weight %g) into %d groups (%.1f MB) in place; "
            "%.2f s since the round opened",
            STAGE,
            server_round,
            len(folded),
            sorted(a.node_id for a in folded),
            total,
            len(model.tensors),
            model.nbytes / 1e6,
            time.perf_counter() - self.started,
        )
        return model.record(), metrics
