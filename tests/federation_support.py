"""Raw nnU-Net datasets at several sites, nnU-Net's own plans of them pooled, and one federated run in-process.

:func:`write_site` writes a site's ``nnUNet_raw/<dataset>`` (2D PNG or 3D NIfTI with a spacing, labels or
regions); :func:`pooled_plans` runs nnU-Net's fingerprint extractor and planner on every site's cases copied into
one dataset; :func:`run_federation` runs the ServerApp (federated planning, then the rounds) with every message
delivered in-process to ``client_app.py`` (test_federated_planning's ``QueryGrid``: no Ray, no SuperLink).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from flwr_nnunet.demo.synthesis import SiteStyle, synthesize_case, write_case

REPO = Path(__file__).resolve().parents[1]
TOTAL_SAMPLES = 30000  # nnU-Net's 1e8 foreground samples shrunk for a test (the same rule: total // cases)
TINY = {"plans-max-features": 16, "plans-width-divisor": 4, "iterations-per-epoch": 2, "val-iterations-per-epoch": 1}
"""Run-config overrides for a cheap round: narrow networks, two iterations."""


def dataset_json(num_training: int, labels: Mapping, *, ending: str, regions_class_order=None) -> dict:
    """A raw ``dataset.json`` of one MRI channel; regions when ``regions_class_order`` is given."""
    about = {"channel_names": {"0": "MRI"}, "labels": dict(labels), "numTraining": num_training, "file_ending": ending}
    if regions_class_order is not None:
        about["regions_class_order"] = list(regions_class_order)
    return about


def _write_nifti(path: Path, array: np.ndarray, spacing: Sequence[float], dtype: type) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array.astype(dtype))
    image.SetSpacing(tuple(float(s) for s in reversed(spacing)))  # SimpleITK orders x, y, z
    sitk.WriteImage(image, str(path))


def write_site(
    folder: Path,
    seed: int,
    style: SiteStyle,
    shape: Sequence[int],
    num_cases: int,
    labels: Mapping,
    *,
    spacing: Sequence[float] | None = None,
    regions_class_order=None,
) -> Path:
    """``num_cases`` synthetic cases (label 1 organ, label 2 lesion inside it) of ``shape`` and their dataset.json.

    2D shapes are written as PNG; 3D shapes as NIfTI with ``spacing`` (array order, default 1 mm).
    """
    rng = np.random.default_rng([7, seed])
    dims = len(shape)
    for i in range(num_cases):
        case = f"site{seed}_{i:03d}"
        pair = synthesize_case(rng, style, tuple(shape))
        if dims == 2:
            write_case(folder, "imagesTr", "labelsTr", case, pair, 2)
            continue
        for sub in ("imagesTr", "labelsTr"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        spacing_ = spacing or (1.0,) * dims
        _write_nifti(folder / "imagesTr" / f"{case}_0000.nii.gz", pair[0], spacing_, np.float32)
        _write_nifti(folder / "labelsTr" / f"{case}.nii.gz", pair[1], spacing_, np.uint8)
    ending = ".png" if dims == 2 else ".nii.gz"
    about = dataset_json(num_cases, labels, ending=ending, regions_class_order=regions_class_order)
    (folder / "dataset.json").write_text(json.dumps(about))
    return folder


def pooled_plans(sites: Sequence[Path], dataset: str, root: Path, total_samples: int = TOTAL_SAMPLES) -> dict:
    """``{"fingerprint", "plans"}`` of nnU-Net's own extractor and planner on the sites' cases in one dataset."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    from flwr_nnunet.nnunet.planning import nnunet_environment

    raw, preprocessed = root / "nnUNet_raw", root / "nnUNet_preprocessed"
    folder = raw / dataset
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
        for site in sites:
            for path in (site / sub).iterdir():
                shutil.copyfile(path, folder / sub / path.name)
    about = json.loads((sites[0] / "dataset.json").read_text())
    about["numTraining"] = len(list((folder / "labelsTr").iterdir()))
    (folder / "dataset.json").write_text(json.dumps(about))
    with nnunet_environment(raw, preprocessed):
        extractor = DatasetFingerprintExtractor(dataset, num_processes=1)
        extractor.num_foreground_voxels_for_intensitystats = total_samples
        extractor.show_progress_bar = False
        fingerprint = extractor.run()
        ExperimentPlanner(dataset).plan_experiment()
    plans = json.loads((preprocessed / dataset / "nnUNetPlans.json").read_text())
    return {"fingerprint": json.loads(json.dumps(fingerprint)), "plans": plans}


def run_config(root: Path, dataset: str, configuration: str, num_sites: int, **overrides) -> dict:
    """The project's run config (pyproject.toml) for raw data at ``<root>/site-K`` and federated planning."""
    from flwr.common.config import get_fused_config_from_dir

    override = {
        "data-root": str(root),
        "make-demo": False,
        "dataset": dataset,
        "configuration": configuration,
        "planning": "federated",
        "num-server-rounds": 1,
        "min-available-nodes": num_sites,
        "min-train-nodes": num_sites,
        "min-evaluate-nodes": num_sites,
        "node-wait": 0.0,
        "device": "cpu",
        **TINY,
        **overrides,
    }
    return get_fused_config_from_dir(REPO, override)


def run_federation(
    config: Mapping,
    num_sites: int,
    total_samples: int = TOTAL_SAMPLES,
    *,
    flagged: Sequence[str] | None = (),
    node_configs: Mapping[int, Mapping] | None = None,
) -> dict:
    """The ServerApp's whole run (federated planning, then the rounds) with ``total_samples`` foreground samples.

    Returns ``{"plans", "dataset_json"}`` (the server's, as planned), ``"grid"`` (its contexts and replies),
    ``"history"`` (flwr_history.json's rounds) and ``"model"`` (the global model folder). Asserts that the sites
    the run flagged as disagreeing with the federation are exactly ``flagged`` (none: no false alarm; None: no
    check). ``node_configs``: site K's node-config entries besides its partition id (as a SuperNode's
    ``--node-config``).
    """
    from flwr.app import Context, RecordDict
    from test_federated_planning import query_grid

    from flwr_nnunet.apps.history import HISTORY_FILE
    from flwr_nnunet.apps.run_config import RunSettings
    from flwr_nnunet.apps.server import run_server

    grid = query_grid(config, num_sites)  # it sets the task identity a running ServerApp has
    for site, entries in (node_configs or {}).items():
        grid.contexts[100 + site].node_config.update(entries)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, as each simulated site has (two are several times slower on 2 busy cores)
    try:
        with pytest.MonkeyPatch.context() as patch:  # nnU-Net's 1e8 foreground samples shrunk (the same rule)
            patch.setattr("flwr_nnunet.nnunet.fingerprint.NNUNET_FOREGROUND_SAMPLES", total_samples)
            run_server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(config)))
    finally:
        torch.set_num_threads(threads)
    settings = RunSettings.from_run_config(config)
    folder = settings.server_dataset_folder
    model = settings.results_dir / settings.dataset / f"{settings.trainer}__{settings.plans}__{settings.configuration}"
    history_folder = model / f"fold_{settings.fold}" if settings.crossval else model  # a fold's own history
    history = json.loads((history_folder / HISTORY_FILE).read_text())["rounds"]
    last = history[max(history, key=int)] if history else {}
    assert flagged is None or sorted(last.get("diagnostics", {}).get("flagged", {})) == sorted(flagged)
    return {
        "plans": json.loads((folder / f"{settings.plans}.json").read_text()),
        "dataset_json": json.loads((folder / "dataset.json").read_text()),
        "grid": grid,
        "history": history,
        "model": model,
    }
