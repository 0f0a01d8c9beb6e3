"""A synthetic multi-site segmentation dataset, ready for nnU-Net and for ``flwr run .``.

Each site ("hospital") images the same kind of object with its own scanner:
different intensity scale and offset, noise, contrast and object sizes, and a
different number of cases. Label 1 is an ellipse ("organ"), label 2 a small
disc inside it ("lesion"). :func:`make_demo_dataset` writes, under one root,
what hospitals would hold::

    site-K/nnUNet_raw/Dataset<ID>_<Name>/          imagesTr, labelsTr, imagesTs, labelsTs, dataset.json
    site-K/nnUNet_preprocessed/Dataset<ID>_<Name>/ splits_final.json (the site's fold-0 validation cases)
    site-K/nnUNet_results/                      the site's own trainer output and round state
    server/nnUNet_results/                      the global model goes here
    demo.json                                   what was made (read back by :func:`load_demo_dataset`)

and, with ``planned=True``, plans it as a run's planning phase does (the same
stages, :func:`flwr_nnunet.apps.planning_phase.plan_with_sites`, the sites'
answers computed in this process) with :data:`DEMO_PLANNING`::

    server/nnUNet_preprocessed/Dataset<ID>_<Name>/ shared plans, merged fingerprint, dataset.json
    site-K/nnUNet_preprocessed/Dataset<ID>_<Name>/ the shared plans, preprocessed cases

``flwr run .`` with ``make-demo=true`` makes it unplanned and plans it in the
run (run-config ``planning='federated'``), with the same options: the plans
are byte-identical either way. Every site uses the same dataset id and name.

Held-out evaluation and local-only baselines: :mod:`flwr_nnunet.demo.heldout`.
Command line: ``flwr-nnunet demo ROOT [--sites N] [--3d] [--seed S]`` (planned).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from flwr_nnunet.apps.planning_phase import PlanningOptions
from flwr_nnunet.demo.synthesis import SITE_STYLES, SITE_STYLES_3D, SiteStyle, site_styles, synthesize_case, write_case

__all__ = [
    "DEMO_PLANNING",
    "SITE_STYLES",
    "SITE_STYLES_3D",
    "DemoDataset",
    "DemoSite",
    "SiteStyle",
    "load_demo_dataset",
    "make_demo_dataset",
    "plan_demo",
    "synthesize_case",
]

PLANS_NAME = "nnUNetPlans"
LABELS = {"background": 0, "organ": 1, "lesion": 2}
_MANIFEST = "demo.json"

DEMO_PLANNING = PlanningOptions(max_features=32, width_divisor=4, only_configuration=True, samples_per_case=10000)
"""The demo's plans: nnU-Net's widths divided by 4 and capped at 32 (a CPU trains them in seconds), only the
demo's configuration, 10000 foreground samples per case (its MRI channel's z-score does not use them)."""


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
        Identifiers of the training cases and the fold-0 validation split (``splits_final.json``).
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
        The server's folders: shared plans in ``nnunet_preprocessed`` (once planned), the global model in
        ``nnunet_results``.
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
        """Run-config values (``[tool.flwr.app.config]`` keys) that point a run at this planned dataset's plans."""
        return {
            "data-root": str(self.root),
            "make-demo": False,
            "dataset": self.dataset_name,
            "configuration": self.configuration,
            "plans": self.plans_name,
            "planning": "fixed",
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
    site.preprocessed_dataset_folder.mkdir(parents=True, exist_ok=True)
    (site.preprocessed_dataset_folder / "splits_final.json").write_text(json.dumps(splits, indent=4))


def _parameters(num_sites: int, dims: int, dataset_id: int, name: str, seed: int, size: int):
    return {
        "num_sites": num_sites,
        "dims": dims,
        "dataset_id": dataset_id,
        "name": name,
        "seed": seed,
        "size": size,
        "max_features": DEMO_PLANNING.max_features,
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
    overwrite: bool = False,
    planned: bool = True,
) -> DemoDataset:
    """Write the synthetic multi-site dataset; with ``planned``, plan it once for all sites and preprocess each.

    Parameters
    ----------
    root
        Folder to write into (created). If it already holds a demo made with the
        same parameters, that demo is returned as is (nothing is rewritten; with
        ``planned`` it is planned if it is not yet).
    num_sites
        2 to 4 sites in 2D (styles from :data:`SITE_STYLES`), 2 or 3 in 3D (:data:`SITE_STYLES_3D`).
    dims
        2 (PNG images, configuration ``2d``) or 3 (NIfTI volumes, ``3d_fullres``).
    dataset_id, name
        nnU-Net dataset id and name: the dataset is ``Dataset{id:03d}_{name}`` at every site.
    seed
        Seed of the random images.
    size
        Image edge in voxels (default 64 in 2d, 32 in 3d).
    overwrite
        Replace what is under ``root/server``, ``root/site-K`` and ``root/demo.json`` instead of refusing
        (a demo made with other parameters, or other data).
    planned
        Also plan and preprocess (:func:`plan_demo`) unless already planned; False: only what hospitals hold
        (raw data and splits), as ``flwr run .`` with ``make-demo=true`` makes it before planning in the run.

    Returns
    -------
    DemoDataset
        Folders, names and cases; the same object :func:`load_demo_dataset` reads back.

    Raises
    ------
    ValueError
        On unsupported parameters, or if ``root`` holds other data there and ``overwrite`` is False.
    """
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    if not 2 <= num_sites <= len(site_styles(dims)):
        raise ValueError(f"num_sites must be between 2 and {len(site_styles(dims))} in {dims}D, got {num_sites}")
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id must be between 1 and 999, got {dataset_id}")
    root = Path(root).absolute()
    size = size or (64 if dims == 2 else 32)
    parameters = json.loads(json.dumps(_parameters(num_sites, dims, dataset_id, name, seed, size)))
    manifest = root / _MANIFEST
    ours = [root / name for name in ("server", *(f"site-{k}" for k in range(len(SITE_STYLES))), _MANIFEST)]
    if manifest.is_file() and json.loads(manifest.read_text())["parameters"] == parameters:
        demo = load_demo_dataset(root)
        return plan_demo(demo) if planned and not demo.plans_file.is_file() else demo
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
    for site in sites:
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
    demo = load_demo_dataset(root)
    return plan_demo(demo) if planned else demo


def plan_demo(demo: DemoDataset) -> DemoDataset:
    """Plan ``demo`` as a run's planning phase does, in this process, and preprocess every site; return it.

    The stages of :func:`~flwr_nnunet.apps.planning_phase.plan_with_sites` with :data:`DEMO_PLANNING`, each
    site answering with :func:`~flwr_nnunet.apps.site_planning.answer_planning` on its own folders; a site
    already preprocessed with the same plans is left as it is.
    """
    from flwr_nnunet.apps.planning_phase import plan_with_sites
    from flwr_nnunet.apps.run_config import RunSettings
    from flwr_nnunet.apps.site_planning import answer_planning

    def ask(stage: str, config: dict) -> dict[str, tuple[str, dict]]:
        query = {"planning-stage": stage, **config}
        return {
            site.name: (site.name, answer_planning(query, site.raw_dataset_folder, site.preprocessed_dataset_folder)[1])
            for site in demo.sites
        }

    settings = RunSettings.from_run_config(
        {"data-root": str(demo.root), "dataset": demo.dataset_name, "configuration": demo.configuration}
    )
    plan_with_sites(ask, settings, DEMO_PLANNING)
    return demo


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
