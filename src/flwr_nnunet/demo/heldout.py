"""Held-out evaluation of the demo: predict each site's test cases with ``nnUNetv2_predict``, score Dice,
and train the local-only baselines the federated model is compared with."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from flwr_nnunet.core.aliasing import AliasMap
from flwr_nnunet.demo.data import LABELS, DemoDataset, DemoSite
from flwr_nnunet.nnunet.metrics import dice_from_counts, voxel_counts
from flwr_nnunet.nnunet.networks import build_trainer_network
from flwr_nnunet.site.site import Site
from flwr_nnunet.site.spec import SiteSpec, TrainOptions

__all__ = [
    "dice_scores",
    "gather_test_images",
    "predict",
    "predict_as_instructed",
    "predict_test_cases",
    "train_local_only",
]


def dice_scores(
    predictions: str | os.PathLike, labels: str | os.PathLike, cases: Sequence[str], file_ending: str
) -> dict[str, float]:
    """Dice per foreground label over ``cases`` (voxel counts summed over cases), and their mean as ``"mean"``.

    Reads ``<folder>/<case><file_ending>`` from both folders with nnU-Net's reader for that ending.
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

    labels_path, predictions_path = Path(labels), Path(predictions)
    first = str(labels_path / f"{cases[0]}{file_ending}")
    reader = determine_reader_writer_from_file_ending(file_ending, first, verbose=False)()
    counts = {label: np.zeros(3) for name, label in LABELS.items() if label}
    for case in cases:
        truth, _ = reader.read_seg(str(labels_path / f"{case}{file_ending}"))
        predicted, _ = reader.read_seg(str(predictions_path / f"{case}{file_ending}"))
        for label, count in counts.items():
            count += voxel_counts(truth, predicted, label)
    scores = {name: dice_from_counts(*counts[label]) for name, label in LABELS.items() if label}
    scores["mean"] = float(np.mean(list(scores.values())))
    return scores


def train_local_only(
    demo: DemoDataset,
    site: DemoSite,
    results: str | os.PathLike,
    *,
    epochs: int,
    iterations_per_epoch: int,
    val_iterations_per_epoch: int,
    seed: int = 0,
    trainer: str = "nnUNetTrainer",
    device: str = "auto",
) -> Path:
    """Train ``site`` alone for ``epochs`` epochs (the baseline a federation is compared with).

    Starts from the same initial weights as the federated run with the same
    ``seed`` and trains through the same :class:`~flwr_nnunet.site.site.Site` code,
    as one long round. Returns the nnU-Net model folder under ``results``
    (``fold_<fold>/checkpoint_final.pth``, usable with ``nnUNetv2_predict -f 0``).
    """
    spec = SiteSpec(
        name=f"{site.name} (local only)",
        dataset=demo.dataset_name,
        nnunet_preprocessed=site.nnunet_preprocessed,
        nnunet_results=Path(results),
        configuration=demo.configuration,
        plans=demo.plans_name,
        trainer=trainer,
        device=device,
    )
    local = Site(spec)
    plans = local.check()
    dataset_json = json.loads((site.preprocessed_dataset_folder / "dataset.json").read_text())
    torch.manual_seed(seed)
    network = build_trainer_network(plans, dataset_json, demo.configuration, trainer)
    initial = AliasMap.from_module(network).collapse(network.state_dict())
    options = TrainOptions(
        local_epochs=epochs,
        num_epochs=epochs,
        iterations_per_epoch=iterations_per_epoch,
        val_iterations_per_epoch=val_iterations_per_epoch,
        seed=seed,
    )
    local.train(initial, options)
    local.trainer.on_train_end()
    return spec.output_folder.parent


def gather_test_images(demo: DemoDataset, folder: str | os.PathLike) -> Path:
    """Every site's held-out images in one folder (symbolic links), so one ``nnUNetv2_predict`` call covers all."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for site in demo.sites:
        for case in site.test_cases:
            name = f"{case}_0000{demo.file_ending}"
            link = folder / name
            if not link.is_symlink():
                link.symlink_to(site.images_ts / name)
    return folder


def _nnunet_command(name: str, arguments: list[str], environment: dict[str, str], what: str) -> None:
    """Run one of nnU-Net's commands (installed beside this Python); its output in the error if it fails."""
    command = shutil.which(name) or str(Path(sys.executable).with_name(name))
    done = subprocess.run([command, *arguments], check=False, env=environment, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed on {what}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def predict(
    demo: DemoDataset,
    nnunet_results: str | os.PathLike,
    images: str | os.PathLike,
    output: str | os.PathLike,
    *,
    fold: str | Sequence[str] = "all",
    trainer: str = "nnUNetTrainer",
    device: str = "cpu",
    checkpoint: str = "checkpoint_final.pth",
    configuration: str | None = None,
    save_probabilities: bool = False,
) -> Path:
    """Run ``nnUNetv2_predict`` on a folder of images with the model under ``nnunet_results``; return ``output``.

    ``nnunet_results`` is the ``nnUNet_results`` root holding the model folder; ``fold`` is ``all`` for the
    federated model and ``0`` for a local-only one (or a site's personal model, ``checkpoint_personal.pth``); several
    folds (``["0", "1", "2", "3", "4"]``) ensemble a cross-validation's fold models, as nnU-Net does.
    ``configuration``: the demo's own by default. ``save_probabilities``: nnU-Net's ``--save_probabilities``
    (what ``nnUNetv2_ensemble`` averages).

    Raises
    ------
    RuntimeError
        With nnU-Net's output, if the prediction fails.
    """
    arguments = ["-i", str(images), "-o", str(output), "-d", str(demo.dataset_id)]
    arguments += ["-c", configuration or demo.configuration, "-p", demo.plans_name, "-tr", trainer, "-f"]
    arguments += [fold] if isinstance(fold, str) else [str(f) for f in fold]
    arguments += ["-chk", checkpoint, "-device", device, "-npp", "1", "-nps", "1", "--disable_progress_bar"]
    arguments += ["--save_probabilities"] if save_probabilities else []
    environment = {**os.environ, "nnUNet_results": str(nnunet_results), "nnUNet_def_n_proc": "1"}
    _nnunet_command("nnUNetv2_predict", arguments, environment, str(images))
    return Path(output)


def predict_as_instructed(
    demo: DemoDataset,
    information: dict,
    nnunet_results: str | os.PathLike,
    images: str | os.PathLike,
    output: str | os.PathLike,
) -> Path:
    """Predict ``images`` as ``inference_instructions.txt`` says: each selected model's folds with
    ``nnUNetv2_predict``, ``nnUNetv2_ensemble`` when an ensemble won, then ``nnUNetv2_apply_postprocessing``;
    return the postprocessed folder (``<output>/postprocessed``).

    ``information`` is ``inference_information.json`` (:mod:`flwr_nnunet.nnunet.model_selection`).
    """
    output = Path(output)
    best = information["best_model_or_ensemble"]
    selected = best["selected_model_or_models"]
    folds = [str(f) for f in information["folds"]]
    members = []
    for model in selected:
        folder = output / model["configuration"]
        predict(
            demo,
            nnunet_results,
            images,
            folder,
            fold=folds,
            trainer=model["trainer"],
            configuration=model["configuration"],
            save_probabilities=len(selected) > 1,
        )
        members.append(str(folder))
    environment = {**os.environ, "nnUNet_results": str(nnunet_results), "nnUNet_def_n_proc": "1"}
    merged = output / "ensemble" if len(selected) > 1 else Path(members[0])
    if len(selected) > 1:
        _nnunet_command("nnUNetv2_ensemble", ["-i", *members, "-o", str(merged), "-np", "1"], environment, str(images))
    arguments = ["-i", str(merged), "-o", str(output / "postprocessed"), "-pp_pkl_file", best["postprocessing_file"]]
    dataset_json = Path(best["postprocessing_file"]).with_name("dataset.json")  # beside it, as nnU-Net copies it
    arguments += ["-np", "1", "-plans_json", best["some_plans_file"], "-dataset_json", str(dataset_json)]
    _nnunet_command("nnUNetv2_apply_postprocessing", arguments, environment, str(merged))
    return output / "postprocessed"


def predict_test_cases(
    demo: DemoDataset,
    site: DemoSite,
    nnunet_results: str | os.PathLike,
    output: str | os.PathLike,
    *,
    fold: str = "all",
    trainer: str = "nnUNetTrainer",
    device: str = "cpu",
) -> dict[str, float]:
    """Predict ``site``'s held-out cases with ``nnUNetv2_predict`` (see :func:`predict`) and return their Dice."""
    predict(demo, nnunet_results, site.images_ts, output, fold=fold, trainer=trainer, device=device)
    return dice_scores(output, site.labels_ts, site.test_cases, demo.file_ending)
