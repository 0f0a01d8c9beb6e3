"""A site's smaller batch or patch for its GPU memory, on the federation's one architecture.

nnU-Net plans a batch and a patch for about 8 GB of GPU memory. A hospital with less can train the same network
(so the same alias groups, weights and plans digest) on a smaller batch, and on a smaller patch where the
network's pooling still divides it: the network is fully convolutional, only the input tensor shrinks. The plans
file on disk stays the federation's; only the trainer the site builds sees the fitted copy.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

__all__ = ["fit_to_memory", "iterations_scale", "pooling_divisors"]


def _configuration(plans: dict, configuration: str) -> dict:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    return PlansManager(plans).get_configuration(configuration).configuration


def pooling_divisors(plans: dict, configuration: str) -> tuple[int, ...]:
    """Per axis, the product of the network's pooling strides: every patch edge must be a multiple of it."""
    strides = _configuration(plans, configuration)["architecture"]["arch_kwargs"]["strides"]
    return tuple(math.prod(int(stage[axis]) for stage in strides) for axis in range(len(strides[0])))


def fit_to_memory(
    plans: dict, configuration: str, *, batch_size: int | None = None, patch_size: Sequence[int] | None = None
) -> dict:
    """A copy of ``plans`` whose ``configuration`` trains with ``batch_size`` and ``patch_size`` (None: as planned).

    Raises
    ------
    ValueError
        If the batch is not from 1 to the planned batch, or the patch has another number of axes, an edge larger
        than planned, or one the network's pooling does not divide; the message names the values that fit.
    """
    planned = _configuration(plans, configuration)
    fitted = copy.deepcopy(plans)
    target = fitted["configurations"][configuration]
    if batch_size is not None:
        if not 1 <= batch_size <= planned["batch_size"]:
            raise ValueError(
                f"batch size {batch_size} does not fit the plans' {configuration!r}: a site may lower its batch "
                f"from the planned {planned['batch_size']} to 1, not raise it (every site trains the same plans)"
            )
        target["batch_size"] = int(batch_size)
    if patch_size is not None:
        divisors, largest = pooling_divisors(plans, configuration), list(planned["patch_size"])
        patch = [int(edge) for edge in patch_size]
        fits = len(patch) == len(largest) and all(
            0 < edge <= top and edge % divisor == 0 for edge, top, divisor in zip(patch, largest, divisors)
        )
        if not fits:
            raise ValueError(
                f"patch size {patch} does not fit the plans' {configuration!r}: give {len(largest)} edges, each at "
                f"most the planned {largest} and a multiple of the network's pooling {list(divisors)}"
            )
        target["patch_size"] = patch
    return fitted


def iterations_scale(plans: dict, configuration: str, batch_size: int | None) -> int:
    """How many iterations a site with ``batch_size`` runs for each of the federation's, so that its epochs see
    as many patches as the planned batch would: ``ceil(planned / batch_size)`` (1 without a smaller batch)."""
    if batch_size is None:
        return 1
    return math.ceil(_configuration(plans, configuration)["batch_size"] / batch_size)
