"""Client replies after their checks, and the pure checks themselves: reject, never crash.

An :class:`AcceptedReply` holds a reply's canonical tensors (views of the received bytes), weight and metrics;
a :class:`Rejection` the node and one line that says why. The checks here (weights, metrics, tensors) return
that line, or None, and never raise on bad input; :func:`content_order` orders accepted replies by their
contents. The per-round checks of whole replies are :class:`~flwr_nnunet.strategy.validator.ReplyValidator`.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message.message import make_message

from flwr_nnunet.core.aliasing import strip_wrapper_prefixes
from flwr_nnunet.core.codec import to_array_record
from flwr_nnunet.core.delta_codec import COMPRESSION_KEY, SCALES_RECORD

__all__ = [
    "MAX_REASON_CHARS",
    "METRIC_RANGES",
    "SCALAR_METRICS",
    "AcceptedReply",
    "Rejection",
    "bounded",
    "canonical_message",
    "check_weight",
    "content_order",
    "decompressed_message",
    "metric_problem",
    "non_finite_reason",
    "tensors_problem",
    "total_weight_problem",
]

MAX_REASON_CHARS = 500
"""Longest reason (or error text) written to the log; longer ones are cut (see :func:`bounded`)."""
METRIC_RANGES: Mapping[str, tuple[float, float]] = {
    "dice": (0.0, 1.0),
    "dice-per-class": (0.0, 1.0),
    "pseudo-dice": (0.0, 1.0),
    "pseudo-dice-per-class": (0.0, 1.0),
    "personal-dice": (0.0, 1.0),
    "personal-dice-per-class": (0.0, 1.0),
}
"""The closed range of each metric the sites send that has one (every value of a list metric); every other
numeric metric (losses included) must only be finite."""
SCALAR_METRICS: frozenset[str] = frozenset(
    {"dice", "pseudo-dice", "personal-dice", "train-loss", "val-loss", "epoch", "learning-rate", "fine-tune-kept"}
)
"""The metrics the sites send as one number: a list under one of these names is refused. The lists are the
``-per-class`` metrics and ``label-confusion``; the weight (``num-examples``) is checked by :func:`check_weight`."""


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
    """Why metric ``key`` (a number or a list of numbers) is a list where :data:`SCALAR_METRICS` wants one number,
    is not finite, or is not in ``valid_range``; or None."""
    if isinstance(value, list) and key in SCALAR_METRICS:
        return f"metric {key!r} must be a number, not a list (per-class values go in the '-per-class' metrics)"
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


def decompressed_message(
    message: Message, tensors: Mapping[str, torch.Tensor], arrayrecord_key: str = "arrays"
) -> Message:
    """A copy of a compressed reply whose ``ArrayRecord`` holds ``tensors`` (its decoded model), without block
    scales and without ``compression`` in its config: an uncompressed reply, what every check, strategy and
    wrapper downstream reads (its other records and config entries kept)."""
    records = {}
    for name, value in message.content.items():
        if isinstance(value, ConfigRecord):
            records[name] = ConfigRecord({k: v for k, v in value.items() if k != COMPRESSION_KEY})
        elif name not in (arrayrecord_key, SCALES_RECORD):
            records[name] = value
    records[arrayrecord_key] = to_array_record(tensors)
    return make_message(message.metadata, content=RecordDict(records))


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
