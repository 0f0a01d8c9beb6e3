"""The marginal loss of a site that annotated only some of the federation's labels.

Shi et al., "Marginal loss and exclusion loss for partially supervised multi-organ segmentation" (Medical Image
Analysis, 2021): a voxel the site left as background may belong to a label it did not annotate, so the network's
probabilities of those labels are merged with the background's before the loss. Merging logits with
``logsumexp`` gives exactly the softmax of the merged classes, so nnU-Net's own loss (Dice + cross-entropy, with
deep supervision) runs unchanged on the merged outputs and the site's labels renumbered ``0 .. |annotated| - 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from flwr_nnunet.nnunet.label_sets import annotated_values
from flwr_nnunet.site.spec import SiteError, SiteSpec

__all__ = ["MarginalLoss", "marginal_loss_for_partial_labels", "merge_classes"]


def merge_classes(logits: torch.Tensor, annotated: Sequence[int]) -> torch.Tensor:
    """``logits`` (batch, classes, ...) with every class outside ``annotated`` merged into the background: channel
    0 is the log-sum-exp of the background and those classes, then one channel per annotated foreground label."""
    kept = [value for value in annotated if value != 0]
    merged = [value for value in range(logits.shape[1]) if value not in kept]
    background = torch.logsumexp(logits[:, merged], dim=1, keepdim=True)
    return torch.cat([background, logits[:, kept]], dim=1)


class MarginalLoss:
    """nnU-Net's loss on outputs whose unannotated classes are merged with the background
    (:func:`merge_classes`) and targets renumbered to match (each annotated value to its channel).

    Parameters
    ----------
    loss
        The trainer's loss (``DeepSupervisionWrapper(DC_and_CE_loss)`` or a plain one): it takes the outputs and
        targets, or lists of them under deep supervision.
    annotated
        The label values the site annotated (background included), e.g. ``[0, 1]``.
    num_classes
        The federation's number of classes (output channels).
    ignore_label
        nnU-Net's ignore label (the value after the classes), kept as it is for the loss to ignore; None: none.
    """

    def __init__(self, loss: Any, annotated: Sequence[int], num_classes: int, ignore_label: int | None = None) -> None:
        self.loss = loss
        self.annotated = sorted({0, *(int(value) for value in annotated)})
        size = num_classes if ignore_label is None else max(num_classes, ignore_label + 1)
        lookup = torch.zeros(size, dtype=torch.long)
        for channel, value in enumerate(self.annotated):
            lookup[value] = channel
        if ignore_label is not None:
            lookup[ignore_label] = ignore_label
        self.lookup = lookup

    def _target(self, target: torch.Tensor) -> torch.Tensor:
        return self.lookup.to(target.device)[target.long()].to(target.dtype)

    def __call__(self, output: Any, target: Any) -> torch.Tensor:
        if isinstance(output, (list, tuple)):
            return self.loss([merge_classes(o, self.annotated) for o in output], [self._target(t) for t in target])
        return self.loss(merge_classes(output, self.annotated), self._target(target))


def marginal_loss_for_partial_labels(spec: SiteSpec, trainer: Any) -> None:
    """Give an initialised trainer the marginal loss when its site annotated fewer labels than the federation
    (its installed ``dataset.json``, :func:`~flwr_nnunet.nnunet.label_sets.annotated_values`); else nothing.

    Raises
    ------
    SiteError
        For a region-based dataset (partial labels are declared per label).
    """
    annotated = annotated_values(trainer.dataset_json)
    if annotated is None:
        return
    labels = trainer.label_manager
    if labels.has_regions:
        raise SiteError(f"{spec.name}: partial labels need label-based training, not regions; annotate every region")
    trainer.loss = MarginalLoss(trainer.loss, annotated, labels.num_segmentation_heads, labels.ignore_label)
