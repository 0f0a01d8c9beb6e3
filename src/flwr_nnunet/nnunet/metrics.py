"""Segmentation metrics from voxel counts: the one place Dice is computed."""

from __future__ import annotations

import numpy as np

__all__ = ["dice_from_counts", "voxel_counts"]


def voxel_counts(truth: np.ndarray, predicted: np.ndarray, label: int) -> np.ndarray:
    """``[tp, fp, fn]`` of ``label`` in ``predicted`` against ``truth`` (same shape), as float64.

    Sum them over cases before :func:`dice_from_counts` to get the Dice of the
    pooled voxels (what nnU-Net's validation and this project report).
    """
    t, p = truth == label, predicted == label
    return np.array([np.sum(t & p), np.sum(p & ~t), np.sum(t & ~p)], dtype=np.float64)


def dice_from_counts(tp: float, fp: float, fn: float) -> float:
    """Dice ``2 tp / (2 tp + fp + fn)`` from voxel counts.

    Empty case: when ``tp + fp + fn == 0`` (the label is in neither the truth
    nor the prediction) the Dice is ``0.0``, never NaN, so a mean over labels
    and the metrics sent to the server stay finite. (nnU-Net's own
    ``compute_metrics`` reports NaN there and skips it in its means.)
    """
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator > 0 else 0.0
