"""One set of nnU-Net plans for every site of a federation.

nnU-Net plans an experiment from a *dataset fingerprint* (spacings, shapes and
foreground intensity statistics of the training cases). Sites never pool their
images; each computes its own fingerprint, the fingerprints are merged into one,
and nnU-Net's own experiment planner turns the merged fingerprint into the plans
every site preprocesses its data with. Identical plans at every site are what
make the sites' networks (and so their weights) identical in shape.

Everything here runs in-process and sequentially (no worker pools), which is
what a handful of small cases needs; for big datasets run nnU-Net's
``nnUNetv2_extract_fingerprint`` / ``nnUNetv2_preprocess`` at each site instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "PLANNERS",
    "fingerprint_site",
    "install_plans",
    "merge_fingerprints",
    "nnunet_environment",
    "plan_experiment",
    "plan_from_fingerprint",
    "planner_preset",
    "preprocess_site",
    "shrink_plans",
]

_PERCENTILES = (0.5, 50.0, 99.5)

PLANNERS: dict[str, tuple[str, str]] = {
    "default": ("ExperimentPlanner", "nnUNetPlans"),
    "resenc-m": ("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans"),
    "resenc-l": ("nnUNetPlannerResEncL", "nnUNetResEncUNetLPlans"),
    "resenc-xl": ("nnUNetPlannerResEncXL", "nnUNetResEncUNetXLPlans"),
}
"""Run-config ``planner`` -> (nnU-Net experiment planner class, its own plans identifier)."""


@contextlib.contextmanager
def nnunet_environment(
    raw: str | os.PathLike | None = None,
    preprocessed: str | os.PathLike | None = None,
    results: str | os.PathLike | None = None,
) -> Iterator[None]:
    """Point nnU-Net's ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` at folders for a block.

    nnU-Net 2.8 reads these variables when it uses them, so setting them around
    a call is enough; the previous values come back afterwards. ``None`` leaves
    a variable as it is.
    """
    wanted = {"nnUNet_raw": raw, "nnUNet_preprocessed": preprocessed, "nnUNet_results": results}
    previous = {name: os.environ.get(name) for name in wanted}
    try:
        for name, value in wanted.items():
            if value is not None:
                os.environ[name] = os.fspath(value)
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _training_cases(raw_dataset_folder: Path) -> tuple[dict, dict]:
    from flwr_nnunet.nnunet.fingerprint import training_cases

    return training_cases(Path(raw_dataset_folder))


def fingerprint_site(raw_dataset_folder: str | os.PathLike, *, samples_per_case: int = 10000) -> dict:
    """nnU-Net's dataset fingerprint of one site's raw dataset, computed in this process.

    Parameters
    ----------
    raw_dataset_folder
        ``<nnUNet_raw>/Dataset<ID>_<Name>`` of the site (``dataset.json``, ``imagesTr``, ``labelsTr``).
    samples_per_case
        Foreground voxels sampled per case for the intensity statistics.

    Returns
    -------
    dict
        The fields of nnU-Net's ``dataset_fingerprint.json`` (spacings, shapes
        after cropping, foreground intensity properties per channel, median
        relative size after cropping).
    """
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    dataset_json, cases = _training_cases(Path(raw_dataset_folder))
    if not cases:
        raise FileNotFoundError(f"{raw_dataset_folder} has no training cases (imagesTr / labelsTr)")
    reader_writer = determine_reader_writer_from_dataset_json(dataset_json, next(iter(cases.values()))["images"][0])
    results = [
        DatasetFingerprintExtractor.analyze_case(case["images"], case["label"], reader_writer, samples_per_case)
        for case in cases.values()
    ]
    statistics = {}
    for channel in range(len(dataset_json["channel_names"])):
        values = np.concatenate([np.asarray(result[2][channel], dtype=np.float64) for result in results])
        low, median, high = np.percentile(values, _PERCENTILES)
        statistics[str(channel)] = {
            "mean": float(values.mean()),
            "median": float(median),
            "std": float(values.std()),
            "min": float(values.min()),
            "max": float(values.max()),
            "percentile_99_5": float(high),
            "percentile_00_5": float(low),
        }
    return {
        "spacings": [[float(s) for s in result[1]] for result in results],
        "shapes_after_crop": [[int(s) for s in result[0]] for result in results],
        "foreground_intensity_properties_per_channel": statistics,
        "median_relative_size_after_cropping": float(np.median([result[4] for result in results])),
    }


def merge_fingerprints(fingerprints: Sequence[dict]) -> dict:
    """One fingerprint for a federation, from the sites' own fingerprints (no images leave a site).

    Spacings and shapes are concatenated (they are per case). Intensity mean and
    standard deviation are pooled exactly, weighting each site by its case count
    (``var = sum w (sigma^2 + (mu - mu_bar)^2)``); min and max are exact; median
    and the 0.5 / 99.5 percentiles are case-weighted means of the sites' values
    (an approximation: exact percentiles would need the pooled voxels).

    Raises
    ------
    ValueError
        If no fingerprints are given or their channels differ.
    """
    if not fingerprints:
        raise ValueError("no fingerprints to merge")
    channels = [set(f["foreground_intensity_properties_per_channel"]) for f in fingerprints]
    if any(c != channels[0] for c in channels):
        raise ValueError(f"the sites' fingerprints have different channels: {[sorted(c) for c in channels]}")
    weights = np.array([len(f["spacings"]) for f in fingerprints], dtype=np.float64)
    weights /= weights.sum()
    statistics = {}
    for channel in sorted(channels[0], key=int):
        site = [f["foreground_intensity_properties_per_channel"][channel] for f in fingerprints]
        mean = float(sum(w * s["mean"] for w, s in zip(weights, site)))
        variance = sum(w * (s["std"] ** 2 + (s["mean"] - mean) ** 2) for w, s in zip(weights, site))
        statistics[channel] = {
            "mean": mean,
            "median": float(sum(w * s["median"] for w, s in zip(weights, site))),
            "std": float(np.sqrt(variance)),
            "min": min(s["min"] for s in site),
            "max": max(s["max"] for s in site),
            "percentile_99_5": float(sum(w * s["percentile_99_5"] for w, s in zip(weights, site))),
            "percentile_00_5": float(sum(w * s["percentile_00_5"] for w, s in zip(weights, site))),
        }
    return {
        "spacings": [s for f in fingerprints for s in f["spacings"]],
        "shapes_after_crop": [s for f in fingerprints for s in f["shapes_after_crop"]],
        "foreground_intensity_properties_per_channel": statistics,
        "median_relative_size_after_cropping": float(
            sum(w * f["median_relative_size_after_cropping"] for w, f in zip(weights, fingerprints))
        ),
    }


def plan_experiment(
    nnunet_raw: str | os.PathLike,
    nnunet_preprocessed: str | os.PathLike,
    dataset_name: str,
    fingerprint: dict,
    *,
    planner: str = "ExperimentPlanner",
    plans_name: str = "nnUNetPlans",
) -> dict:
    """Plans from a (merged) fingerprint, with nnU-Net's own experiment planner.

    Parameters
    ----------
    nnunet_raw, nnunet_preprocessed
        Roots holding ``Dataset<ID>_<Name>``: the raw folder needs ``dataset.json``
        (its ``numTraining`` should be the federation's total) and at least one
        training case (nnU-Net reads it to pick the image reader).
    dataset_name
        ``Dataset<ID>_<Name>`` of the roots given: the federation's name, written into the plans.
    fingerprint
        Written as ``dataset_fingerprint.json`` in the preprocessed folder first.
    planner
        Name of an nnU-Net experiment planner class (e.g. ``nnUNetPlannerResEncM``).
    plans_name
        Plans identifier (file ``<plans_name>.json``).

    Returns
    -------
    dict
        The plans, also saved as ``<nnunet_preprocessed>/<dataset_name>/<plans_name>.json``.
    """
    import nnunetv2
    from batchgenerators.utilities.file_and_folder_operations import join
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    folder = Path(nnunet_preprocessed) / dataset_name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset_fingerprint.json").write_text(json.dumps(fingerprint, indent=1))
    shutil.copyfile(Path(nnunet_raw) / dataset_name / "dataset.json", folder / "dataset.json")
    planner_class = recursive_find_python_class(
        join(nnunetv2.__path__[0], "experiment_planning"), planner, current_module="nnunetv2.experiment_planning"
    )
    if planner_class is None:
        raise ValueError(f"nnU-Net has no experiment planner named {planner!r}")
    with nnunet_environment(nnunet_raw, nnunet_preprocessed), contextlib.redirect_stdout(open(os.devnull, "w")):
        planner_instance = planner_class(dataset_name, plans_name=plans_name)
        planner_instance.plan_experiment()
    return json.loads((folder / f"{plans_name}.json").read_text())


def planner_preset(name: str) -> tuple[str, str]:
    """The nnU-Net planner class and plans identifier of a :data:`PLANNERS` preset.

    Raises
    ------
    ValueError
        For an unknown preset, naming the known ones.
    """
    key = str(name).strip().lower()
    if key not in PLANNERS:
        raise ValueError(f"unknown planner {name!r}: use one of {', '.join(PLANNERS)}")
    return PLANNERS[key]


def _planner_class(planner: str) -> type:
    import nnunetv2
    from batchgenerators.utilities.file_and_folder_operations import join
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    found = recursive_find_python_class(
        join(nnunetv2.__path__[0], "experiment_planning"), planner, current_module="nnunetv2.experiment_planning"
    )
    if found is None:
        raise ValueError(f"nnU-Net has no experiment planner named {planner!r}")
    return found


def plan_from_fingerprint(
    fingerprint: dict,
    dataset_json: dict,
    dataset_name: str,
    reader_writer: str,
    *,
    planner: str = "ExperimentPlanner",
    plans_name: str = "nnUNetPlans",
    workdir: str | os.PathLike | None = None,
    gpu_memory_target_in_gb: float | None = None,
) -> dict:
    """Plans from a (merged) fingerprint with nnU-Net's own experiment planner, without any image.

    nnU-Net's planner opens a training image only to pick the image
    reader/writer (``determine_reader_writer``); here the class the sites
    report is supplied instead, and the planner is run against a scratch
    ``nnUNet_raw`` holding just ``dataset.json`` (and an empty ``imagesTr``).

    Parameters
    ----------
    fingerprint
        ``dataset_fingerprint.json`` content (e.g. from :func:`~flwr_nnunet.nnunet.fingerprint.merge_site_statistics`).
    dataset_json
        The federation's ``dataset.json`` (``numTraining``: the federation's total).
    dataset_name
        ``Dataset<ID>_<Name>`` written into the plans.
    reader_writer
        Name of the nnU-Net reader/writer class the sites use (e.g. ``NaturalImage2DIO``).
    planner, plans_name
        nnU-Net planner class and plans identifier (see :data:`PLANNERS`).
    workdir
        Scratch folder (a temporary one, removed afterwards, by default).
    gpu_memory_target_in_gb
        The GPU memory the plans are made for (None: the planner's own target, 8 GB for nnU-Net's default
        planner): a smaller one gives a smaller patch and, where the patch loses a pooling, one stage less.

    Returns
    -------
    dict
        The plans.
    """
    import tempfile

    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name

    reader_writer_class = recursive_find_reader_writer_by_name(reader_writer)
    base = _planner_class(planner)
    fixed = type(base.__name__, (base,), {"determine_reader_writer": lambda self: reader_writer_class})
    with contextlib.ExitStack() as stack:
        root = Path(workdir) if workdir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        raw, preprocessed = root / "nnUNet_raw", root / "nnUNet_preprocessed"
        (raw / dataset_name / "imagesTr").mkdir(parents=True, exist_ok=True)
        (raw / dataset_name / "dataset.json").write_text(json.dumps(dataset_json, indent=4))
        (preprocessed / dataset_name).mkdir(parents=True, exist_ok=True)
        (preprocessed / dataset_name / "dataset_fingerprint.json").write_text(json.dumps(fingerprint, indent=1))
        with nnunet_environment(raw, preprocessed), contextlib.redirect_stdout(open(os.devnull, "w")):
            memory = {} if gpu_memory_target_in_gb is None else {"gpu_memory_target_in_gb": gpu_memory_target_in_gb}
            fixed(dataset_name, plans_name=plans_name, **memory).plan_experiment()
        return json.loads((preprocessed / dataset_name / f"{plans_name}.json").read_text())


def shrink_plans(plans: dict, *, max_features: int, width_divisor: int = 1, batch_size: int | None = None) -> dict:
    """A copy of ``plans`` whose networks are narrower: each stage's width divided, then capped.

    For demos and tests on a CPU: the architecture keeps nnU-Net's stages,
    kernels and strides; only the widths (``max(1, w // width_divisor)``, at most
    ``max_features``) and, when given, the batch size change.
    """
    plans = json.loads(json.dumps(plans))
    for configuration in plans["configurations"].values():
        arch = configuration.get("architecture")
        if arch is not None:
            widths = arch["arch_kwargs"]["features_per_stage"]
            arch["arch_kwargs"]["features_per_stage"] = [
                min(max(1, int(w) // width_divisor), max_features) for w in widths
            ]
        if batch_size is not None and "batch_size" in configuration:
            configuration["batch_size"] = batch_size
    return plans


def install_plans(
    plans: dict, dataset_json: dict, preprocessed_dataset_folder: str | os.PathLike, fingerprint: dict | None = None
) -> Path:
    """Put the federation's plans (and ``dataset.json``) into a site's preprocessed dataset folder.

    What ``nnUNetv2_move_plans_between_datasets`` does for one site: the plans
    are written with ``dataset_name`` set to the folder's name, the site's own
    dataset name, by which nnU-Net's trainer finds the site's data
    (:func:`~flwr_nnunet.nnunet.digests.plans_sha256` leaves it out, so the
    digest stays the federation's). Returns the plans file.
    """
    folder = Path(preprocessed_dataset_folder)
    folder.mkdir(parents=True, exist_ok=True)
    plans_file = folder / f"{plans['plans_name']}.json"
    plans_file.write_text(json.dumps({**plans, "dataset_name": folder.name}, indent=4))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=4))
    if fingerprint is not None:
        (folder / "dataset_fingerprint.json").write_text(json.dumps(fingerprint, indent=1))
    return plans_file


def preprocess_site(
    raw_dataset_folder: str | os.PathLike,
    preprocessed_dataset_folder: str | os.PathLike,
    plans: dict,
    configuration: str,
) -> list[str]:
    """Preprocess a site's training cases with the shared plans, in this process.

    Writes ``<preprocessed>/<plans data identifier>/`` and ``gt_segmentations/``
    as ``nnUNetv2_preprocess`` does. Returns the case identifiers.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    raw, preprocessed = Path(raw_dataset_folder), Path(preprocessed_dataset_folder)
    dataset_json, cases = _training_cases(raw)
    plans_manager = PlansManager(json.loads(json.dumps(plans)))
    configuration_manager = plans_manager.get_configuration(configuration)
    output = preprocessed / configuration_manager.data_identifier
    if output.is_dir():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    ground_truth = preprocessed / "gt_segmentations"
    ground_truth.mkdir(exist_ok=True)
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    for identifier, case in cases.items():
        preprocessor.run_case_save(
            str(output / identifier), case["images"], case["label"], plans_manager, configuration_manager, dataset_json
        )
        shutil.copyfile(case["label"], ground_truth / f"{identifier}{dataset_json['file_ending']}")
    return list(cases)
