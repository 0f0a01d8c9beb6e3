"""Flower's differential-privacy wrappers, made alias-aware for the NnUNetFedAvg family.

Replies are validated (and made canonical) before clipping, so norms and noise
count each shared tensor once; the noised model is written into the network.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Result,
)
from flwr.supercore import log
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from flwr_nnunet.strategy.checkpoints import StatefulStrategy
from flwr_nnunet.strategy.fedavg import NnUNetFedAvg
from flwr_nnunet.strategy.replies import bounded

__all__ = [
    "AliasAwareDP",
    "NnUNetDPClientSideAdaptiveClipping",
    "NnUNetDPClientSideFixedClipping",
    "NnUNetDPServerSideAdaptiveClipping",
    "NnUNetDPServerSideFixedClipping",
]


class AliasAwareDP:
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
        snapshot = core.model.snapshot()
        valid = core.valid_messages(server_round, replies, is_train=True)
        try:
            arrays, metrics = super().aggregate_train(server_round, valid)
            if arrays is None:
                return None, metrics
            core.model.load_(arrays, cast=True)
        except (ArithmeticError, ValueError, TypeError) as error:  # Flower's checks, a non-finite noised model
            core.model.roll_back_(snapshot)
            log(
                WARNING,
                "aggregate_train: round %d: %s refused the round (%s): global model unchanged",
                server_round,
                type(self).__name__,
                bounded(error),
            )
            return None, None
        return core.model.record(), metrics

    def strategy_state(self) -> dict[str, Any]:
        """The wrapped strategy's state and the current clipping norm."""
        inner = self.strategy.strategy_state() if isinstance(self.strategy, StatefulStrategy) else {}
        return {"inner": inner, "clipping_norm": float(self.clipping_norm)}

    def load_strategy_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`strategy_state` returned."""
        if isinstance(self.strategy, StatefulStrategy):
            self.strategy.load_strategy_state(state.get("inner", {}))
        self.clipping_norm = float(state.get("clipping_norm", self.clipping_norm))

    def resume(self, run_config: Mapping[str, Any] | None = None) -> int:
        """As :meth:`NnUNetFedAvg.resume`, restoring the wrapper's state too."""
        return self.strategy.checkpoints.resume(self, run_config)

    def start(
        self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int = 3, **kwargs: Any
    ) -> Result:
        """As :meth:`NnUNetFedAvg.start`, each round going through the wrapper."""
        return self.strategy.start(grid, initial_arrays, num_rounds, via=self, **kwargs)


class NnUNetDPServerSideFixedClipping(AliasAwareDP, DifferentialPrivacyServerSideFixedClipping):
    """Central DP, server-side fixed clipping (``noise_multiplier``, ``clipping_norm``, ``num_sampled_clients``)."""


class NnUNetDPClientSideFixedClipping(AliasAwareDP, DifferentialPrivacyClientSideFixedClipping):
    """Central DP, client-side fixed clipping (clients use Flower's ``fixedclipping_mod``)."""


class NnUNetDPServerSideAdaptiveClipping(AliasAwareDP, DifferentialPrivacyServerSideAdaptiveClipping):
    """Central DP, server-side adaptive clipping (``noise_multiplier``, ``num_sampled_clients``, ...)."""


class NnUNetDPClientSideAdaptiveClipping(AliasAwareDP, DifferentialPrivacyClientSideAdaptiveClipping):
    """Central DP, client-side adaptive clipping (clients use ``adaptiveclipping_mod``; replies need ``norm_bit``)."""

    def __init__(self, strategy: NnUNetFedAvg, *args: Any, **kwargs: Any) -> None:
        super().__init__(strategy, *args, **kwargs)
        strategy.validator.required_metrics += (KEY_NORM_BIT,)
