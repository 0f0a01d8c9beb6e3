"""Server optimizers on an nnU-Net network: the weighted mean in place, then a server step per group.

FedAvgM (server momentum) and FedOpt's FedAdagrad, FedAdam and FedYogi, with
Flower's arguments and defaults; their per-group buffers (momentum, moments)
are part of the resume state. A step that would make the model or a buffer
non-finite refuses the round: model and buffers stay as before it (one log line).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from logging import INFO
from typing import Any, ClassVar

import torch
from flwr.supercore import log
from torch import nn

from flwr_nnunet.core.reduce import Tensors
from flwr_nnunet.strategy.aggregation import RoundRefused
from flwr_nnunet.strategy.fedavg import NnUNetFedAvg
from flwr_nnunet.strategy.replies import non_finite_reason

__all__ = ["NnUNetFedAdagrad", "NnUNetFedAdam", "NnUNetFedAvgM", "NnUNetFedYogi", "step_problem"]


def step_problem(key: str, target: torch.Tensor, buffers: Mapping[str, torch.Tensor | None]) -> str | None:
    """What a server step left non-finite in group ``key``: the model (``target``) or a named buffer; None."""
    reason = non_finite_reason(key, target)
    if reason:
        return f"the model non-finite ({reason})"
    for name, buffer in buffers.items():
        reason = None if buffer is None else non_finite_reason(key, buffer)
        if reason:
            return f"its {name!r} buffer non-finite ({reason})"
    return None


class _ServerOptimizer(NnUNetFedAvg):
    """Weighted mean in place, then a server step per floating-point group.

    Integer groups (BatchNorm's ``num_batches_tracked``) keep the mean. The
    per-group buffers named in ``buffer_names`` are the resume state.
    """

    buffer_names: tuple[str, ...] = ()
    streams = True  # the weighted mean streams; the step runs on the streamed mean (reduce_all_ with it alone)

    def __init__(self, network: nn.Module, **kwargs: Any) -> None:
        super().__init__(network, **kwargs)
        self.buffers: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.buffer_names}

    def server_step_enabled(self) -> bool:
        """Whether the server step changes anything (FedAvgM without momentum and lr 1 is FedAvg)."""
        return True

    @abstractmethod
    def step_group_(self, server_round: int, key: str, target: torch.Tensor, previous: torch.Tensor) -> None:
        """Replace ``target`` (holding the mean of the replies) by the server update from ``previous``."""

    def reduce_all_(
        self, server_round: int, targets: Tensors, updates: Sequence[Tensors], weights: Sequence[float]
    ) -> list[str]:
        """Weighted mean into ``targets``, then :meth:`step_group_` on every floating-point group
        (from the pre-round values, read from the record sent this round).

        Raises
        ------
        RoundRefused
            When a step would make a group or a buffer (moment, momentum) non-finite (e.g. one finite but huge
            reply); the buffers are then restored to their pre-round values (the caller rolls the model back),
            so the round leaves no trace and later rounds step as before.
        """
        snapshot = self.model.snapshot()
        non_finite = super().reduce_all_(server_round, targets, updates, weights)
        if non_finite or not self.server_step_enabled():
            return non_finite
        previous = self.model.values_in(snapshot, [k for k, t in targets.items() if t.is_floating_point()])
        saved = {name: {k: t.clone() for k, t in buffers.items()} for name, buffers in self.buffers.items()}
        with torch.no_grad():
            for key, before in previous.items():
                self.step_group_(server_round, key, targets[key], before)
                problem = step_problem(key, targets[key], {name: b.get(key) for name, b in self.buffers.items()})
                if problem:
                    self.buffers = saved
                    raise RoundRefused(
                        f"{type(self).__name__}'s server step would make {problem}: the round's update is refused "
                        "and the server-optimizer state rolled back"
                    )
        return []

    def buffer(self, name: str, key: str, like: torch.Tensor) -> torch.Tensor:
        """The state buffer ``name`` of group ``key`` (zeros the first time)."""
        buffers = self.buffers[name]
        if key not in buffers:
            buffers[key] = torch.zeros_like(like)
        return buffers[key]

    def strategy_state(self) -> dict[str, Any]:
        """The per-group buffers (moments, momentum), besides :meth:`NnUNetFedAvg.strategy_state`'s."""
        return {**super().strategy_state(), **{name: dict(buffers) for name, buffers in self.buffers.items()}}

    def load_strategy_state(self, state: Mapping[str, Any]) -> None:
        """Restore the per-group buffers onto the network's devices and dtypes (and the base state)."""
        super().load_strategy_state(state)
        for name in self.buffer_names:
            saved = state.get(name, {})
            unknown = set(saved) - set(self.model.tensors)
            if unknown:
                raise ValueError(f"strategy state {name!r} has unknown keys {sorted(unknown)[:3]}")
            self.buffers[name] = {
                k: t.to(device=self.model.tensors[k].device, dtype=self.model.tensors[k].dtype).clone()
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
        The arguments of :class:`~flwr_nnunet.strategy.fedavg.NnUNetFedAvg`.
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

    def step_group_(self, server_round: int, key: str, target: torch.Tensor, previous: torch.Tensor) -> None:
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

    def step_size(self, server_round: int) -> float:
        """The server learning rate of round ``server_round``."""
        return self.eta

    def step_group_(self, server_round: int, key: str, target: torch.Tensor, previous: torch.Tensor) -> None:
        """``m = b1 m + (1 - b1) delta``; ``v`` by the rule; ``x = x_prev + step * m / (sqrt(v) + tau)``."""
        delta = target - previous
        m = self.buffer("m", key, delta)
        m.mul_(self.beta_1).add_(delta, alpha=1.0 - self.beta_1)
        v = self.buffer("v", key, delta)
        self.update_v_(v, delta)
        target.copy_(previous + self.step_size(server_round) * m / (v.sqrt() + self.tau))


class NnUNetFedAdagrad(_FedOpt):
    """FedAdagrad: ``v += delta^2`` (no first-moment decay).

    Parameters
    ----------
    eta, eta_l, tau : float (defaults 0.1, 0.1, 1e-3, as Flower's ``FedAdagrad``)
        Server learning rate, client learning rate (informational), adaptivity.
    **kwargs
        The arguments of :class:`~flwr_nnunet.strategy.fedavg.NnUNetFedAvg`.
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
        The arguments of :class:`~flwr_nnunet.strategy.fedavg.NnUNetFedAvg`.
    """

    DEFAULTS: ClassVar[Mapping[str, float]] = {"eta": 1e-1, "eta_l": 1e-1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}

    def update_v_(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        """``v = b2 v + (1 - b2) delta^2``."""
        v.mul_(self.beta_2).add_(delta * delta, alpha=1.0 - self.beta_2)

    def step_size(self, server_round: int) -> float:
        """``eta * sqrt(1 - b2^(r+1)) / (1 - b1^(r+1))`` for round r, as Flower computes it."""
        r = server_round + 1.0
        return self.eta * math.sqrt(1 - self.beta_2**r) / (1 - self.beta_1**r)


class NnUNetFedYogi(_FedOpt):
    """FedYogi: ``v = v - (1 - b2) delta^2 sign(v - delta^2)``.

    Parameters
    ----------
    eta, eta_l, beta_1, beta_2, tau : float (defaults 1e-2, 0.0316, 0.9, 0.99, 1e-3, as Flower's ``FedYogi``)
        Server and client learning rates, moment decays, adaptivity.
    **kwargs
        The arguments of :class:`~flwr_nnunet.strategy.fedavg.NnUNetFedAvg`.
    """

    DEFAULTS: ClassVar[Mapping[str, float]] = {"eta": 1e-2, "eta_l": 0.0316, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}

    def update_v_(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        """``v = v - (1 - b2) delta^2 sign(v - delta^2)``."""
        squared = delta * delta
        v.sub_((1.0 - self.beta_2) * squared * torch.sign(v - squared))
