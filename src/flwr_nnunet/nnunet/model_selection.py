"""nnU-Net's choice of a configuration or ensemble (``nnUNetv2_find_best_configuration``), from scores already computed.

nnU-Net scores each trained configuration by the mean foreground Dice of its merged cross-validation
(``crossval_results_folds_0_1_2_3_4/summary.json``), then every pair of configurations (in the order given, each
pair once) by the same Dice of their ensemble, and keeps the best; on a tie the first, so a single configuration
wins over an ensemble. :func:`candidates` names them as nnU-Net does, :func:`best_candidate` chooses, and
:func:`inference_information` / :func:`write_inference_information` write what nnU-Net writes beside the
dataset's models: ``inference_information.json`` and ``inference_instructions.txt`` (nnU-Net's own
``print_inference_instructions``). Usable without Flower.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

from flwr_nnunet.errors import FlwrNnUNetError
from flwr_nnunet.nnunet.planning import nnunet_environment

__all__ = [
    "SUPPORTED_CONFIGURATIONS",
    "Candidate",
    "ModelSelectionError",
    "best_candidate",
    "candidates",
    "check_configurations",
    "inference_information",
    "model_identifier",
    "write_inference_information",
]

SUPPORTED_CONFIGURATIONS = ("2d", "3d_fullres")
"""The configurations a federation can cross-validate and ensemble today."""

_LATER = {
    "3d_lowres": "the low-resolution stage is cross-validated only as part of the cascade",
    "3d_cascade_fullres": "the cascade's second stage needs the first stage's predictions of every case at each site",
}

Candidate = tuple[str, tuple[str, ...]]
"""``(name, members)``: a model identifier and itself, or nnU-Net's ensemble name and its two members."""


class ModelSelectionError(FlwrNnUNetError, ValueError):
    """The configurations to choose from cannot be compared as asked."""


def model_identifier(trainer: str, plans: str, configuration: str) -> str:
    """``<Trainer>__<Plans>__<configuration>``: a trained model's folder name."""
    return f"{trainer}__{plans}__{configuration}"


def check_configurations(configurations: Sequence[str], available: Sequence[str]) -> None:
    """Raise :class:`ModelSelectionError` unless ``configurations`` are distinct, supported and planned.

    ``available`` are the plans' configurations.
    """
    if not configurations:
        raise ModelSelectionError("no configuration to choose from: name them, e.g. '2d 3d_fullres'")
    if len(set(configurations)) != len(configurations):
        raise ModelSelectionError(f"configurations {list(configurations)} name one twice")
    for configuration in configurations:
        if configuration in _LATER:
            raise ModelSelectionError(
                f"configuration {configuration!r} is not supported by federated model selection yet "
                f"({_LATER[configuration]}); compare {' and '.join(SUPPORTED_CONFIGURATIONS)}"
            )
        if configuration not in SUPPORTED_CONFIGURATIONS or configuration not in available:
            raise ModelSelectionError(
                f"configuration {configuration!r} is not one the plans hold ({', '.join(available)}) and federated "
                f"model selection supports ({', '.join(SUPPORTED_CONFIGURATIONS)})"
            )


def candidates(models: Sequence[str], folds: Sequence[int], *, ensembles: bool = True) -> list[Candidate]:
    """Every single model, then every pair ``i < j`` as an ensemble: nnU-Net's candidates, in nnU-Net's order."""
    from nnunetv2.utilities.file_path_utilities import get_ensemble_name

    singles: list[Candidate] = [(model, (model,)) for model in models]
    if not ensembles:
        return singles
    pairs: list[Candidate] = [
        (get_ensemble_name(first, second, tuple(folds)), (first, second))
        for i, first in enumerate(models)
        for second in models[i + 1 :]
    ]
    return singles + pairs


def best_candidate(scores: Mapping[str, float]) -> str:
    """The name with the highest score; on a tie the first (nnU-Net: the simpler model, singles come first)."""
    best = max(scores.values())
    return next(name for name, score in scores.items() if score == best)


def inference_information(
    dataset: str,
    configurations: Sequence[str],
    *,
    trainer: str,
    plans: str,
    folds: Sequence[int],
    scores: Mapping[str, float],
    best: Candidate,
    post_pp_dice: float,
    source: Path,
    ensembles: bool = True,
) -> dict[str, Any]:
    """What ``find_best_configuration`` returns and saves as ``inference_information.json``.

    ``source`` is the best candidate's folder (its ``postprocessing.pkl`` and ``plans.json``).
    """
    selected = []
    for member in best[1]:
        member_trainer, member_plans, configuration = member.split("__")
        selected.append({"configuration": configuration, "trainer": member_trainer, "plans_identifier": member_plans})
    return {
        "folds": list(folds),
        "dataset_name_or_id": dataset,
        "considered_models": [{"plans": plans, "configuration": c, "trainer": trainer} for c in configurations],
        "ensembling_allowed": ensembles,
        "all_results": dict(scores),
        "best_model_or_ensemble": {
            "result_on_crossval_pre_pp": scores[best[0]],
            "result_on_crossval_post_pp": post_pp_dice,
            "postprocessing_file": str(source / "postprocessing.pkl"),
            "some_plans_file": str(source / "plans.json"),
            "selected_model_or_models": selected,
        },
    }


def write_inference_information(information: Mapping[str, Any], results: Path) -> tuple[Path, Path]:
    """``inference_information.json`` and nnU-Net's ``inference_instructions.txt`` in ``<results>/<dataset>/``.

    The instructions are nnU-Net's ``print_inference_instructions`` (its ``nnUNetv2_predict``, ``nnUNetv2_ensemble``
    and ``nnUNetv2_apply_postprocessing`` commands) with ``nnUNet_results`` at ``results``.
    """
    from batchgenerators.utilities.file_and_folder_operations import save_json
    from nnunetv2.evaluation.find_best_configuration import print_inference_instructions

    folder = Path(results) / str(information["dataset_name_or_id"])
    folder.mkdir(parents=True, exist_ok=True)
    data, text = folder / "inference_information.json", folder / "inference_instructions.txt"
    save_json(dict(information), str(data))  # nnU-Net's writer: sorted keys, indent 4
    with nnunet_environment(results=results), open(os.devnull, "w") as quiet, redirect_stdout(quiet):
        print_inference_instructions(dict(information), instructions_file=str(text))
    return data, text
