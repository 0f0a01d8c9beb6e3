"""The marginal loss of a site that annotated only some of the federation's labels.

Shi et al., "Marginal loss and exclusion loss for partially supervised multi-organ segmentation" (Medical Image
Analysis, 2021): a voxel the site left as background may belong to a label it did not annotate, so the network's
probabilities of those labels are merged with the background's before the loss. A label that lies within another
(a lesion within its organ) is merged with that one instead where the site drew it so (its ``dataset.json``'s
``unannotated_drawn_as``). Merging logits with ``logsumexp`` gives exactly the softmax of the merged classes, so
nnU-Net's own loss (Dice + cross-entropy, with deep supervision) runs unchanged on the merged outputs and the
site's labels renumbered ``0 .. |annotated| - 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from flwr_nnunet.nnunet.label_sets import annotated_of, drawn_as_values
from flwr_nnunet.site.spec import SiteError, SiteSpec

__all__ = ["MarginalLoss", "marginal_loss_for_partial_labels", "merge_classes"]


def merge_classes(logits: torch.Tensor, drawn_as: Sequence[int]) -> torch.Tensor:
    """``logits`` (batch, classes, ...) with every class merged into the one the site drew it as: one channel per
    annotated label (``drawn_as[v] == v``, in value order), the log-sum-exp of it and the classes drawn as it.

    ``drawn_as[v]`` is the label value class ``v`` is drawn as at the site: ``v`` itself where the site annotated
    it, 0 (background) or the label it lies within where it did not.
    """
    groups = [[value for value, drawn in enumerate(drawn_as) if drawn == kept] for kept in annotated_of(drawn_as)]
    return torch.cat([torch.logsumexp(logits[:, group], dim=1, keepdim=True) for group in groups], dim=1)


class MarginalLoss:
    """nnU-Net's loss on outputs whose unannotated classes are merged with the background
    (:func:`merge_classes`) and targets renumbered to match (each annotated value to its channel).

    Parameters
    ----------
    loss
        The trainer's loss (``DeepSupervisionWrapper(DC_and_CE_loss)`` or a plain one): it takes the outputs and
        targets, or lists of them under deep supervision.
    drawn_as
        Per federation label value (one per output channel), the value the site drew it as, e.g. ``[0, 1, 0]``
        (the lesion left as background) or ``[0, 1, 1]`` (drawn within the organ): see :func:`merge_classes`.
    ignore_label
        nnU-Net's ignore label (the value after the classes), kept as it is for the loss to ignore; None: none.
    """

    def __init__(self, loss: Any, drawn_as: Sequence[int], ignore_label: int | None = None) -> None:
        self.loss = loss
        self.drawn_as = [int(value) for value in drawn_as]
        size = len(self.drawn_as) if ignore_label is None else max(len(self.drawn_as), ignore_label + 1)
        lookup = torch.zeros(size, dtype=torch.long)
        for channel, value in enumerate(annotated_of(self.drawn_as)):
            lookup[value] = channel
        if ignore_label is not None:
            lookup[ignore_label] = ignore_label
        self.lookup = lookup

    def _target(self, target: torch.Tensor) -> torch.Tensor:
        return self.lookup.to(target.device)[target.long()].to(target.dtype)

    def __call__(self, output: Any, target: Any) -> torch.Tensor:
        if isinstance(output, (list, tuple)):
            return self.loss([merge_classes(o, self.drawn_as) for o in output], [self._target(t) for t in target])
        return self.loss(merge_classes(output, self.drawn_as), self._target(target))


def marginal_loss_for_partial_labels(spec: SiteSpec, trainer: Any) -> None:
    """Give an initialised trainer the marginal loss when its site annotated fewer labels than the federation
    (its installed ``dataset.json``, :func:`~flwr_nnunet.nnunet.label_sets.drawn_as_values`); else nothing.

    Raises
    ------
    SiteError
        For a region-based dataset (partial labels are declared per label).
    """
    drawn_as = drawn_as_values(trainer.dataset_json)
    if drawn_as is None:
        return
    labels = trainer.label_manager
    if labels.has_regions:
        raise SiteError(f"{spec.name}: partial labels need label-based training, not regions; annotate every region")
    trainer.loss = MarginalLoss(trainer.loss, drawn_as, labels.ignore_label)
