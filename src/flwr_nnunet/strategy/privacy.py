"""Flower's differential-privacy wrappers, made alias-aware for the NnUNetFedAvg family.

Replies are validated (and made canonical) before clipping, so norms and noise
count each shared tensor once; the noised model is written into the network.
The fixed-clipping wrappers also stream (``start(..., streaming=True)``, see
:class:`FixedClippingStream`): each reply is clipped when it arrives, folded and
released, and the noise is added once when the round closes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Result,
)
from flwr.serverapp.strategy.dp_fixed_clipping import validate_replies
from flwr.supercore import log
from flwr.supercore.differential_privacy import KEY_NORM_BIT, add_gaussian_noise_inplace, compute_stdv, get_norm

from flwr_nnunet.core.reduce import Tensors
from flwr_nnunet.strategy.checkpoints import StatefulStrategy
from flwr_nnunet.strategy.fedavg import NnUNetFedAvg
from flwr_nnunet.strategy.replies import AcceptedReply, bounded, non_finite_reason
from flwr_nnunet.strategy.streaming import STAGE, TrainStream, streams

__all__ = [
    "AliasAwareDP",
    "FixedClippingStream",
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
    streams: ClassVar[bool] = False
    """Whether ``start(..., streaming=True)`` streams the wrapped strategy's training rounds (when it streams)."""

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


class FixedClippingStream(TrainStream):
    """A streaming training round of a fixed-clipping DP wrapper, with the result of its batch path.

    Server-side clipping: each accepted reply is clipped on arrival against the model sent this round, by
    Flower's rule on the canonical tensors (each shared tensor counted once in the norm): ``x' = g + s (x - g)``
    with ``s = min(1, clipping_norm / ||x - g||)``, in the reply's dtype, as the batch path computes it. The clipped
    reply is folded and released, so memory is one clipped copy per reply in flight. When the round closes, after
    the mean (and the wrapped strategy's server step), Gaussian noise of Flower's standard deviation is added
    once, drawn as Flower draws it (``numpy.random``, group by group in the record's order): the same noise as
    the batch path for the same random state. Flower's reply-count check applies.

    Parameters
    ----------
    wrapper
        The DP wrapper (:class:`NnUNetDPServerSideFixedClipping` or :class:`NnUNetDPClientSideFixedClipping`).
    server_round
        The round.
    clip
        Clip each reply on arrival (server-side clipping; the sites clip for client-side clipping).
    """

    def __init__(self, wrapper: StreamedFixedClipping, server_round: int, *, clip: bool) -> None:
        super().__init__(wrapper.strategy, server_round)
        self.wrapper = wrapper
        self.clip = clip
        self.sent: list[np.ndarray] | None = None

    def prepare(self, reply: AcceptedReply) -> Tensors:
        """The reply clipped against the model sent this round (server-side clipping), else as it is."""
        if not self.clip:
            return reply.tensors
        if self.sent is None:
            model = self.strategy.model
            self.sent = [t.cpu().numpy() for t in model.values_in(self.snapshot, list(model.tensors)).values()]
        update = [np.subtract(t.cpu().numpy(), g) for t, g in zip(reply.tensors.values(), self.sent, strict=True)]
        norm, clipping_norm = get_norm(update), self.wrapper.clipping_norm
        if norm > clipping_norm:
            for delta in update:
                delta *= clipping_norm / norm
            log(
                INFO,
                "%s: round %d: node %d: update norm %.4g clipped to %g",
                STAGE,
                self.server_round,
                reply.node_id,
                norm,
                clipping_norm,
            )
        for delta, sent in zip(update, self.sent, strict=True):
            np.add(sent, delta, out=delta)
        device = next(iter(self.strategy.model.tensors.values())).device
        return OrderedDict((k, torch.from_numpy(d).to(device)) for k, d in zip(reply.tensors, update, strict=True))

    def on_result_(self, tensors: Tensors) -> list[str]:
        """Add the round's Gaussian noise to the result in place; the keys now not finite."""
        wrapper = self.wrapper
        stdv = compute_stdv(wrapper.noise_multiplier, wrapper.clipping_norm, wrapper.num_sampled_clients)
        host = [t.detach().cpu() for t in tensors.values()]
        add_gaussian_noise_inplace([h.numpy() for h in host], stdv)
        for tensor, value in zip(tensors.values(), host, strict=True):
            if tensor.data_ptr() != value.data_ptr():
                tensor.copy_(value)
        log(INFO, "%s: round %d: central DP noise with %.4f stdev added", STAGE, self.server_round, stdv)
        return [k for k, t in tensors.items() if non_finite_reason(k, t)]

    def finish(self) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Close the round as :meth:`TrainStream.finish`, after Flower's check of the reply count.

        No privacy accounting: Flower's fixed-clipping wrappers refuse an accountant for a strategy with its own
        ``aggregate_train``, which every :class:`NnUNetFedAvg` has.
        """
        if not validate_replies([a.message for a in self.folded], self.wrapper.num_sampled_clients):
            self.abort()
            return None, None
        return super().finish()


class StreamedFixedClipping(AliasAwareDP):
    """Fixed-clipping DP wrappers, whose training rounds stream (:class:`FixedClippingStream`)."""

    streams: ClassVar[bool] = True
    noise_multiplier: float
    num_sampled_clients: int

    def train_stream(self, server_round: int) -> FixedClippingStream:
        """The round's stream (see :func:`flwr_nnunet.strategy.streaming.open_stream`)."""
        if not streams(self):
            raise TypeError(f"{type(self.strategy).__name__} does not stream: use aggregate_train")
        return FixedClippingStream(
            self, server_round, clip=isinstance(self, DifferentialPrivacyServerSideFixedClipping)
        )


class NnUNetDPServerSideFixedClipping(StreamedFixedClipping, DifferentialPrivacyServerSideFixedClipping):
    """Central DP, server-side fixed clipping (``noise_multiplier``, ``clipping_norm``, ``num_sampled_clients``)."""


class NnUNetDPClientSideFixedClipping(StreamedFixedClipping, DifferentialPrivacyClientSideFixedClipping):
    """Central DP, client-side fixed clipping (clients use Flower's ``fixedclipping_mod``)."""


class NnUNetDPServerSideAdaptiveClipping(AliasAwareDP, DifferentialPrivacyServerSideAdaptiveClipping):
    """Central DP, server-side adaptive clipping (``noise_multiplier``, ``num_sampled_clients``, ...)."""


class NnUNetDPClientSideAdaptiveClipping(AliasAwareDP, DifferentialPrivacyClientSideAdaptiveClipping):
    """Central DP, client-side adaptive clipping (clients use ``adaptiveclipping_mod``; replies need ``norm_bit``)."""

    def __init__(self, strategy: NnUNetFedAvg, *args: Any, **kwargs: Any) -> None:
        super().__init__(strategy, *args, **kwargs)
        strategy.validator.required_metrics += (KEY_NORM_BIT,)
