"""A site's ensemble of two configurations' cross-validation predictions, as nnU-Net's ``ensemble_crossvalidations``.

``nnUNetv2_find_best_configuration`` scores every pair of trained configurations by ensembling their five folds'
validation softmax (the ``.npz`` files each fold's validation keeps) and evaluating the ensemble. In a federation
the softmax never leaves its site, so each site ensembles its own: for every case it validated, the members'
probabilities averaged with nnU-Net's ``average_probabilities``, turned into a segmentation by the label manager,
written with the dataset's writer into ``<nnUNet_results>/<dataset>/ensembles/<ensemble name>/`` (beside nnU-Net's
``summary.json`` of it), and counted against the case's ground truth as a fold's validation counts its own
predictions (:func:`~flwr_nnunet.site.crossval_validation.count_case`). Only the counts leave the site.

The ensemble prediction is written with its reference segmentation's geometry: nnU-Net's ``merge_files`` takes it
from the ``<case>.pkl`` beside the first ``.npz``, a pickle this project does not open; the voxels, and so the
counts, are the same.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.supercore import log

from flwr_nnunet.site.crossval_validation import count_case, ground_truth, write_site_summary
from flwr_nnunet.site.spec import InstructionError, SiteError, SiteSpec

__all__ = ["FOLDS_KEY", "MEMBERS_KEY", "MODEL_IDENTIFIER", "ensemble_counts", "ensemble_folder", "ensemble_request"]

MEMBERS_KEY = "ensemble-members"
"""The ``query.ensemble`` message's config entry: the two model identifiers to ensemble (a list of text)."""

FOLDS_KEY = "ensemble-folds"
"""The ``query.ensemble`` message's config entry: the cross-validation folds (a list of integers)."""

MODEL_IDENTIFIER = re.compile(r"[A-Za-z0-9_-]+__[A-Za-z0-9_-]+__[A-Za-z0-9_-]+")
"""A trained model's folder name, ``<Trainer>__<Plans>__<configuration>`` (never a path)."""

_MAX_FOLDS = 100


def ensemble_request(config: Any) -> tuple[list[str], list[int]]:
    """The members and folds a ``query.ensemble`` config names, each checked.

    Raises
    ------
    InstructionError
        Unless :data:`MEMBERS_KEY` is two different model identifiers and :data:`FOLDS_KEY` distinct folds >= 0.
    """
    members, folds = config.get(MEMBERS_KEY), config.get(FOLDS_KEY)
    if (
        not isinstance(members, list)
        or len(members) != 2
        or len(set(members)) != 2
        or not all(isinstance(m, str) and MODEL_IDENTIFIER.fullmatch(m) for m in members)
    ):
        raise InstructionError(
            f"config {MEMBERS_KEY!r} must be two different <Trainer>__<Plans>__<configuration>, not {members!r:.200}"
        )
    if (
        not isinstance(folds, list)
        or not 0 < len(folds) <= _MAX_FOLDS
        or len(set(folds)) != len(folds)
        or not all(isinstance(f, int) and not isinstance(f, bool) and f >= 0 for f in folds)
    ):
        raise InstructionError(f"config {FOLDS_KEY!r} must be distinct cross-validation folds >= 0, not {folds!r:.200}")
    return list(members), list(folds)


def ensemble_folder(spec: SiteSpec, members: Sequence[str], folds: Sequence[int]) -> Path:
    """``<nnUNet_results>/<dataset>/ensembles/ensemble___<member 1>___<member 2>___<folds>``, nnU-Net's place."""
    from nnunetv2.utilities.file_path_utilities import get_ensemble_name

    return spec.nnunet_results / spec.dataset / "ensembles" / get_ensemble_name(*members, tuple(folds))


def _validation_files(spec: SiteSpec, member: str, folds: Sequence[int]) -> dict[str, Path]:
    """``{case: <member>/fold_k/validation/<case>.npz}`` over ``folds``; a missing fold or softmax is an error."""
    files: dict[str, Path] = {}
    for fold in folds:
        folder = spec.nnunet_results / spec.dataset / member / f"fold_{fold}" / "validation"
        found = sorted(folder.glob("*.npz"))
        if not found:
            raise SiteError(
                f"{spec.name}: no validation softmax (.npz) of {member} fold {fold} in {folder}: run that fold's "
                "federated cross-validation (scripts/run_crossval.py) before ensembling"
            )
        files.update({path.name.removesuffix(".npz"): path for path in found})
    return files


def ensemble_counts(spec: SiteSpec, members: Sequence[str], folds: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Ensemble ``members``' cross-validation predictions of ``folds`` at this site; return the per-case counts.

    Parameters
    ----------
    spec
        The site (its ``nnUNet_results`` hold each member's folds with their validation ``.npz``).
    members
        Two model identifiers, ``<Trainer>__<Plans>__<configuration>``, in nnU-Net's order
        (checked by :func:`ensemble_request`).
    folds
        The cross-validation folds whose validation cases are ensembled.

    Returns
    -------
    dict
        ``{case id: candidate counts}``, the form a fold's validation returns
        (:func:`~flwr_nnunet.site.crossval_validation.validate_fold`).

    Raises
    ------
    SiteError
        If a fold's softmax is missing, or the members validated different cases (before anything is written).
    """
    from nnunetv2.ensembling.ensemble import average_probabilities
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    files = {member: _validation_files(spec, member, folds) for member in members}
    first, second = (sorted(files[member]) for member in members)
    if first != second:
        differ = sorted(set(first) ^ set(second))
        raise SiteError(
            f"{spec.name}: {members[0]} and {members[1]} validated different cases (e.g. {differ[:3]}): both must be "
            "cross-validated on this site's splits_final.json"
        )
    model = spec.nnunet_results / spec.dataset / members[0]
    plans = PlansManager(json.loads((model / "plans.json").read_text()))
    dataset_json = json.loads((model / "dataset.json").read_text())
    labels = plans.get_label_manager(dataset_json)
    targets = list(labels.foreground_regions if labels.has_regions else labels.foreground_labels)
    reader, ending = plans.image_reader_writer_class(), dataset_json["file_ending"]
    references = ground_truth(spec, first, ending)
    folder = ensemble_folder(spec, members, folds)
    folder.mkdir(parents=True, exist_ok=True)
    payload: dict[str, dict[str, Any]] = {}
    for case in first:
        probabilities = average_probabilities([str(files[member][case]) for member in members])
        _, geometry = reader.read_seg(str(references[case]))
        reader.write_seg(
            labels.convert_probabilities_to_segmentation(probabilities), str(folder / case) + ending, geometry
        )
        payload[case] = count_case(reader, references[case], folder / f"{case}{ending}", targets, labels)
    dice = write_site_summary(payload, targets, references, folder, ending)
    log(
        INFO,
        "%s: ensemble of %s: %d case(s), foreground Dice %.4f (in %s)",
        spec.name,
        " + ".join(members),
        len(payload),
        dice,
        folder,
    )
    return payload
