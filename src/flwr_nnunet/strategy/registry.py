"""Every alias-aware strategy by name, optionally wrapped for differential privacy.

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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from flwr_nnunet.strategy.fedavg import NnUNetFedAvg, NnUNetFedProx
from flwr_nnunet.strategy.flower_adapted import NnUNetBulyan, NnUNetKrum, NnUNetMultiKrum, NnUNetQFedAvg
from flwr_nnunet.strategy.privacy import (
    AliasAwareDP,
    NnUNetDPClientSideAdaptiveClipping,
    NnUNetDPClientSideFixedClipping,
    NnUNetDPServerSideAdaptiveClipping,
    NnUNetDPServerSideFixedClipping,
)
from flwr_nnunet.strategy.robust import NnUNetFedMedian, NnUNetFedTrimmedAvg
from flwr_nnunet.strategy.server_optimizers import NnUNetFedAdagrad, NnUNetFedAdam, NnUNetFedAvgM, NnUNetFedYogi

__all__ = ["DP_WRAPPERS", "STRATEGIES", "strategy_from_name"]


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
