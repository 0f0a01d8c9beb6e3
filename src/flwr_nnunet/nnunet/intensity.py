"""Foreground intensity statistics that merge exactly across sites: sums and a fixed-bin histogram.

nnU-Net's fingerprint keeps, per input channel, the mean, standard deviation,
min, max, median and 0.5 / 99.5 percentiles of the foreground intensities it
samples from the training cases (CT normalization clips at the percentiles).
A site that shares only these seven numbers cannot be merged exactly: the
federation's percentiles are not a function of the sites' percentiles. What
*does* merge is:

- ``count``, ``sum`` and ``sum_squared_deviations`` (the sum of squares about
  the site's own mean, ``M2``): the pooled mean is ``sum / count`` and the
  pooled variance ``(sum_i M2_i + n_i (mean_i - mean)^2) / N`` (Chan et al.),
  exact up to float64 rounding and free of the cancellation ``sum x^2 - N mean^2``
  suffers for CT values;
- ``min`` and ``max``: exact;
- a histogram with the *same* bins at every site: counts add up, and any
  percentile of the merged histogram lies within one bin width of the pooled
  value (:func:`percentile_from_histogram`).

Bins (:func:`histogram_bins`): :data:`DEFAULT_NUM_BINS` equal bins over the
range every site agrees on first (the merged foreground min and max). One
choice fits every modality because the bins follow the data: CT in Hounsfield
units, ``[-1024, 3071]``, gets 0.25 HU bins (metal at 30000 HU still 2.0 HU);
an MRI range ``[0, 4000]`` about 0.24; 8-bit natural images ``[0, 255]`` about
0.016, far below one grey level. A site's reply holds ``num_bins`` integers per
channel (16384: 128 KiB as int64) whatever the size of its data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "DEFAULT_NUM_BINS",
    "PERCENTILES",
    "channel_statistics",
    "combine_channel_statistics",
    "histogram_bins",
    "merge_channel_statistics",
    "percentile_from_histogram",
]

DEFAULT_NUM_BINS = 16384
"""Bins of every foreground histogram: 0.25 HU over CT's [-1024, 3071]."""

PERCENTILES = (0.5, 50.0, 99.5)
"""The percentiles nnU-Net's fingerprint holds (``percentile_00_5``, ``median``, ``percentile_99_5``)."""


def histogram_bins(low: float, high: float, num_bins: int = DEFAULT_NUM_BINS) -> dict:
    """The bins every site uses for one channel: ``num_bins`` equal bins over ``[low, high]``.

    ``low`` and ``high`` are the federation's foreground min and max (the first
    planning query). A constant channel (``low == high``) gets one bin of width 0.

    Raises
    ------
    ValueError
        If the range is not finite, ``high < low`` or ``num_bins < 1``.
    """
    low, high = float(low), float(high)
    if not (np.isfinite(low) and np.isfinite(high)) or high < low:
        raise ValueError(f"histogram range [{low}, {high}] is not a finite interval; the sites' min/max are wrong")
    if int(num_bins) < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    return {"low": low, "high": high, "num_bins": 1 if high == low else int(num_bins)}


def _counts(values: np.ndarray, bins: Mapping) -> np.ndarray:
    low, high, num_bins = float(bins["low"]), float(bins["high"]), int(bins["num_bins"])
    if high == low:
        return np.array([values.size], dtype=np.int64)
    # Values outside the agreed range (there should be none) fall into the end bins; min/max stay exact.
    counts, _ = np.histogram(np.clip(values, low, high), bins=num_bins, range=(low, high))
    return counts.astype(np.int64)


def channel_statistics(samples: Iterable[np.ndarray], bins: Mapping) -> dict:
    """Mergeable statistics of one channel's foreground intensities at one site.

    Parameters
    ----------
    samples
        The intensities, one array per case (nnU-Net's foreground samples); read once, never kept.
    bins
        :func:`histogram_bins` of the channel, the same at every site.

    Returns
    -------
    dict
        ``count``, ``sum``, ``sum_squared_deviations`` (about this site's mean),
        ``min``, ``max`` (``None`` when there is no foreground) and ``histogram``
        (``num_bins`` integers). Nothing per voxel.
    """
    count, total, m2 = 0, 0.0, 0.0
    low, high = np.inf, -np.inf
    histogram = np.zeros(int(bins["num_bins"]), dtype=np.int64)
    for case in samples:
        values = np.asarray(case, dtype=np.float64).ravel()
        if values.size == 0:
            continue
        n, mean = values.size, float(values.mean())
        case_m2 = float(np.square(values - mean).sum())
        if count:  # Chan's update: exact merge of (count, mean, M2)
            delta = mean - total / count
            m2 += case_m2 + delta * delta * count * n / (count + n)
        else:
            m2 = case_m2
        count += n
        total += float(values.sum())
        low, high = min(low, float(values.min())), max(high, float(values.max()))
        histogram += _counts(values, bins)
    return {
        "count": int(count),
        "sum": total,
        "sum_squared_deviations": m2,
        "min": low if count else None,
        "max": high if count else None,
        "histogram": histogram.tolist(),
    }


def percentile_from_histogram(histogram: Sequence[int], bins: Mapping, q: float, *, low: float, high: float) -> float:
    """numpy's (linear) ``percentile(values, q)`` of the values a histogram counts, within one bin width.

    Each order statistic is placed inside its bin by its rank (uniformly), the
    first and last at the exact ``low`` (min) and ``high`` (max); then numpy's
    linear interpolation between the two order statistics around
    ``(N - 1) q / 100`` is applied. Each placed order statistic is in the bin of
    the true one, so the result differs from the exact percentile by less than
    one bin width.
    """
    counts = np.asarray(histogram, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        raise ValueError("an empty histogram has no percentiles")
    cumulative = np.cumsum(counts)
    num_bins = int(bins["num_bins"])
    width = (float(bins["high"]) - float(bins["low"])) / num_bins

    def order_statistic(rank: int) -> float:
        if rank == 0:
            return float(low)
        if rank == total - 1:
            return float(high)
        b = int(np.searchsorted(cumulative, rank, side="right"))
        within = rank - (int(cumulative[b]) - int(counts[b]))
        value = float(bins["low"]) + (b + (within + 0.5) / int(counts[b])) * width
        return min(max(value, float(low)), float(high))

    position = (total - 1) * float(q) / 100.0
    below = int(np.floor(position))
    fraction = position - below
    value = order_statistic(below)
    if fraction > 0 and below + 1 < total:
        value += fraction * (order_statistic(below + 1) - value)
    return float(value)


def combine_channel_statistics(parts: Sequence[Mapping]) -> dict:
    """One :func:`channel_statistics` dict from several (cases or sites) with the same bins, exactly.

    Counts, sums and histograms add; ``sum_squared_deviations`` combine as
    ``sum_i M2_i + n_i (mean_i - mean)^2``; min and max are the extremes.
    """
    present = [p for p in parts if int(p["count"]) > 0]
    if not present:
        empty = [0] * (len(parts[0]["histogram"]) if parts else 0)
        return {"count": 0, "sum": 0.0, "sum_squared_deviations": 0.0, "min": None, "max": None, "histogram": empty}
    count = sum(int(p["count"]) for p in present)
    total = sum(float(p["sum"]) for p in present)
    mean = total / count
    m2 = sum(
        float(p["sum_squared_deviations"]) + int(p["count"]) * (float(p["sum"]) / int(p["count"]) - mean) ** 2
        for p in present
    )
    return {
        "count": count,
        "sum": total,
        "sum_squared_deviations": m2,
        "min": min(float(p["min"]) for p in present),
        "max": max(float(p["max"]) for p in present),
        "histogram": np.sum([np.asarray(p["histogram"], dtype=np.int64) for p in present], axis=0).tolist(),
    }


def merge_channel_statistics(sites: Sequence[Mapping], bins: Mapping) -> dict:
    """One channel's fingerprint entry (nnU-Net's seven numbers) from every site's :func:`channel_statistics`.

    Mean and std are the pooled ones (population std, as ``np.std``), min and
    max exact, median and 0.5 / 99.5 percentiles from the summed histogram
    (within one bin width of the pooled values).

    Raises
    ------
    ValueError
        If no site has foreground in this channel, or the histograms do not have the bins' length.
    """
    present = [s for s in sites if int(s["count"]) > 0]
    if not present:
        raise ValueError("no site has foreground voxels in this channel; nnU-Net cannot plan without them")
    for site in present:
        if len(site["histogram"]) != int(bins["num_bins"]):
            raise ValueError(f"a histogram has {len(site['histogram'])} bins, the agreed bins are {bins['num_bins']}")
    combined = combine_channel_statistics(present)
    count, mean = combined["count"], combined["sum"] / combined["count"]
    m2, histogram = combined["sum_squared_deviations"], np.asarray(combined["histogram"], dtype=np.int64)
    low, high = min(float(s["min"]) for s in present), max(float(s["max"]) for s in present)
    p005, median, p995 = (percentile_from_histogram(histogram, bins, q, low=low, high=high) for q in PERCENTILES)
    return {
        "mean": float(mean),
        "median": median,
        "std": float(np.sqrt(max(m2, 0.0) / count)),
        "min": low,
        "max": high,
        "percentile_99_5": p995,
        "percentile_00_5": p005,
    }
