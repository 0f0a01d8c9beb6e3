"""A federation's dataset fingerprint from the sites' aggregate statistics (no image leaves a site).

Federated planning asks every site twice:

1. :func:`site_survey`: what the site's ``dataset.json`` says (channel names,
   labels or regions, file ending), its number of training cases, the image
   reader/writer nnU-Net picks for its files, per channel the foreground
   min and max, and its voxels per label value. :func:`check_consistency`
   stops a federation whose sites disagree; :func:`agreed_bins` and
   :func:`samples_per_case` follow from the surveys, and
   :func:`~flwr_nnunet.nnunet.label_convention.label_convention_warnings`
   names a site whose label volumes contradict the others'.
2. :func:`site_statistics`: with the agreed bins and sample count, nnU-Net's
   own per-case analysis (``DatasetFingerprintExtractor.analyze_case``: reader,
   cropping to the nonzero region, seeded foreground sampling) reduced to
   per-case shapes after cropping, spacings and relative sizes, and per channel
   :func:`~flwr_nnunet.nnunet.intensity.channel_statistics`.

:func:`merge_site_statistics` turns the sites' statistics into the
``dataset_fingerprint.json`` nnU-Net's extractor would write for the pooled
dataset: shapes and spacings concatenated, mean and std exact, min and max
exact, median and percentiles within one histogram bin. What a site sends is
listed in :data:`SURVEY_FIELDS` and :data:`STATISTICS_FIELDS`; none of it is
per voxel, and its size is bounded by the number of cases and of bins.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from flwr_nnunet.errors import FlwrNnUNetError
from flwr_nnunet.nnunet.intensity import (
    DEFAULT_NUM_BINS,
    channel_statistics,
    combine_channel_statistics,
    histogram_bins,
    merge_channel_statistics,
)
from flwr_nnunet.nnunet.label_sets import UNANNOTATED_DRAWN_AS

__all__ = [
    "AGREED_FIELDS",
    "NNUNET_FOREGROUND_SAMPLES",
    "STATISTICS_FIELDS",
    "SURVEY_FIELDS",
    "FederationMismatchError",
    "agreed_bins",
    "check_consistency",
    "federation_dataset_json",
    "merge_site_statistics",
    "samples_per_case",
    "site_statistics",
    "site_survey",
    "training_cases",
]

NNUNET_FOREGROUND_SAMPLES = 10e7
"""Foreground voxels nnU-Net's extractor samples over the whole dataset (``num_foreground_voxels_for_intensitystats``)."""

AGREED_FIELDS = ("channel_names", "labels", "regions_class_order", "file_ending", "reader_writer")
"""Survey fields every site must report identically (a mismatch stops planning)."""

SURVEY_FIELDS = (*AGREED_FIELDS, "num_cases", "foreground_range", "label_voxels", UNANNOTATED_DRAWN_AS)
"""Everything :func:`site_survey` returns."""

STATISTICS_FIELDS = ("num_cases", "shapes_after_crop", "spacings", "relative_sizes_after_crop", "intensities")
"""Everything :func:`site_statistics` returns (``intensities``: one channel_statistics dict per channel)."""


class FederationMismatchError(FlwrNnUNetError, ValueError):
    """The sites' datasets cannot be planned together: a field of ``dataset.json`` (or the reader) differs.

    ``mismatches`` maps each differing field to ``{site name: its value}``.
    """

    def __init__(self, message: str, mismatches: Mapping[str, Mapping[str, object]]) -> None:
        super().__init__(message)
        self.mismatches = {field: dict(values) for field, values in mismatches.items()}


def training_cases(raw_dataset_folder: Path) -> tuple[dict, dict]:
    """A raw dataset's ``dataset.json`` and its training cases (nnU-Net's ``{id: {"images", "label"}}``).

    The same cases as nnU-Net's ``get_filenames_of_train_images_and_targets``, found without its worker pool
    (a forked pool deadlocks inside a multi-threaded process such as a Ray actor of Flower's simulation).
    """
    from nnunetv2.utilities.utils import (
        create_paths_fn,
        get_filenames_of_train_images_and_targets,
        get_identifiers_from_splitted_dataset_folder,
    )

    path = raw_dataset_folder / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: each site needs its training data in nnU-Net's raw format "
            "(<nnUNet_raw>/Dataset<ID>_<Name>/dataset.json, imagesTr/, labelsTr/)"
        )
    dataset_json = json.loads(path.read_text())
    if "dataset" in dataset_json:  # explicit file lists: nnU-Net's own code, no pool on this path
        cases = get_filenames_of_train_images_and_targets(str(raw_dataset_folder), dataset_json)
    else:
        images, ending = raw_dataset_folder / "imagesTr", dataset_json["file_ending"]
        files = sorted(p.name for p in images.iterdir() if p.name.endswith(ending)) if images.is_dir() else []
        identifiers = get_identifiers_from_splitted_dataset_folder(str(images), ending) if files else []
        cases = {
            str(i): {
                "images": create_paths_fn(str(images), files, ending, i),
                "label": str(raw_dataset_folder / "labelsTr" / f"{i}{ending}"),
            }
            for i in identifiers
        }
    if not cases:
        raise FileNotFoundError(f"{raw_dataset_folder} has no training cases in imagesTr/labelsTr")
    return dataset_json, cases


def _reader_writer(dataset_json: dict, cases: dict) -> type:
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    return determine_reader_writer_from_dataset_json(dataset_json, next(iter(cases.values()))["images"][0])


def _cropped(case: Mapping, reader_writer: type) -> tuple[np.ndarray, np.ndarray, Counter]:
    """A case's images and foreground mask cropped as nnU-Net crops them, and its voxels per segmentation value."""
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    rw = reader_writer()
    images, _ = rw.read_images(case["images"])
    segmentation, _ = rw.read_seg(case["label"])
    voxels = Counter()
    # counted before crop_to_nonzero, which writes -1 (outside the nonzero region) into the segmentation in place
    for value, count in zip(*np.unique(segmentation, return_counts=True)):
        voxels[int(value)] += int(count)
    data, seg, _ = crop_to_nonzero(images, segmentation)
    return data, seg[0] > 0, voxels


def _label_values(labels: Mapping) -> set[int]:
    """The values ``dataset.json``'s ``labels`` name (for regions, the values each region is made of)."""
    return {int(v) for value in labels.values() for v in (value if isinstance(value, (list, tuple)) else [value])}


def _jsonable(value):
    return json.loads(json.dumps(value))


def site_survey(raw_dataset_folder: str | os.PathLike) -> dict:
    """What the federation must know of a site before it can agree on bins: see :data:`SURVEY_FIELDS`.

    ``foreground_range`` is ``[min, max]`` per channel over every foreground
    voxel after nnU-Net's cropping (``None`` for a channel without foreground),
    a superset of what :func:`site_statistics` samples. ``label_voxels`` maps
    every label value (as a string) that ``dataset.json``'s ``labels`` name
    or a training segmentation holds to its number of voxels over all
    training cases (0 where the site has none).

    Raises
    ------
    FileNotFoundError
        If the folder has no ``dataset.json`` or no training case.
    """
    dataset_json, cases = training_cases(Path(raw_dataset_folder))
    reader_writer = _reader_writer(dataset_json, cases)
    num_channels = len(dataset_json["channel_names"])
    low, high = [np.inf] * num_channels, [-np.inf] * num_channels
    voxels = Counter(dict.fromkeys(_label_values(dataset_json["labels"]), 0))
    for case in cases.values():
        data, foreground, case_voxels = _cropped(case, reader_writer)
        voxels.update(case_voxels)
        for channel in range(num_channels):
            values = data[channel][foreground]
            if values.size:
                low[channel] = min(low[channel], float(values.min()))
                high[channel] = max(high[channel], float(values.max()))
    return {
        "channel_names": _jsonable(dataset_json["channel_names"]),
        "labels": _jsonable(dataset_json["labels"]),
        "regions_class_order": _jsonable(dataset_json.get("regions_class_order")),
        "file_ending": dataset_json["file_ending"],
        "reader_writer": reader_writer.__name__,
        "num_cases": len(cases),
        "foreground_range": [[lo, hi] if np.isfinite(lo) else None for lo, hi in zip(low, high)],
        "label_voxels": {str(value): int(voxels[value]) for value in sorted(voxels)},
        UNANNOTATED_DRAWN_AS: _jsonable(dataset_json.get(UNANNOTATED_DRAWN_AS) or {}),
    }


def check_consistency(surveys: Mapping[str, Mapping], labels: Mapping[str, int] | None = None) -> None:
    """Every site must report the same :data:`AGREED_FIELDS`; stop before planning otherwise. With the
    federation's declared ``labels`` (run-config ``labels``) a site's labels may be a subset of them
    (:func:`~flwr_nnunet.nnunet.label_sets.partial_label_shares`, which the caller checks).

    Raises
    ------
    FederationMismatchError
        Naming each differing field and every site's value (``{site: value}``).
    """
    if not surveys:
        raise ValueError("no site answered the planning survey")
    mismatches = {}
    for field in AGREED_FIELDS:
        values = {site: survey.get(field) for site, survey in surveys.items()}
        if field == "labels" and labels is not None:
            continue  # declared partial labels: checked by partial_label_shares
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            mismatches[field] = values
    if mismatches:
        details = "; ".join(
            f"{field}: "
            + ", ".join(f"{site} has {json.dumps(value, sort_keys=True)}" for site, value in values.items())
            for field, values in mismatches.items()
        )
        raise FederationMismatchError(
            f"the sites' datasets differ, so they cannot share one set of plans ({details}); make every site's "
            "dataset.json agree on channel_names, labels, regions_class_order and file_ending before the run",
            mismatches,
        )


def agreed_bins(surveys: Mapping[str, Mapping], num_bins: int = DEFAULT_NUM_BINS) -> list[dict]:
    """Per channel, :func:`~flwr_nnunet.nnunet.intensity.histogram_bins` over the federation's foreground range.

    Raises
    ------
    ValueError
        If no site has foreground in some channel.
    """
    num_channels = len(next(iter(surveys.values()))["channel_names"])
    bins = []
    for channel in range(num_channels):
        ranges = [s["foreground_range"][channel] for s in surveys.values() if s["foreground_range"][channel]]
        if not ranges:
            raise ValueError(f"no site has foreground voxels in channel {channel}: check the labels (labelsTr)")
        bins.append(histogram_bins(min(r[0] for r in ranges), max(r[1] for r in ranges), num_bins))
    return bins


def samples_per_case(total_cases: int, total_samples: float = NNUNET_FOREGROUND_SAMPLES) -> int:
    """Foreground samples per case, nnU-Net's rule: ``int(total_samples // total_cases)`` over the federation."""
    return int(total_samples // max(1, int(total_cases)))


def site_statistics(raw_dataset_folder: str | os.PathLike, bins: Sequence[Mapping], num_samples: int) -> dict:
    """A site's share of the federation's fingerprint (see :data:`STATISTICS_FIELDS`), with nnU-Net's own code.

    Each case goes through ``DatasetFingerprintExtractor.analyze_case`` (the
    site's reader/writer, cropping, ``num_samples`` foreground samples drawn
    with nnU-Net's fixed seed), so the samples are exactly those nnU-Net's
    extractor would draw from the pooled dataset with the same per-case count.
    Only their statistics are kept.
    """
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    dataset_json, cases = training_cases(Path(raw_dataset_folder))
    reader_writer = _reader_writer(dataset_json, cases)
    num_channels = len(dataset_json["channel_names"])
    if len(bins) != num_channels:
        raise ValueError(f"{len(bins)} channel bins given for a dataset of {num_channels} channels")
    shapes, spacings, sizes = [], [], []
    intensities = [channel_statistics([], channel_bins) for channel_bins in bins]
    for case in cases.values():
        shape, spacing, foreground, _, relative = DatasetFingerprintExtractor.analyze_case(
            case["images"], case["label"], reader_writer, int(num_samples)
        )
        shapes.append([int(s) for s in shape])
        spacings.append([float(s) for s in spacing])
        sizes.append(float(relative))
        for channel in range(num_channels):  # one case's samples at a time: memory does not grow with cases
            case_statistics = channel_statistics([np.asarray(foreground[channel])], bins[channel])
            intensities[channel] = combine_channel_statistics([intensities[channel], case_statistics])
    return {
        "num_cases": len(cases),
        "shapes_after_crop": shapes,
        "spacings": spacings,
        "relative_sizes_after_crop": sizes,
        "intensities": intensities,
    }


def merge_site_statistics(statistics: Sequence[Mapping], bins: Sequence[Mapping]) -> dict:
    """The federation's ``dataset_fingerprint.json`` from every site's :func:`site_statistics`.

    Equal to what nnU-Net's extractor writes for the pooled dataset (same
    per-case samples): spacings and shapes after cropping concatenated in site
    order, median relative size over all cases, and per channel
    :func:`~flwr_nnunet.nnunet.intensity.merge_channel_statistics`.
    """
    if not statistics:
        raise ValueError("no site statistics to merge")
    per_channel = {
        str(channel): merge_channel_statistics([s["intensities"][channel] for s in statistics], channel_bins)
        for channel, channel_bins in enumerate(bins)
    }
    return {
        "spacings": [list(x) for s in statistics for x in s["spacings"]],
        "shapes_after_crop": [list(x) for s in statistics for x in s["shapes_after_crop"]],
        "foreground_intensity_properties_per_channel": per_channel,
        "median_relative_size_after_cropping": float(
            np.median([x for s in statistics for x in s["relative_sizes_after_crop"]])
        ),
    }


def federation_dataset_json(
    surveys: Mapping[str, Mapping], *, name: str = "", labels: Mapping[str, int] | None = None
) -> dict:
    """The ``dataset.json`` every site trains with: the agreed fields (the declared ``labels`` when given),
    ``numTraining`` the federation's total."""
    first = next(iter(surveys.values()))
    dataset_json = {
        "channel_names": first["channel_names"],
        "labels": dict(labels) if labels is not None else first["labels"],
        "numTraining": sum(int(s["num_cases"]) for s in surveys.values()),
        "file_ending": first["file_ending"],
    }
    if first.get("regions_class_order") is not None:
        dataset_json["regions_class_order"] = first["regions_class_order"]
    if name:
        dataset_json["name"] = name
    return dataset_json
