"""Flower's own aggregation (Krum, MultiKrum, Bulyan, q-FedAvg) over validated canonical records.

The replies are validated and made canonical first, so distances and norms
count each shared tensor once; Flower's result is then written into the
network in place, unless it is not finite (e.g. q-FedAvg on huge but finite
replies) or Flower's code fails: then the round is refused, the model unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import Bulyan, Krum, MultiKrum, QFedAvg
from flwr.supercore import log
from torch import nn

from flwr_nnunet.core.codec import encode_tensor
from flwr_nnunet.core.reduce import weighted_mean_
from flwr_nnunet.strategy.fedavg import NnUNetFedAvg
from flwr_nnunet.strategy.replies import bounded, canonical_message

__all__ = ["NnUNetBulyan", "NnUNetKrum", "NnUNetMultiKrum", "NnUNetQFedAvg"]


class _FlowerAggregated(NnUNetFedAvg):
    """Runs the Flower parent's ``aggregate_train`` over validated canonical replies, then loads the result in place.

    Flower's numpy code sees the floating-point groups only; integer groups
    (BatchNorm's ``num_batches_tracked``) take the in-place weighted mean of
    the accepted replies.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, run Flower's aggregation, and write its result into the network."""
        accepted = self.accept_replies(server_round, replies, is_train=True)
        if not accepted:
            return None, None
        keys = self.floating_keys()
        weighted_by = self.weighted_by_key
        messages = [
            canonical_message(a.message, keys, self.arrayrecord_key, weight=(weighted_by, a.weight)) for a in accepted
        ]
        try:
            arrays, metrics = super(NnUNetFedAvg, self).aggregate_train(server_round, messages)
            if arrays is None:
                return None, metrics
            counters = OrderedDict((k, t.clone()) for k, t in self.model.tensors.items() if not t.is_floating_point())
            if counters:
                updates = [{k: a.tensors[k] for k in counters} for a in accepted]
                weighted_mean_(counters, updates, [a.weight for a in accepted])
                for key, value in counters.items():
                    arrays[key] = encode_tensor(value)
            self.model.load_(arrays, cast=True)  # refuses a non-finite result, leaving the model unchanged
        except (AggregationError, ArithmeticError, ValueError, TypeError) as error:
            log(
                WARNING,
                "aggregate_train: round %d: %s refused its result (%s): global model unchanged",
                server_round,
                type(self).__name__,
                bounded(error),
            )
            return None, None
        log(
            INFO,
            "aggregate_train: round %d: %s result written into the network in place",
            server_round,
            type(self).__name__,
        )
        return self.model.record(), metrics

    def floating_keys(self) -> list[str]:
        """The floating-point groups: what Flower's aggregation sees."""
        return [k for k, t in self.model.tensors.items() if t.is_floating_point()]


class NnUNetMultiKrum(_FlowerAggregated, MultiKrum):
    """MultiKrum (``num_malicious_nodes``, ``num_nodes_to_select``) over canonical records."""


class NnUNetKrum(_FlowerAggregated, Krum):
    """Krum (``num_malicious_nodes``) over canonical records."""


class NnUNetBulyan(_FlowerAggregated, Bulyan):
    """Bulyan (``num_malicious_nodes``; needs at least 4f + 3 valid replies) over canonical records."""


class NnUNetQFedAvg(_FlowerAggregated, QFedAvg):
    """q-FedAvg (``client_learning_rate``, ``q``) over canonical records; replies must carry the training loss.

    ``train_loss_key`` defaults to ``"train-loss"`` (this project's metric name);
    a reply without a finite loss is rejected.
    """

    def __init__(
        self, network: nn.Module, *, client_learning_rate: float, train_loss_key: str = "train-loss", **kwargs: Any
    ) -> None:
        super().__init__(network, client_learning_rate=client_learning_rate, train_loss_key=train_loss_key, **kwargs)
        self.validator.required_metrics += (train_loss_key,)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As Flower's, keeping the floating-point groups of the sent model for the update."""
        messages = super().configure_train(server_round, arrays, config, grid)
        self.current_arrays = ArrayRecord(OrderedDict((k, self.current_arrays[k]) for k in self.floating_keys()))
        return messages
