"""A synthetic multi-site segmentation dataset, ready for nnU-Net and for ``flwr run .``.

Each site ("hospital") images the same kind of object with its own scanner:
different intensity scale and offset, noise, contrast and object sizes, and a
different number of cases. Label 1 is an ellipse ("organ"), label 2 a small
disc inside it ("lesion"). :func:`make_demo_dataset` writes, under one root::

    server/nnUNet_preprocessed/Dataset<ID>_<Name>/ shared plans, merged fingerprint, dataset.json
    server/nnUNet_results/                      the global model goes here
    site-K/nnUNet_raw/Dataset<ID>_<Name>/          imagesTr, labelsTr, imagesTs, labelsTs, dataset.json
    site-K/nnUNet_preprocessed/Dataset<ID>_<Name>/ the shared plans, splits_final.json, preprocessed cases
    site-K/nnUNet_results/                      the site's own trainer output and round state
    demo.json                                   what was made (read back by :func:`load_demo_dataset`)

Every site uses the same dataset id and name (as real federations agree on one),
so the plans are byte-identical across sites and the server. The plans come from
the sites' aggregate statistics, merged exactly (:mod:`flwr_nnunet.nnunet.fingerprint`),
as the run's federated planning makes them: the server holds no raw data, no
case is copied to it.

Held-out evaluation and local-only baselines: :mod:`flwr_nnunet.demo.heldout`.
Command line: ``flwr-nnunet demo ROOT [--sites N] [--3d] [--seed S]``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from flwr_nnunet.demo.synthesis import SITE_STYLES, SITE_STYLES_3D, SiteStyle, site_styles, synthesize_case, write_case
from flwr_nnunet.nnunet.fingerprint import (
    agreed_bins,
    check_consistency,
    merge_site_statistics,
    site_statistics,
    site_survey,
)
from flwr_nnunet.nnunet.planning import install_plans, plan_from_fingerprint, preprocess_site, shrink_plans

__all__ = [
    "SITE_STYLES",
    "SITE_STYLES_3D",
    "DemoDataset",
    "DemoSite",
    "SiteStyle",
    "load_demo_dataset",
    "make_demo_dataset",
    "synthesize_case",
]

PLANS_NAME = "nnUNetPlans"
LABELS = {"background": 0, "organ": 1, "lesion": 2}
_MANIFEST = "demo.json"
_SAMPLES_PER_CASE = 10000
"""Foreground samples per case for the demo's intensity statistics (its MRI channel's z-score does not use them)."""


@dataclass(frozen=True)
class DemoSite:
    """One site's folders and cases (every path absolute).

    Attributes
    ----------
    name
        ``site-K``; also its ``partition-id`` K in simulation.
    nnunet_raw, nnunet_preprocessed, nnunet_results
        The site's nnU-Net roots (set them as ``nnUNet_raw`` etc. to run nnU-Net commands for this site).
    training_cases, validation_cases
        Identifiers of the preprocessed cases and the fold-0 validation split (``splits_final.json``).
    test_cases
        Held-out case identifiers in ``raw_dataset_folder/imagesTs`` (labels in ``labelsTs``).
    """

    name: str
    dataset_name: str
    nnunet_raw: Path
    nnunet_preprocessed: Path
    nnunet_results: Path
    training_cases: tuple[str, ...]
    validation_cases: tuple[str, ...]
    test_cases: tuple[str, ...]

    @property
    def raw_dataset_folder(self) -> Path:
        """``<nnunet_raw>/Dataset<ID>_<Name>``."""
        return self.nnunet_raw / self.dataset_name

    @property
    def preprocessed_dataset_folder(self) -> Path:
        """``<nnunet_preprocessed>/Dataset<ID>_<Name>``."""
        return self.nnunet_preprocessed / self.dataset_name

    @property
    def images_ts(self) -> Path:
        """Folder of the held-out test images (``CASE_0000<ending>``)."""
        return self.raw_dataset_folder / "imagesTs"

    @property
    def labels_ts(self) -> Path:
        """Folder of the held-out test labels (``CASE<ending>``)."""
        return self.raw_dataset_folder / "labelsTs"

    def environ(self) -> dict[str, str]:
        """``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` for nnU-Net commands at this site."""
        return {
            "nnUNet_raw": str(self.nnunet_raw),
            "nnUNet_preprocessed": str(self.nnunet_preprocessed),
            "nnUNet_results": str(self.nnunet_results),
        }


@dataclass(frozen=True)
class DemoDataset:
    """What :func:`make_demo_dataset` made.

    Attributes
    ----------
    root
        The folder everything lives in.
    dataset_id, dataset_name
        nnU-Net's id and ``Dataset<ID>_<Name>`` (the same at every site).
    plans_name, configuration
        Plans identifier (``nnUNetPlans``) and configuration (``2d`` or ``3d_fullres``).
    file_ending
        ``.png`` (2d) or ``.nii.gz`` (3d).
    server
        The server's folders: shared plans in ``nnunet_preprocessed``, the global model in ``nnunet_results``.
    sites
        The sites, ``sites[k].name == f"site-{k}"``.
    """

    root: Path
    dataset_id: int
    dataset_name: str
    plans_name: str
    configuration: str
    file_ending: str
    server: DemoSite
    sites: tuple[DemoSite, ...]

    @property
    def plans_file(self) -> Path:
        """The shared plans, as the server holds them."""
        return self.server.preprocessed_dataset_folder / f"{self.plans_name}.json"

    @property
    def test_cases(self) -> dict[str, tuple[str, ...]]:
        """Held-out test case identifiers per site name."""
        return {site.name: site.test_cases for site in self.sites}

    def run_config(self) -> dict[str, str | bool]:
        """Run-config values (``[tool.flwr.app.config]`` keys) that point a run at this dataset."""
        return {
            "data-root": str(self.root),
            "make-demo": False,
            "dataset": self.dataset_name,
            "configuration": self.configuration,
            "plans": self.plans_name,
        }


def _dataset_json(num_training: int, dims: int) -> dict:
    return {
        "channel_names": {"0": "MRI"},
        "labels": dict(LABELS),
        "numTraining": num_training,
        "file_ending": ".png" if dims == 2 else ".nii.gz",
        "name": "flwr-nnunet synthetic multi-site demo",
    }


def _site(root: Path, name: str, dataset_name: str, training=(), validation=(), test=()) -> DemoSite:
    return DemoSite(
        name=name,
        dataset_name=dataset_name,
        nnunet_raw=root / name / "nnUNet_raw",
        nnunet_preprocessed=root / name / "nnUNet_preprocessed",
        nnunet_results=root / name / "nnUNet_results",
        training_cases=tuple(training),
        validation_cases=tuple(validation),
        test_cases=tuple(test),
    )


def _write_site_raw(
    site: DemoSite, style: SiteStyle, index: int, dims: int, shape: tuple[int, ...], seed: int
) -> DemoSite:
    rng = np.random.default_rng([seed, index])
    folder = site.raw_dataset_folder
    training = [f"site{index}_{i:03d}" for i in range(style.num_training)]
    test = [f"site{index}_test_{i:03d}" for i in range(style.num_test)]
    for case in training:
        write_case(folder, "imagesTr", "labelsTr", case, synthesize_case(rng, style, shape), dims)
    for case in test:
        write_case(folder, "imagesTs", "labelsTs", case, synthesize_case(rng, style, shape), dims)
    (folder / "dataset.json").write_text(json.dumps(_dataset_json(len(training), dims), indent=4))
    num_validation = max(1, len(training) // 4)
    return _site(
        site.nnunet_raw.parent.parent, site.name, site.dataset_name, training, training[-num_validation:], test
    )


def _write_splits(site: DemoSite) -> None:
    train = [c for c in site.training_cases if c not in site.validation_cases]
    splits = [{"train": train, "val": list(site.validation_cases)}]
    (site.preprocessed_dataset_folder / "splits_final.json").write_text(json.dumps(splits, indent=4))


def _parameters(num_sites: int, dims: int, dataset_id: int, name: str, seed: int, size: int, max_features: int):
    return {
        "num_sites": num_sites,
        "dims": dims,
        "dataset_id": dataset_id,
        "name": name,
        "seed": seed,
        "size": size,
        "max_features": max_features,
        "styles": [asdict(s) for s in site_styles(dims)[:num_sites]],
    }


def make_demo_dataset(
    root: str | os.PathLike,
    *,
    num_sites: int = 3,
    dims: int = 2,
    dataset_id: int = 987,
    name: str = "FedDemo",
    seed: int = 0,
    size: int | None = None,
    max_features: int = 32,
    overwrite: bool = False,
) -> DemoDataset:
    """Write the synthetic multi-site dataset, plan it once for all sites and preprocess every site.

    Parameters
    ----------
    root
        Folder to write into (created). If it already holds a demo made with the
        same parameters, that demo is returned as is (nothing is rewritten).
    num_sites
        2 or 3 sites (styles from :data:`SITE_STYLES`, in 3D :data:`SITE_STYLES_3D`).
    dims
        2 (PNG images, configuration ``2d``) or 3 (NIfTI volumes, ``3d_fullres``).
    dataset_id, name
        nnU-Net dataset id and name: the dataset is ``Dataset{id:03d}_{name}`` at every site.
    seed
        Seed of the random images.
    size
        Image edge in voxels (default 64 in 2d, 32 in 3d).
    max_features
        Widest network stage of the shared plans (nnU-Net's widths divided by 4 and capped here), so
        that a CPU trains it in seconds.
    overwrite
        Replace what is under ``root/server``, ``root/site-K`` and ``root/demo.json`` instead of refusing
        (a demo made with other parameters, or other data).

    Returns
    -------
    DemoDataset
        Folders, names and cases; the same object :func:`load_demo_dataset` reads back.

    Raises
    ------
    ValueError
        On unsupported parameters, or if ``root`` holds other data there and ``overwrite`` is False.
    """
    if not 2 <= num_sites <= len(SITE_STYLES):
        raise ValueError(f"num_sites must be between 2 and {len(SITE_STYLES)}, got {num_sites}")
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id must be between 1 and 999, got {dataset_id}")
    root = Path(root).absolute()
    size = size or (64 if dims == 2 else 32)
    parameters = json.loads(json.dumps(_parameters(num_sites, dims, dataset_id, name, seed, size, max_features)))
    manifest = root / _MANIFEST
    ours = [root / name for name in ("server", *(f"site-{k}" for k in range(len(SITE_STYLES))), _MANIFEST)]
    if manifest.is_file() and json.loads(manifest.read_text())["parameters"] == parameters:
        return load_demo_dataset(root)
    present = [path for path in ours if path.exists()]
    if present and not overwrite:
        what = "a demo made with other parameters" if manifest.is_file() else f"{present[0].name} (not a demo)"
        raise ValueError(f"{root} already holds {what}; pick another folder or pass overwrite=True to replace it")
    for path in present:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()

    dataset_name = f"Dataset{dataset_id:03d}_{name}"
    configuration = "2d" if dims == 2 else "3d_fullres"
    shape = (size,) * dims
    styles = site_styles(dims)
    sites = [
        _write_site_raw(_site(root, f"site-{k}", dataset_name), styles[k], k, dims, shape, seed)
        for k in range(num_sites)
    ]
    server = _site(root, "server", dataset_name)
    ending = ".png" if dims == 2 else ".nii.gz"

    surveys = {site.name: site_survey(site.raw_dataset_folder) for site in sites}
    check_consistency(surveys)
    bins = agreed_bins(surveys)
    statistics = [site_statistics(site.raw_dataset_folder, bins, _SAMPLES_PER_CASE) for site in sites]
    fingerprint = merge_site_statistics(statistics, bins)
    dataset_json = _dataset_json(sum(len(s.training_cases) for s in sites), dims)
    reader_writer = surveys[sites[0].name]["reader_writer"]
    plans = plan_from_fingerprint(fingerprint, dataset_json, dataset_name, reader_writer, plans_name=PLANS_NAME)
    plans = shrink_plans(plans, max_features=max_features, width_divisor=4)
    plans["configurations"] = {configuration: plans["configurations"][configuration]}
    install_plans(plans, dataset_json, server.preprocessed_dataset_folder, fingerprint)
    for site in sites:
        site_json = json.loads((site.raw_dataset_folder / "dataset.json").read_text())
        install_plans(plans, site_json, site.preprocessed_dataset_folder, fingerprint)
        preprocess_site(site.raw_dataset_folder, site.preprocessed_dataset_folder, plans, configuration)
        _write_splits(site)
        site.nnunet_results.mkdir(parents=True, exist_ok=True)
    server.nnunet_results.mkdir(parents=True, exist_ok=True)

    description = {
        "dataset_id": dataset_id,
        "dataset_name": dataset_name,
        "plans_name": PLANS_NAME,
        "configuration": configuration,
        "file_ending": ending,
        "sites": [
            {
                "name": s.name,
                "training_cases": list(s.training_cases),
                "validation_cases": list(s.validation_cases),
                "test_cases": list(s.test_cases),
            }
            for s in sites
        ],
    }
    manifest.write_text(json.dumps({"parameters": parameters, "demo": description}, indent=2))
    return load_demo_dataset(root)


def load_demo_dataset(root: str | os.PathLike) -> DemoDataset:
    """The demo :func:`make_demo_dataset` wrote under ``root`` (paths resolved against ``root``).

    Raises
    ------
    FileNotFoundError
        If ``root`` holds no demo (run ``flwr-nnunet demo ROOT`` first).
    """
    root = Path(root).absolute()
    manifest = root / _MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"no demo dataset under {root}: run `flwr-nnunet demo {root}` first")
    data = json.loads(manifest.read_text())["demo"]
    name = data["dataset_name"]
    sites = tuple(
        _site(root, s["name"], name, s["training_cases"], s["validation_cases"], s["test_cases"]) for s in data["sites"]
    )
    return DemoDataset(
        root=root,
        dataset_id=data["dataset_id"],
        dataset_name=name,
        plans_name=data["plans_name"],
        configuration=data["configuration"],
        file_ending=data["file_ending"],
        server=_site(root, "server", name),
        sites=sites,
    )
