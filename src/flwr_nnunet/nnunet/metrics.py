"""Segmentation metrics from voxel counts: the one place Dice is computed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "REGION_THRESHOLD",
    "LabelMatching",
    "best_label_matching",
    "dice_from_counts",
    "label_confusion",
    "mask_counts",
    "region_counts",
    "region_mask",
    "voxel_counts",
]

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


def label_confusion(truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Voxel counts ``C[r, p]``: voxels whose reference label is ``r`` and predicted label ``p``, shape
    ``(num_classes, num_classes)`` (labels ``0 .. num_classes - 1``, background included), as float64.

    Reference voxels outside that range (nnU-Net's ignore label) are not counted.
    """
    t = np.asarray(truth, dtype=np.int64).reshape(-1)
    p = np.asarray(predicted, dtype=np.int64).reshape(-1)
    counted = (t >= 0) & (t < num_classes) & (p >= 0) & (p < num_classes)
    flat = np.bincount(t[counted] * num_classes + p[counted], minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.float64)


@dataclass(frozen=True)
class LabelMatching:
    """How a site's reference labels fit a model's predictions best (see :func:`best_label_matching`).

    Attributes
    ----------
    permutation
        ``permutation[i]`` is the predicted foreground label (1-based) that reference label ``i + 1`` matches.
    dice_as_labelled
        Mean foreground Dice with every reference label matched to the same predicted label.
    dice_matched
        Mean foreground Dice under ``permutation``.
    """

    permutation: tuple[int, ...]
    dice_as_labelled: float
    dice_matched: float
    dice: tuple[tuple[float, ...], ...] = ()

    @property
    def is_identity(self) -> bool:
        """Whether the labels fit best as they are."""
        return all(matched == label for label, matched in enumerate(self.permutation, start=1))

    def mean_dice(self, permutation: Sequence[int]) -> float:
        """Mean foreground Dice with reference label ``i + 1`` matched to predicted label ``permutation[i]``."""
        return float(np.mean([self.dice[i][p - 1] for i, p in enumerate(permutation)]))

    def swaps(self) -> list[tuple[int, int]]:
        """The reference labels that match another predicted label: ``[(reference, predicted), ...]``."""
        return [(label, p) for label, p in enumerate(self.permutation, start=1) if p != label]


def best_label_matching(confusion: np.ndarray) -> LabelMatching:
    """The one-to-one matching of reference to predicted foreground labels with the highest mean Dice.

    ``confusion`` is :func:`label_confusion` summed over cases (label 0 is the background and stays matched to
    itself). The Dice of reference label ``r`` against predicted label ``p`` is
    ``2 C[r, p] / (sum_p' C[r, p'] + sum_r' C[r', p])``; the mean Dice of a matching is the mean over the
    foreground labels, so the best matching is an assignment problem, solved exactly
    (``scipy.optimize.linear_sum_assignment``; ties keep the identity).

    Raises
    ------
    ValueError
        If ``confusion`` is not a square matrix of at least 2 x 2 finite, non-negative counts.
    """
    from scipy.optimize import linear_sum_assignment

    counts = np.asarray(confusion, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] < 2:
        raise ValueError(f"a label confusion matrix must be square with at least 2 labels, got shape {counts.shape}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("a label confusion matrix must hold finite, non-negative counts")
    reference, predicted = counts.sum(axis=1)[1:], counts.sum(axis=0)[1:]
    denominator = reference[:, None] + predicted[None, :]
    dice = np.divide(2 * counts[1:, 1:], denominator, out=np.zeros_like(denominator), where=denominator > 0)
    identity = float(np.mean(np.diag(dice)))
    rows, columns = linear_sum_assignment(dice, maximize=True)
    matched = float(np.mean(dice[rows, columns]))
    table = tuple(tuple(float(v) for v in row) for row in dice)
    if matched <= identity:
        return LabelMatching(tuple(range(1, len(dice) + 1)), identity, identity, table)
    return LabelMatching(tuple(int(c) + 1 for c in columns), identity, matched, table)
