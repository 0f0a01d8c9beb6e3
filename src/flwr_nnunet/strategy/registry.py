"""The alias-aware family: every Flower built-in strategy on an nnU-Net network.

Each member is an :class:`~flwr_nnunet.strategy.fedavg.NnUNetFedAvg` (canonical
records, shared aliases, reply validation, checkpoints, resume) that takes the
arguments of the Flower strategy it is named after, with Flower's defaults.

- In-place torch path (no per-client model copy): FedAvg, FedProx, FedMedian,
  FedTrimmedAvg, and the server optimizers FedAvgM, FedAdagrad, FedAdam, FedYogi
  (weighted mean in place, then the server step per group; their moments are
  part of the resume state).
- Flower's own aggregation over canonical records, result loaded in place:
  Krum, MultiKrum, Bulyan, QFedAvg.
- Differential privacy: Flower's four wrappers, made alias-aware
  (replies validated before clipping, the noised model written into the
  network). Norms and noise count each shared tensor once because records are
  canonical.

:func:`strategy_from_name` builds any of them from run-config values; the server
optimizers live in :mod:`flwr_nnunet.strategy.server_optimizers`, the DP wrappers in
:mod:`flwr_nnunet.strategy.privacy`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import (
    Bulyan,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    QFedAvg,
)
from flwr.supercore import log
from torch import nn

from flwr_nnunet.core.reduce import median_, trimmed_mean_, weighted_mean_
from flwr_nnunet.core.codec import encode_tensor
from flwr_nnunet.strategy.privacy import (
    AliasAwareDP,
    NnUNetDPClientSideAdaptiveClipping,
    NnUNetDPClientSideFixedClipping,
    NnUNetDPServerSideAdaptiveClipping,
    NnUNetDPServerSideFixedClipping,
)
from flwr_nnunet.strategy.server_optimizers import NnUNetFedAdagrad, NnUNetFedAdam, NnUNetFedAvgM, NnUNetFedYogi
from flwr_nnunet.strategy.fedavg import NnUNetFedAvg

__all__ = [
    "DP_WRAPPERS",
    "STRATEGIES",
    "NnUNetBulyan",
    "NnUNetFedMedian",
    "NnUNetFedProx",
    "NnUNetFedTrimmedAvg",
    "NnUNetKrum",
    "NnUNetMultiKrum",
    "NnUNetQFedAvg",
    "strategy_from_name",
]


class NnUNetFedProx(NnUNetFedAvg, FedProx):
    """FedProx: FedAvg that sends ``proximal-mu`` in the train config (``proximal_mu``, default 0.0)."""


class NnUNetFedMedian(NnUNetFedAvg, FedMedian):
    """FedMedian: the element-wise median of the replies (unweighted), in place."""

    def reduce_group_(
        self, key: str, target: torch.Tensor, values: Sequence[torch.Tensor], weights: Sequence[float]
    ) -> None:
        """Write the element-wise median of ``values`` into ``target``."""
        median_({key: target}, [{key: v} for v in values], accumulate_dtype=self.accumulate_dtype)


class NnUNetFedTrimmedAvg(NnUNetFedAvg, FedTrimmedAvg):
    """FedTrimmedAvg: the element-wise trimmed mean (``beta``, default 0.2, cut at each end), in place."""

    def reduce_group_(
        self, key: str, target: torch.Tensor, values: Sequence[torch.Tensor], weights: Sequence[float]
    ) -> None:
        """Write the element-wise trimmed mean of ``values`` into ``target``."""
        trimmed_mean_({key: target}, [{key: v} for v in values], self.beta, accumulate_dtype=self.accumulate_dtype)


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
        self.current_round = server_round
        accepted = self.accept_replies(server_round, list(replies), is_train=True)
        if not self._enough(server_round, accepted, self.min_train_nodes, "aggregate_train"):
            return None, None
        messages = [self.canonical_message(a, self.floating_keys()) for a in accepted]
        try:
            arrays, metrics = super(NnUNetFedAvg, self).aggregate_train(server_round, messages)
        except (AggregationError, ValueError, TypeError) as error:
            log(
                WARNING,
                "aggregate_train: round %d: %s failed (%s): global model unchanged",
                server_round,
                type(self).__name__,
                error,
            )
            return None, None
        if arrays is None:
            return None, metrics
        counters = OrderedDict((k, t.clone()) for k, t in self.global_tensors.items() if not t.is_floating_point())
        if counters:
            updates = [{k: a.tensors[k] for k in counters} for a in accepted]
            weighted_mean_(counters, updates, [self.reply_weight(a) for a in accepted])
            for key, value in counters.items():
                arrays[key] = encode_tensor(value)
        self.load_global_(arrays, cast=True)
        log(
            INFO,
            "aggregate_train: round %d: %s result written into the network in place",
            server_round,
            type(self).__name__,
        )
        return self.global_record(), metrics

    def floating_keys(self) -> list[str]:
        """The floating-point groups: what Flower's aggregation sees."""
        return [k for k, t in self.global_tensors.items() if t.is_floating_point()]

    def _check_and_log_replies(
        self, replies: Iterable[Message], is_train: bool, validate: bool = True
    ) -> tuple[list[Message], list[Message]]:
        """Flower's check inside Flower's ``aggregate_train``: the replies were validated already."""
        return list(replies), []


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


STRATEGIES: dict[str, type[NnUNetFedAvg]] = {
    "fedavg": NnUNetFedAvg,
    "fedavgm": NnUNetFedAvgM,
    "fedprox": NnUNetFedProx,
    "fedadagrad": NnUNetFedAdagrad,
    "fedadam": NnUNetFedAdam,
    "fedyogi": NnUNetFedYogi,
    "fedmedian": NnUNetFedMedian,
    "fedtrimmedavg": NnUNetFedTrimmedAvg,
    "krum": NnUNetKrum,
    "multikrum": NnUNetMultiKrum,
    "bulyan": NnUNetBulyan,
    "qfedavg": NnUNetQFedAvg,
}
"""Strategy names accepted by :func:`strategy_from_name`."""

DP_WRAPPERS: dict[str, type] = {
    "server-fixed": NnUNetDPServerSideFixedClipping,
    "client-fixed": NnUNetDPClientSideFixedClipping,
    "server-adaptive": NnUNetDPServerSideAdaptiveClipping,
    "client-adaptive": NnUNetDPClientSideAdaptiveClipping,
}
"""Values of ``dp`` accepted by :func:`strategy_from_name`."""


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def strategy_from_name(
    name: str,
    *,
    network: nn.Module,
    dp: str | None = None,
    dp_options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> NnUNetFedAvg | AliasAwareDP:
    """Build a family member by name, optionally wrapped for differential privacy.

    Parameters
    ----------
    name
        One of :data:`STRATEGIES` (case, ``-`` and ``_`` ignored: ``"FedAdam"``, ``"fed-adam"``).
    network
        The global nnU-Net network.
    dp
        None, or one of :data:`DP_WRAPPERS` (``"server-fixed"``, ``"client-fixed"``,
        ``"server-adaptive"``, ``"client-adaptive"``).
    dp_options
        Keyword arguments of the Flower DP wrapper (``noise_multiplier``,
        ``clipping_norm`` or ``initial_clipping_norm``, ``num_sampled_clients``, ...).
    **kwargs
        Arguments of :class:`NnUNetFedAvg` and of the named Flower strategy
        (``eta``, ``beta_1``, ``proximal_mu``, ``beta``, ``num_malicious_nodes``, ...).

    Raises
    ------
    ValueError
        For an unknown name or ``dp`` value, naming the accepted ones.
    TypeError
        For arguments the chosen strategy does not take (Python's own message).
    """
    key = _normalize(name)
    if key not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    strategy = STRATEGIES[key](network, **kwargs)
    if dp is None or dp == "":
        return strategy
    if dp not in DP_WRAPPERS:
        raise ValueError(f"unknown dp option {dp!r}; choose one of {sorted(DP_WRAPPERS)} (or leave it unset)")
    return DP_WRAPPERS[dp](strategy, **dict(dp_options or {}))
