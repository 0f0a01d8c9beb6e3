"""The alias-aware family: every Flower built-in strategy on an nnU-Net network.

Each member is an :class:`~flwr_nnunet.strategy.NnUNetFedAvg` (canonical
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

:func:`strategy_from_name` builds any of them from run-config values.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    QFedAvg,
)
from flwr.supercore import log
from flwr.supercore.differential_privacy import KEY_NORM_BIT
from torch import nn

from flwr_nnunet.aggregation import median_, trimmed_mean_, weighted_mean_
from flwr_nnunet.codec import encode_tensor
from flwr_nnunet.rounds import RoundRunner
from flwr_nnunet.strategy import NnUNetFedAvg

__all__ = [
    "DP_WRAPPERS",
    "STRATEGIES",
    "NnUNetBulyan",
    "NnUNetDPClientSideAdaptiveClipping",
    "NnUNetDPClientSideFixedClipping",
    "NnUNetDPServerSideAdaptiveClipping",
    "NnUNetDPServerSideFixedClipping",
    "NnUNetFedAdagrad",
    "NnUNetFedAdam",
    "NnUNetFedAvgM",
    "NnUNetFedMedian",
    "NnUNetFedProx",
    "NnUNetFedTrimmedAvg",
    "NnUNetFedYogi",
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


class _ServerOptimizer(NnUNetFedAvg):
    """Weighted mean in place, then a server step per floating-point group.

    Integer groups (BatchNorm's ``num_batches_tracked``) keep the mean. The
    per-group buffers named in ``buffer_names`` are the resume state.
    """

    buffer_names: tuple[str, ...] = ()

    def __init__(self, network: nn.Module, **kwargs: Any) -> None:
        super().__init__(network, **kwargs)
        self.buffers: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.buffer_names}

    def server_step_enabled(self) -> bool:
        """Whether the server step changes anything (FedAvgM without momentum and lr 1 is FedAvg)."""
        return True

    @abstractmethod
    def step_group_(self, key: str, target: torch.Tensor, previous: torch.Tensor) -> None:
        """Replace ``target`` (holding the mean of the replies) by the server update from ``previous``."""

    def aggregate_(
        self,
        targets: Mapping[str, torch.Tensor],
        updates: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
    ) -> None:
        """Weighted mean into ``targets``, then :meth:`step_group_` on every floating-point group."""
        if not self.server_step_enabled():
            super().aggregate_(targets, updates, weights)
            return
        previous = OrderedDict((k, t.detach().clone()) for k, t in targets.items() if t.is_floating_point())
        super().aggregate_(targets, updates, weights)
        with torch.no_grad():
            for key, before in previous.items():
                self.step_group_(key, targets[key], before)

    def buffer(self, name: str, key: str, like: torch.Tensor) -> torch.Tensor:
        """The state buffer ``name`` of group ``key`` (zeros the first time)."""
        buffers = self.buffers[name]
        if key not in buffers:
            buffers[key] = torch.zeros_like(like)
        return buffers[key]

    def strategy_state(self) -> dict[str, Any]:
        """The per-group buffers (moments, momentum)."""
        return {name: dict(buffers) for name, buffers in self.buffers.items()}

    def load_strategy_state(self, state: Mapping[str, Any]) -> None:
        """Restore the per-group buffers onto the network's devices and dtypes."""
        for name in self.buffer_names:
            saved = state.get(name, {})
            unknown = set(saved) - set(self.global_tensors)
            if unknown:
                raise ValueError(f"strategy state {name!r} has unknown keys {sorted(unknown)[:3]}")
            self.buffers[name] = {
                k: t.to(device=self.global_tensors[k].device, dtype=self.global_tensors[k].dtype).clone()
                for k, t in saved.items()
            }


class NnUNetFedAvgM(_ServerOptimizer):
    """FedAvgM: server learning rate and momentum on the pseudo-gradient, as Flower's ``FedAvgM``.

    Parameters
    ----------
    server_learning_rate : float (default: 1.0)
        Server-side learning rate.
    server_momentum : float (default: 0.0)
        Server-side momentum.
    **kwargs
        The arguments of :class:`~flwr_nnunet.strategy.NnUNetFedAvg`.
    """

    buffer_names = ("momentum",)

    def __init__(
        self, network: nn.Module, *, server_learning_rate: float = 1.0, server_momentum: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(network, **kwargs)
        self.server_learning_rate = server_learning_rate
        self.server_momentum = server_momentum

    def server_step_enabled(self) -> bool:
        """Off (plain FedAvg) when the learning rate is 1 and momentum 0, as in Flower."""
        return self.server_momentum != 0.0 or self.server_learning_rate != 1.0

    def summary(self) -> None:
        """Log the FedAvgM settings, then FedAvg's."""
        log(
            INFO,
            "\t├──> FedAvgM: server learning rate %s, momentum %s",
            self.server_learning_rate,
            self.server_momentum,
        )
        super().summary()

    def step_group_(self, key: str, target: torch.Tensor, previous: torch.Tensor) -> None:
        """``x = x_prev - lr * (momentum * v + (x_prev - mean))``."""
        gradient = previous - target
        if self.server_momentum > 0.0:
            if key in self.buffers["momentum"]:
                gradient = self.buffers["momentum"][key].mul_(self.server_momentum).add_(gradient)
            self.buffers["momentum"][key] = gradient
        target.copy_(previous - self.server_learning_rate * gradient)


class _FedOpt(_ServerOptimizer):
    """Adaptive server optimizers (Reddi et al., 2021) with Flower's update rules.

    Each subclass lists its arguments and Flower's defaults in ``DEFAULTS``;
    they become attributes of the same names.
    """

    buffer_names = ("m", "v")
    DEFAULTS: ClassVar[Mapping[str, float]] = {}

    def __init__(self, network: nn.Module, **kwargs: Any) -> None:
        options = {name: float(kwargs.pop(name, default)) for name, default in self.DEFAULTS.items()}
        super().__init__(network, **kwargs)
        self.beta_1 = self.beta_2 = 0.0
        for name, value in options.items():
            setattr(self, name, value)

    def summary(self) -> None:
        """Log the optimizer settings, then FedAvg's."""
        settings = " | ".join(f"{name} {getattr(self, name)}" for name in self.DEFAULTS)
        log(INFO, "\t├──> %s: %s", type(self).__name__, settings)
        super().summary()

    @abstractmethod
    def update_v_(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        """Update the second moment ``v`` in place."""

    def step_size(self) -> float:
        """The server learning rate of this round."""
        return self.eta

    def step_group_(self, key: str, target: torch.Tensor, previous: torch.Tensor) -> None:
        """``m = b1 m + (1 - b1) delta``; ``v`` by the rule; ``x = x_prev + step * m / (sqrt(v) + tau)``."""
        delta = target - previous
        m = self.buffer("m", key, delta)
        m.mul_(self.beta_1).add_(delta, alpha=1.0 - self.beta_1)
        v = self.buffer("v", key, delta)
        self.update_v_(v, delta)
        target.copy_(previous + self.step_size() * m / (v.sqrt() + self.tau))


class NnUNetFedAdagrad(_FedOpt):
    """FedAdagrad: ``v += delta^2`` (no first-moment decay).

    Parameters
    ----------
    eta, eta_l, tau : float (defaults 0.1, 0.1, 1e-3, as Flower's ``FedAdagrad``)
        Server learning rate, client learning rate (informational), adaptivity.
    **kwargs
        The arguments of :class:`~flwr_nnunet.strategy.NnUNetFedAvg`.
    """

    DEFAULTS: ClassVar[Mapping[str, float]] = {"eta": 1e-1, "eta_l": 1e-1, "tau": 1e-3}

    def update_v_(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        """``v += delta^2``."""
        v.add_(delta * delta)


class NnUNetFedAdam(_FedOpt):
    """FedAdam: ``v = b2 v + (1 - b2) delta^2`` and Flower's bias-corrected step.

    Parameters
    ----------
    eta, eta_l, beta_1, beta_2, tau : float (defaults 0.1, 0.1, 0.9, 0.99, 1e-3, as Flower's ``FedAdam``)
        Server and client learning rates, moment decays, adaptivity.
    **kwargs
        The arguments of :class:`~flwr_nnunet.strategy.NnUNetFedAvg`.
    """

    DEFAULTS: ClassVar[Mapping[str, float]] = {"eta": 1e-1, "eta_l": 1e-1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}

    def update_v_(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        """``v = b2 v + (1 - b2) delta^2``."""
        v.mul_(self.beta_2).add_(delta * delta, alpha=1.0 - self.beta_2)

    def step_size(self) -> float:
        """``eta * sqrt(1 - b2^(r+1)) / (1 - b1^(r+1))`` for round r, as Flower computes it."""
        r = self.current_round + 1.0
        return self.eta * math.sqrt(1 - self.beta_2**r) / (1 - self.beta_1**r)


class NnUNetFedYogi(_FedOpt):
    """FedYogi: ``v = v - (1 - b2) delta^2 sign(v - delta^2)``.

    Parameters
    ----------
    eta, eta_l, beta_1, beta_2, tau : float (defaults 1e-2, 0.0316, 0.9, 0.99, 1e-3, as Flower's ``FedYogi``)
        Server and client learning rates, moment decays, adaptivity.
    **kwargs
        The arguments of :class:`~flwr_nnunet.strategy.NnUNetFedAvg`.
    """

    DEFAULTS: ClassVar[Mapping[str, float]] = {"eta": 1e-2, "eta_l": 0.0316, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}

    def update_v_(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        """``v = v - (1 - b2) delta^2 sign(v - delta^2)``."""
        squared = delta * delta
        v.sub_((1.0 - self.beta_2) * squared * torch.sign(v - squared))


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


class _AliasAwareDP(RoundRunner):
    """Mixin for Flower's DP wrappers around an :class:`NnUNetFedAvg` family member.

    Replies are validated (and made canonical) before Flower clips them; the
    noised aggregate is written into the network; ``start``/``resume`` continue
    runs like :class:`NnUNetFedAvg`'s and the resume state includes the wrapper's.
    """

    strategy: NnUNetFedAvg
    clipping_norm: float

    def __init__(self, strategy: NnUNetFedAvg, *args: Any, **kwargs: Any) -> None:
        if not isinstance(strategy, NnUNetFedAvg):
            raise TypeError(f"{type(self).__name__} wraps an NnUNetFedAvg family member, got {type(strategy).__name__}")
        super().__init__(strategy, *args, **kwargs)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's wrapper step on the network's canonical record."""
        return super().configure_train(server_round, self.strategy.sync_global(arrays), config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, let Flower clip/aggregate/noise, then write the noised model into the network."""
        core = self.strategy
        core.current_round = server_round
        valid = core.valid_messages(server_round, replies, is_train=True)
        arrays, metrics = super().aggregate_train(server_round, valid)
        if arrays is None:
            return None, metrics
        core.load_global_(arrays, cast=True)
        return core.global_record(), metrics

    def strategy_state(self) -> dict[str, Any]:
        """The wrapped strategy's state and the current clipping norm."""
        return {"inner": self.strategy.strategy_state(), "clipping_norm": float(self.clipping_norm)}

    def load_strategy_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`strategy_state` returned."""
        self.strategy.load_strategy_state(state.get("inner", {}))
        self.clipping_norm = float(state.get("clipping_norm", self.clipping_norm))

    @property
    def core(self) -> NnUNetFedAvg:
        """The wrapped family member: network, model folder, rounds."""
        return self.strategy


class NnUNetDPServerSideFixedClipping(_AliasAwareDP, DifferentialPrivacyServerSideFixedClipping):
    """Central DP, server-side fixed clipping (``noise_multiplier``, ``clipping_norm``, ``num_sampled_clients``)."""


class NnUNetDPClientSideFixedClipping(_AliasAwareDP, DifferentialPrivacyClientSideFixedClipping):
    """Central DP, client-side fixed clipping (clients use Flower's ``fixedclipping_mod``)."""


class NnUNetDPServerSideAdaptiveClipping(_AliasAwareDP, DifferentialPrivacyServerSideAdaptiveClipping):
    """Central DP, server-side adaptive clipping (``noise_multiplier``, ``num_sampled_clients``, ...)."""


class NnUNetDPClientSideAdaptiveClipping(_AliasAwareDP, DifferentialPrivacyClientSideAdaptiveClipping):
    """Central DP, client-side adaptive clipping (clients use ``adaptiveclipping_mod``; replies need ``norm_bit``)."""

    def __init__(self, strategy: NnUNetFedAvg, *args: Any, **kwargs: Any) -> None:
        super().__init__(strategy, *args, **kwargs)
        strategy.validator.required_metrics += (KEY_NORM_BIT,)


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
) -> NnUNetFedAvg | _AliasAwareDP:
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
