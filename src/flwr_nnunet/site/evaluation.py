"""A site's validation Dice: whole cases, nnU-Net's sliding-window predictor, preprocessed space."""

from __future__ import annotations

from collections.abc import Sequence
from logging import INFO
from typing import Any

import numpy as np
import torch
from flwr.supercore import log
from torch import nn

from flwr_nnunet.nnunet.label_sets import annotated_of, drawn_as_values, predictions_as_drawn
from flwr_nnunet.nnunet.metrics import dice_from_counts, label_confusion, region_counts
from flwr_nnunet.site.spec import SiteError, SiteSpec

__all__ = ["predictor", "validation_dice"]


@torch.no_grad()
def validation_dice(
    spec: SiteSpec, trainer: Any, network: nn.Module, validation: Sequence[str], model: str = "global model"
) -> dict[str, float | int | list[float]]:
    """Dice of ``network`` (the trainer's, unwrapped; ``model`` names it in the log) on the ``validation`` cases
    of the site's fold.

    A region-based dataset (``regions_class_order`` in ``dataset.json``) is
    scored per region as nnU-Net's validation does: region ``i`` is predicted
    where the sigmoid of output channel ``i`` exceeds 0.5, and true where the
    reference holds any of its labels.

    Returns
    -------
    dict
        ``num-examples`` (validation cases), ``dice`` (the mean over foreground labels, or regions, of the Dice
        from voxel counts summed over the cases) and ``dice-per-class`` (one Dice per foreground label, or per
        region, in the label manager's order: ``foreground_labels`` or ``foreground_regions``); for labels (not
        regions) also ``label-confusion``, :func:`~flwr_nnunet.nnunet.metrics.label_confusion` summed over the
        cases and flattened row by row (reference label, then predicted label; background included): voxel
        counts only, from which the server sees whether the site's labels follow the federation's convention.

    Raises
    ------
    SiteError
        If there are no validation cases.
    """
    if not validation:
        raise SiteError(f"{spec.name}: fold {spec.fold} has no validation cases; set run-config 'fold'")
    labels = trainer.label_manager
    foreground = list(labels.foreground_regions if labels.has_regions else labels.foreground_labels)
    counts = np.zeros((len(foreground), 3))
    classes = labels.num_segmentation_heads
    confusion = np.zeros((classes, classes))
    sliding = predictor(trainer, network)
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, validation)
    trainer.set_deep_supervision_enabled(False)
    try:
        for case in validation:
            data, seg, _, _ = dataset.load_case(case)
            logits = sliding.predict_sliding_window_return_logits(torch.from_numpy(np.ascontiguousarray(data[:])))
            truth = np.asarray(seg[:])[0]
            if labels.has_regions:
                counts += region_counts(truth, labels.apply_inference_nonlin(logits).cpu().numpy(), foreground)
            else:
                confusion += label_confusion(truth, logits.argmax(0).cpu().numpy(), classes)
    finally:
        trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
    drawn_as = drawn_as_values(trainer.dataset_json)
    if not labels.has_regions:
        as_drawn = confusion if drawn_as is None else predictions_as_drawn(confusion, drawn_as)
        hits = np.diag(as_drawn)
        counts = np.stack([hits, as_drawn.sum(axis=0) - hits, as_drawn.sum(axis=1) - hits], axis=1)[foreground]
    per_class = [dice_from_counts(*count) for count in counts]
    scored = [drawn_as is None or value in annotated_of(drawn_as) for value in foreground]
    dice = float(np.mean([d for d, kept in zip(per_class, scored) if kept]))
    log(INFO, "%s: %s Dice %.4f on %d validation case(s)", spec.name, model, dice, len(validation))
    metrics = {"num-examples": len(validation), "dice": dice, "dice-per-class": per_class}
    if not labels.has_regions:
        metrics["label-confusion"] = confusion.reshape(-1).tolist()
    if drawn_as is not None:
        metrics["annotated-per-class"] = [int(kept) for kept in scored]
    return metrics


def predictor(trainer: Any, network: nn.Module) -> Any:
    """An ``nnUNetPredictor`` over ``network`` with the trainer's plans (Gaussian tiles, half-tile steps).

    Mirroring is used when the trainer allows it; ``network`` is put in eval mode.
    """
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    if trainer.inference_allowed_mirroring_axes is None:
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    result = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=trainer.inference_allowed_mirroring_axes is not None,
        perform_everything_on_device=trainer.device.type == "cuda",
        device=trainer.device,
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    result.manual_initialization(
        network,
        trainer.plans_manager,
        trainer.configuration_manager,
        None,
        trainer.dataset_json,
        type(trainer).__name__,
        trainer.inference_allowed_mirroring_axes,
    )
    network.eval()
    return result
