"""The streaming weighted mean: updates folded into running sums one at a time, as they arrive.

:class:`RunningWeightedSum` is the accumulator of a streaming round: each update is read once, in chunks,
folded into float64 sums (or, in place, a float32 pair) and released; the mean is written into the targets by
the rules of :mod:`flwr_nnunet.core.reduce` (integers rounded, ties to even; bools by weighted majority).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

from flwr_nnunet.core.reduce import _all_finite, _finish, _single_threaded_ops, _worker_pool, check_updates
from flwr_nnunet.errors import KeyMismatchError

__all__ = ["STREAM_CHUNK_ELEMENTS", "RunningWeightedSum"]

STREAM_CHUNK_ELEMENTS = 1 << 15
"""Chunk of :class:`RunningWeightedSum`: its float64 scratch (a few chunks per thread) stays in L2 cache."""


class RunningWeightedSum:
    """A running weighted sum of updates, one group at a time: the accumulator of a streaming round.

    Each :meth:`add_` folds one update in (``sum += weight * update``, chunk by
    chunk, reading the update once) and keeps nothing of it, so a round holds
    the accumulator and the reply in flight, whatever the number of replies.
    :meth:`finish_` writes ``sum / total_weight`` into the targets in place by
    :mod:`flwr_nnunet.core.reduce`'s rules (integers rounded, ties to even; bools by weighted
    majority, ties to True) and :meth:`release` frees what the sums allocated.

    Where the sums live:

    - default: every group in float64 (8 bytes per element);
    - ``in_place=True``: a float32 group (contiguous) keeps its running sum as a
      float32 pair ``high + low`` whose ``high`` part *is* the target tensor
      (``like``'s, overwritten from the start: the caller restores it if the
      round is abandoned) and whose ``low`` part is allocated: 4 bytes per
      element. Other groups use float64 as above.

    Order-independence rule and bound: each term ``weight * value`` is formed in
    float64 (exactly, for integer weights below 2**29 and float32 or narrower
    values) and added to the running sum in float64; the sum is kept with a
    unit roundoff ``u`` of 2**-53 (float64) or 2**-48 (float32 pair: one float64
    rounding plus the split into ``high`` and ``low``). With ``n`` updates the
    sum is within ``(n - 1) * u * sum(|w x|)`` of the exact one in any arrival
    order, so the means of two orders differ by less than half a float32 ulp
    whenever ``2 * n * kappa * u < 2**-24`` (``kappa = sum(|w x|) / |sum(w x)|``,
    the condition number of the element: ``n * kappa < 2**28`` in float64,
    ``< 2**23`` for pairs). Rounded once to float32, the results of any two
    arrival orders are then equal or, at an element whose exact mean lies that
    close to a rounding midpoint, one ulp apart; in absolute terms they never
    differ by more than ``2 * (n - 1) * u * max|x|`` plus one ulp. Integer groups
    with integer weights are exact while ``sum(w |x|) < 2**53``. float64 groups
    get float64 rounding only.

    Parameters
    ----------
    like
        Key -> tensor whose shapes (and devices) the sums take, e.g. the global model's canonical tensors.
    in_place
        Keep float32 groups' running sums in ``like``'s own tensors plus a float32 low part (see above).
    chunk_elements
        Elements per chunk of :meth:`add_` and :meth:`finish_`.
    num_threads
        Threads that fold chunks side by side (default: ``torch.get_num_threads()``); each chunk runs single-threaded.

    Attributes
    ----------
    total_weight
        The float64 sum of the weights added.
    count
        How many updates were added.
    """

    @torch.no_grad()
    def __init__(
        self,
        like: Mapping[str, torch.Tensor],
        *,
        in_place: bool = False,
        chunk_elements: int = STREAM_CHUNK_ELEMENTS,
        num_threads: int | None = None,
    ) -> None:
        for key, tensor in like.items():
            if tensor.is_complex():
                raise TypeError(f"{key!r}: complex tensors are not supported")
        self.shapes = {key: tuple(tensor.shape) for key, tensor in like.items()}
        self.high: dict[str, torch.Tensor] = {}  # float32 pairs: the target tensor itself
        self.low: dict[str, torch.Tensor] = {}
        self.sums: dict[str, torch.Tensor] = {}  # float64 sums
        for key, tensor in like.items():
            if in_place and tensor.dtype == torch.float32 and tensor.is_contiguous():
                self.high[key] = tensor.zero_()
                self.low[key] = torch.zeros_like(tensor)
            else:
                self.sums[key] = torch.zeros(tensor.shape, dtype=torch.float64, device=tensor.device)
        self.chunk_elements = chunk_elements
        self.num_threads = num_threads
        self.total_weight = 0.0
        self.count = 0
        self.released = False

    @property
    def nbytes(self) -> int:
        """Bytes the accumulator allocated (the float64 sums and the low parts; not the targets it writes)."""
        return sum(t.numel() * t.element_size() for part in (self.low, self.sums) for t in part.values())

    def parts(self) -> dict[str, tuple[torch.Tensor, ...]]:
        """Key -> the tensors that hold the group's running sum (``(high, low)`` or ``(sum,)``)."""
        return {key: (self.high[key], self.low[key]) if key in self.high else (self.sums[key],) for key in self.shapes}

    def _run(self, jobs: list[Callable[[], None]]) -> None:
        workers = max(1, self.num_threads or torch.get_num_threads())

        def run(share: list[Callable[[], None]]) -> None:
            for job in share:
                job()

        with _single_threaded_ops():
            if workers == 1 or len(jobs) == 1:
                run(jobs)
            else:
                list(_worker_pool(workers).map(run, [jobs[i::workers] for i in range(workers)]))

    def _ranges(self, numel: int) -> Iterator[tuple[int, int]]:
        for start in range(0, numel, self.chunk_elements):
            yield start, min(start + self.chunk_elements, numel)

    def _check_usable(self) -> None:
        if self.released:
            raise RuntimeError("the accumulator was released")

    @torch.no_grad()
    def add_(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold ``weight * update`` into the sums (``update``: exactly the sums' keys and shapes).

        Raises
        ------
        ValueError
            If the keys or shapes differ or ``weight`` is not finite and > 0; the sums are left unchanged.
        """
        self._check_usable()
        KeyMismatchError.check(
            update, self.shapes, what="the update", against="the accumulator", fix="fold canonical tensors of the model"
        )
        for key, shape in self.shapes.items():
            if tuple(update[key].shape) != shape:
                raise ValueError(f"the update: {key!r} has shape {tuple(update[key].shape)}, expected {shape}")
        weight = float(weight)
        if not 0 < weight < float("inf"):
            raise ValueError(f"weight must be finite and > 0, got {weight}")
        jobs: list[Callable[[], None]] = []
        for key, parts in self.parts().items():
            flats = [p.view(-1) for p in parts]
            flat = update[key].reshape(-1)
            if flat.device != flats[0].device:
                flat = flat.to(flats[0].device)
            fold = _fold_pair if len(parts) == 2 else _fold_chunk
            for start, end in self._ranges(flat.numel()):
                chunks = [f[start:end] for f in flats]
                jobs.append(lambda c=chunks, u=flat[start:end], fold=fold: fold(*c, u, weight))
        self._run(jobs)
        self.total_weight += weight
        self.count += 1

    @torch.no_grad()
    def finish_(self, targets: Mapping[str, torch.Tensor], *, check_finite: bool = False) -> list[str]:
        """Write ``sum / total_weight`` into ``targets`` (the sums' keys and shapes) in place, cast to each
        target's dtype by :mod:`flwr_nnunet.core.reduce`'s rules; with ``check_finite``, return the keys whose
        result holds NaN/Inf.

        With ``in_place``, the targets of float32 pairs must be the tensors the accumulator was made on.

        Raises
        ------
        ValueError
            If nothing was added, or the keys or shapes differ; the targets are left unchanged.
        """
        self._check_usable()
        if self.count == 0:
            raise ValueError("no updates were added")
        check_updates(targets, [{k: p[0] for k, p in self.parts().items()}])
        for key, high in self.high.items():
            if targets[key].data_ptr() != high.data_ptr():
                raise ValueError(f"{key!r}: an in-place sum can only be finished into the tensor it was made on")
        total = self.total_weight
        non_finite: set[str] = set()
        unpack: list[tuple[torch.Tensor, torch.Tensor]] = []
        jobs: list[Callable[[], None]] = []

        def write(key: str, out: torch.Tensor, parts: list[torch.Tensor]) -> None:
            mean = parts[0].double().add_(parts[1]).div_(total) if len(parts) == 2 else parts[0] / total
            out.copy_(_finish(mean, out.dtype))
            if check_finite and out.is_floating_point() and not _all_finite(out):
                non_finite.add(key)

        for key, parts in self.parts().items():
            target = targets[key]
            out = target
            if not target.is_contiguous():
                out = torch.empty_like(target, memory_format=torch.contiguous_format)
                unpack.append((target, out))
            flat_out, flats = out.view(-1), [p.view(-1) for p in parts]
            for start, end in self._ranges(flat_out.numel()):
                chunks = [f[start:end] for f in flats]
                jobs.append(lambda k=key, o=flat_out[start:end], c=chunks: write(k, o, c))
        self._run(jobs)
        for target, out in unpack:
            target.copy_(out)
        return [key for key in targets if key in non_finite]

    def release(self) -> None:
        """Free what the accumulator allocated; it cannot be used afterwards. With ``in_place`` the targets keep
        whatever they hold (the mean after :meth:`finish_`, a partial sum before it)."""
        self.high, self.low, self.sums = {}, {}, {}
        self.released = True


def _fold_chunk(total: torch.Tensor, values: torch.Tensor, weight: float) -> None:
    """``total += weight * values`` with the product formed in float64 (``total``'s dtype)."""
    if values.dtype == torch.bool or not values.is_floating_point():
        values = values.to(torch.float64)  # an integer operand with a float alpha is refused by torch
    total.add_(values, alpha=weight)


def _fold_pair(high: torch.Tensor, low: torch.Tensor, values: torch.Tensor, weight: float) -> None:
    """``high + low += weight * values`` for a float32 pair: summed in float64, split back into float32 parts
    (``high`` the rounded sum, ``low`` the rounded remainder, exact in float64 before its rounding)."""
    total = high.double()
    total.add_(low)
    total.add_(values if values.is_floating_point() else values.double(), alpha=weight)  # in float64
    high.copy_(total)
    low.copy_(total.sub_(high))
