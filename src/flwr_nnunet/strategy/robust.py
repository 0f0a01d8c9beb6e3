"""Robust in-place reducers: the element-wise median and trimmed mean of the replies, over every group at once.

A NaN or Inf can hide in an order statistic, so every reply is checked for
them first (``result_shows_non_finite = False``).
"""

from __future__ import annotations

from collections.abc import Sequence

from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg

from flwr_nnunet.core.reduce import Tensors, median_, trimmed_mean_
from flwr_nnunet.strategy.fedavg import NnUNetFedAvg

__all__ = ["NnUNetFedMedian", "NnUNetFedTrimmedAvg"]


class NnUNetFedMedian(NnUNetFedAvg, FedMedian):
    """FedMedian: the element-wise median of the replies (unweighted), in place."""

    result_shows_non_finite = False

    def reduce_all_(
        self, server_round: int, targets: Tensors, updates: Sequence[Tensors], weights: Sequence[float]
    ) -> list[str]:
        """Write the element-wise median of the updates into ``targets``."""
        return median_(targets, updates, accumulate_dtype=self.accumulate_dtype, check_finite=True)


class NnUNetFedTrimmedAvg(NnUNetFedAvg, FedTrimmedAvg):
    """FedTrimmedAvg: the element-wise trimmed mean (``beta``, default 0.2, cut at each end), in place."""

    result_shows_non_finite = False

    def reduce_all_(
        self, server_round: int, targets: Tensors, updates: Sequence[Tensors], weights: Sequence[float]
    ) -> list[str]:
        """Write the element-wise trimmed mean of the updates into ``targets``."""
        return trimmed_mean_(targets, updates, self.beta, accumulate_dtype=self.accumulate_dtype, check_finite=True)
