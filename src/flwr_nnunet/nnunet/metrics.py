"""Segmentation metrics from voxel counts: the one place Dice is computed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["REGION_THRESHOLD", "dice_from_counts", "mask_counts", "region_counts", "region_mask", "voxel_counts"]

REGION_THRESHOLD = 0.5
"""A region-based network predicts a region where its channel's sigmoid exceeds this (nnU-Net's rule)."""


def region_mask(segmentation: np.ndarray, label_or_region: int | Sequence[int]) -> np.ndarray:
    """Where ``segmentation`` (a label map) holds ``label_or_region``: one label, or any label of a region."""
    if np.isscalar(label_or_region):
        return segmentation == label_or_region
    return np.isin(segmentation, np.asarray(label_or_region))


def mask_counts(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """``[tp, fp, fn]`` of the boolean mask ``predicted`` against ``truth`` (same shape), as float64."""
    t, p = np.asarray(truth, dtype=bool), np.asarray(predicted, dtype=bool)
    return np.array([np.sum(t & p), np.sum(p & ~t), np.sum(t & ~p)], dtype=np.float64)


def voxel_counts(truth: np.ndarray, predicted: np.ndarray, label: int) -> np.ndarray:
    """``[tp, fp, fn]`` of ``label`` in ``predicted`` against ``truth`` (label maps of one shape), as float64.

    Sum them over cases before :func:`dice_from_counts` to get the Dice of the
    pooled voxels (what nnU-Net's validation and this project report).
    """
    return mask_counts(truth == label, predicted == label)


def region_counts(truth: np.ndarray, probabilities: np.ndarray, regions: Sequence[int | Sequence[int]]) -> np.ndarray:
    """``[tp, fp, fn]`` per region of a region-based prediction, shape ``(len(regions), 3)``.

    Parameters
    ----------
    truth
        The reference label map.
    probabilities
        The network's sigmoid outputs, one channel per region, of shape ``(len(regions), *truth.shape)``.
    regions
        The label manager's ``foreground_regions``, in channel order.

    Region ``i`` is predicted where ``probabilities[i] > REGION_THRESHOLD`` and
    is true where ``truth`` holds any of its labels, as in nnU-Net's validation.
    """
    if len(probabilities) != len(regions):
        raise ValueError(f"{len(probabilities)} probability channels for {len(regions)} regions")
    counts = [mask_counts(region_mask(truth, r), p > REGION_THRESHOLD) for r, p in zip(regions, probabilities)]
    return np.array(counts, dtype=np.float64).reshape(len(regions), 3)


def dice_from_counts(tp: float, fp: float, fn: float) -> float:
    """Dice ``2 tp / (2 tp + fp + fn)`` from voxel counts.

    Empty case: when ``tp + fp + fn == 0`` (the label is in neither the truth
    nor the prediction) the Dice is ``0.0``, never NaN, so a mean over labels
    and the metrics sent to the server stay finite. (nnU-Net's own
    ``compute_metrics`` reports NaN there and skips it in its means.)
    """
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator > 0 else 0.0
