"""In-place reducers over canonical client updates.

Each reducer writes its result into the given target tensors (normally the
global network's parameters, so every alias of a group sees the new value) and
reads each update once. Work goes group by group and, inside a group, in
cache-sized chunks across all clients, so the only scratch memory is a few
chunks: no per-client copy of the model and no model-sized buffer.

Floating-point groups are reduced in ``accumulate_dtype`` (float32 by default,
float64 on request) whatever their own dtype, then cast back. Integer groups
(e.g. BatchNorm's ``num_batches_tracked``) are reduced exactly in float64 and
rounded to the nearest integer (ties to even), keeping their dtype; bool groups
take the weighted majority (ties to True).

Before any target is written, every update is checked to have exactly the
targets' keys and shapes, so a bad update raises and leaves the targets intact.

The streaming form of the weighted mean, updates folded in one at a time as they
arrive, is :class:`~flwr_nnunet.core.running.RunningWeightedSum`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch

from flwr_nnunet.errors import KeyMismatchError

__all__ = [
    "Reducer",
    "Tensors",
    "assign_",
    "check_updates",
    "median_",
    "normalized_weights",
    "reduce_",
    "trimmed_mean_",
    "weighted_mean_",
]

DEFAULT_CHUNK_ELEMENTS = 1 << 18
SORT_SCRATCH_ELEMENTS = 1 << 22

Tensors = Mapping[str, torch.Tensor]
"""Canonical key -> tensor: a model's alias groups, one tensor each (targets, or one client's update)."""

Reducer = Callable[[Sequence[torch.Tensor], torch.dtype, torch.Tensor], torch.Tensor]
"""``reducer(chunks, work_dtype, out)``: reduces equally long flat chunks (one per client) to one flat
chunk in ``work_dtype``; it may write the result straight into ``out`` (the target's chunk) and return it."""


_Job = tuple[str, torch.Tensor, list[torch.Tensor], torch.dtype]
"""(group key, output chunk, one input chunk per update, work dtype)."""


def check_updates(targets: Mapping[str, torch.Tensor], updates: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """Raise ``ValueError`` naming the first update whose keys or shapes differ from ``targets``.

    Differing keys raise :class:`~flwr_nnunet.errors.KeyMismatchError` (a ``ValueError`` and a ``KeyError``).
    """
    if not updates:
        raise ValueError("no updates to aggregate")
    for index, update in enumerate(updates):
        KeyMismatchError.check(
            update,
            targets,
            what=f"update {index}",
            against="the targets",
            fix="every update must carry exactly the targets' (canonical) keys",
        )
        for key, target in targets.items():
            if tuple(update[key].shape) != tuple(target.shape):
                raise ValueError(
                    f"update {index}: {key!r} has shape {tuple(update[key].shape)}, expected {tuple(target.shape)}"
                )


def normalized_weights(weights: Sequence[float], count: int) -> list[float]:
    """``weights`` scaled to sum to 1, in float64; they must be finite, >= 0 and not all zero."""
    if count == 0:
        raise ValueError("no updates to aggregate")
    if len(weights) != count:
        raise ValueError(f"{len(weights)} weights for {count} updates")
    values = [float(w) for w in weights]
    total = sum(values)
    if not all(0 <= w < float("inf") for w in values) or not total > 0:
        raise ValueError(f"weights must be finite, >= 0 and not all zero, got {values}")
    return [w / total for w in values]


def _work_dtype(target: torch.Tensor, accumulate_dtype: torch.dtype) -> torch.dtype:
    if target.is_complex():
        raise TypeError("complex tensors are not supported")
    return accumulate_dtype if target.is_floating_point() else torch.float64


def _finish(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast reduced values back to the target dtype by this module's integer/bool rule."""
    if dtype == torch.bool:
        return values >= 0.5
    if not dtype.is_floating_point:
        return values.round()
    return values


@contextmanager
def _single_threaded_ops() -> Iterator[None]:
    """Run torch ops on the calling thread only (no intra-op thread pool)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _worker_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers`` threads, made on first use."""
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flwr-nnunet-reduce")
        return _pools[workers]


@torch.no_grad()
def reduce_(
    targets: Mapping[str, torch.Tensor],
    updates: Sequence[Mapping[str, torch.Tensor]],
    reducer: Reducer,
    *,
    accumulate_dtype: torch.dtype = torch.float32,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    num_threads: int | None = None,
    check_finite: bool = False,
) -> list[str]:
    """Write ``reducer`` over ``updates`` into ``targets``, chunk by chunk, in place.

    Parameters
    ----------
    targets
        Key -> tensor to overwrite (e.g. the canonical tensors of a network).
    updates
        One mapping per client with exactly the keys and shapes of ``targets``.
    reducer
        Called with one flat chunk per client, the work dtype and the target's
        flat output chunk; returns the reduced chunk (or writes it into the
        output chunk and returns that). It may run on several threads at once.
    accumulate_dtype
        Work dtype for floating-point groups.
    chunk_elements
        Elements per chunk; small enough that a chunk of every client stays in cache.
    num_threads
        Threads that reduce chunks side by side (default: ``torch.get_num_threads()``).
        Each chunk runs single-threaded: torch's own intra-op threads would pay a
        barrier per chunk-sized op, which costs 10-100x on a busy machine.
    check_finite
        Also look for NaN/Inf in each floating-point result chunk while it is in cache.

    Returns
    -------
    list[str]
        With ``check_finite``, the keys (in ``targets`` order) whose result holds
        NaN or Inf, e.g. because an update did; otherwise ``[]``.
    """
    check_updates(targets, updates)
    workers = max(1, num_threads or torch.get_num_threads())
    jobs, unpack = _chunk_jobs(targets, updates, accumulate_dtype, chunk_elements)
    non_finite: set[str] = set()

    def run(share: list[_Job]) -> None:
        for key, out, chunks, work in share:
            reduced = reducer(chunks, work, out)
            if reduced is not out:
                out.copy_(_finish(reduced, out.dtype))
            if check_finite and out.is_floating_point() and not _all_finite(out):
                non_finite.add(key)

    with _single_threaded_ops():
        if workers == 1 or len(jobs) == 1:
            run(jobs)
        else:
            list(_worker_pool(workers).map(run, [jobs[i::workers] for i in range(workers)]))
    for target, out in unpack:
        target.copy_(out)
    return [key for key in targets if key in non_finite]


def _all_finite(values: torch.Tensor) -> bool:
    """Whether a floating chunk holds no NaN/Inf: its sum is finite, or else no element is NaN/Inf
    (a sum of large finite values may overflow)."""
    return bool(torch.isfinite(values.sum())) or bool(torch.isfinite(values).all())


def _chunk_jobs(
    targets: Mapping[str, torch.Tensor],
    updates: Sequence[Mapping[str, torch.Tensor]],
    accumulate_dtype: torch.dtype,
    chunk_elements: int,
) -> tuple[list[_Job], list[tuple[torch.Tensor, torch.Tensor]]]:
    """A job for every chunk of every group, and the (target, contiguous stand-in) pairs
    to copy back for non-contiguous targets."""
    jobs, unpack = [], []
    for key, target in targets.items():
        work = _work_dtype(target, accumulate_dtype)
        flats = [u[key].reshape(-1) for u in updates]
        out = target
        if not target.is_contiguous():
            out = torch.empty_like(target, memory_format=torch.contiguous_format)
            unpack.append((target, out))
        flat_out = out.view(-1)
        for start in range(0, flat_out.numel(), chunk_elements):
            end = min(start + chunk_elements, flat_out.numel())
            jobs.append((key, flat_out[start:end], [f[start:end] for f in flats], work))
    return jobs, unpack


def weighted_mean_(
    targets: Mapping[str, torch.Tensor],
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    *,
    accumulate_dtype: torch.dtype = torch.float32,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    num_threads: int | None = None,
    check_finite: bool = False,
) -> list[str]:
    """Write the weighted mean of ``updates`` into ``targets`` in place.

    ``weights`` (one per update, e.g. ``num-examples``) must be finite, >= 0
    and not all zero; they are normalised in float64. The keyword options and
    the return value are those of :func:`reduce_`.
    """
    factors = normalized_weights(weights, len(updates))

    def mean(chunks: Sequence[torch.Tensor], dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
        storage = out.untyped_storage().data_ptr()
        direct = out.dtype == dtype and all(
            c.device == out.device and c.untyped_storage().data_ptr() != storage for c in chunks
        )
        acc = out if direct else torch.empty(chunks[0].numel(), dtype=dtype, device=chunks[0].device)

        def in_dtype(chunk: torch.Tensor) -> torch.Tensor:
            return chunk if chunk.dtype == dtype else chunk.to(dtype)  # int64 * float would compute in float32

        torch.mul(in_dtype(chunks[0]), factors[0], out=acc)
        for chunk, factor in zip(chunks[1:], factors[1:]):
            acc.add_(in_dtype(chunk), alpha=factor)
        return acc

    return reduce_(
        targets,
        updates,
        mean,
        accumulate_dtype=accumulate_dtype,
        chunk_elements=chunk_elements,
        num_threads=num_threads,
        check_finite=check_finite,
    )


def _sort_chunk(clients: int) -> int:
    """Chunk length that keeps the stacked chunks of all clients within SORT_SCRATCH_ELEMENTS."""
    return max(4096, SORT_SCRATCH_ELEMENTS // max(clients, 1))


def _reduce_sorted_(
    targets: Mapping[str, torch.Tensor],
    updates: Sequence[Mapping[str, torch.Tensor]],
    reduce_sorted: Callable[[torch.Tensor], torch.Tensor],
    *,
    chunk_elements: int | None,
    **options: Any,
) -> list[str]:
    """:func:`reduce_` with ``reduce_sorted`` applied to each chunk's client values stacked and sorted along dim 0."""

    def reducer(chunks: Sequence[torch.Tensor], dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
        return reduce_sorted(torch.stack([c.to(dtype) for c in chunks]).sort(dim=0).values)

    chunk_elements = chunk_elements or _sort_chunk(len(updates))
    return reduce_(targets, updates, reducer, chunk_elements=chunk_elements, **options)


def median_(
    targets: Mapping[str, torch.Tensor],
    updates: Sequence[Mapping[str, torch.Tensor]],
    *,
    accumulate_dtype: torch.dtype = torch.float32,
    chunk_elements: int | None = None,
    num_threads: int | None = None,
    check_finite: bool = False,
) -> list[str]:
    """Write the element-wise median of ``updates`` into ``targets`` (unweighted; even counts average the middle two, as ``numpy.median``).

    The keyword options and the return value are those of :func:`reduce_`.
    """
    n = len(updates)

    def middle(ordered: torch.Tensor) -> torch.Tensor:
        if n % 2:
            return ordered[n // 2]
        return ordered[n // 2 - 1] / 2 + ordered[n // 2] / 2  # halved first: no overflow near the dtype's max

    return _reduce_sorted_(
        targets,
        updates,
        middle,
        accumulate_dtype=accumulate_dtype,
        chunk_elements=chunk_elements,
        num_threads=num_threads,
        check_finite=check_finite,
    )


def trimmed_mean_(
    targets: Mapping[str, torch.Tensor],
    updates: Sequence[Mapping[str, torch.Tensor]],
    beta: float,
    *,
    accumulate_dtype: torch.dtype = torch.float32,
    chunk_elements: int | None = None,
    num_threads: int | None = None,
    check_finite: bool = False,
) -> list[str]:
    """Write the element-wise trimmed mean of ``updates`` into ``targets`` (unweighted).

    ``int(beta * n)`` of the lowest and of the highest values are cut at every
    element, as Flower's ``FedTrimmedAvg`` and ``scipy.stats.trim_mean`` do. The keyword
    options and the return value are those of :func:`reduce_`.
    """
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"beta must be in [0, 0.5), got {beta}")
    cut = int(beta * len(updates))

    def kept_mean(ordered: torch.Tensor) -> torch.Tensor:
        kept = ordered[cut : len(ordered) - cut]
        return (kept / len(kept)).sum(dim=0)  # divided first: a sum of values near the dtype's max would overflow

    return _reduce_sorted_(
        targets,
        updates,
        kept_mean,
        accumulate_dtype=accumulate_dtype,
        chunk_elements=chunk_elements,
        num_threads=num_threads,
        check_finite=check_finite,
    )


@torch.no_grad()
def assign_(targets: Mapping[str, torch.Tensor], sources: Mapping[str, torch.Tensor]) -> None:
    """Copy ``sources`` into ``targets`` in place (same keys and shapes; dtypes are cast).

    Use it to load received canonical tensors into a live network: optimizer
    and alias references to the parameters stay valid.
    """
    check_updates(targets, [sources])
    for key, target in targets.items():
        target.copy_(sources[key])
