"""GlobalModel: the server's nnU-Net network as the strategies see it.

The network is the global model: its canonical tensors (one per alias group)
are views of its parameters, so writing into them updates every alias at once.
The record sent to the sites is encoded once per model version and doubles as
the round's snapshot: aggregation writes into the network, and a round that
goes wrong is rolled back from the record, which still holds the pre-round
values (no second copy of the model is kept).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping

import torch
from flwr.app import ArrayRecord
from torch import nn

from flwr_nnunet.core.aliasing import AliasMap
from flwr_nnunet.core.codec import from_array_record, to_array_record
from flwr_nnunet.core.reduce import assign_, check_updates
from flwr_nnunet.strategy.replies import tensors_problem

__all__ = ["GlobalModel"]


def _cast_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` in ``like``'s dtype; integer targets take rounded values."""
    if value.dtype == like.dtype:
        return value
    if not like.is_floating_point() and value.is_floating_point():
        value = value.round()
    return value.to(like.dtype)


class GlobalModel:
    """The global network, its alias map and the record sent to the sites.

    Parameters
    ----------
    network
        The global nnU-Net network; its parameters are overwritten in place.
    local_keys
        ``key -> bool``; alias groups in which any key matches stay local at each
        site (FedBN): they are neither sent nor aggregated.

    Attributes
    ----------
    alias_map
        The network's alias groups.
    local_groups
        Canonical keys of the groups that stay local.
    all_tensors
        Canonical key -> the network's tensor (a view of its parameter), every group.
    tensors
        The same for the aggregated (non-local) groups only.
    """

    def __init__(self, network: nn.Module, *, local_keys: Callable[[str], bool] | None = None) -> None:
        self.network = network
        self.alias_map = AliasMap.from_module(network)
        self.local_groups = self.alias_map.select(local_keys) if local_keys is not None else ()
        self.all_tensors = self.alias_map.collapse(network.state_dict())
        self.tensors = OrderedDict((k, t) for k, t in self.all_tensors.items() if k not in self.local_groups)
        self._record: ArrayRecord | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the aggregated groups (each shared tensor once)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def record(self) -> ArrayRecord:
        """The aggregated groups as an ``ArrayRecord``: what is sent, encoded once per model version."""
        if self._record is None:
            self._record = to_array_record(self.tensors)
        return self._record

    def is_current(self, arrays: ArrayRecord | None) -> bool:
        """Whether ``arrays`` is this model's current record (the object itself)."""
        return arrays is not None and arrays is self._record

    def snapshot(self) -> ArrayRecord:
        """The record of the model as it is now, to roll back to with :meth:`roll_back_`."""
        return self.record()

    def roll_back_(self, snapshot: ArrayRecord) -> None:
        """Write ``snapshot`` (from :meth:`snapshot`) back into the network."""
        assign_(self.tensors, from_array_record(snapshot))
        self._record = snapshot

    def values_in(self, snapshot: ArrayRecord, keys: list[str]) -> OrderedDict[str, torch.Tensor]:
        """The values of ``keys`` in ``snapshot`` on the network's device: read-only views of the
        record's bytes for a CPU network (no copy of the model), copies for a CUDA one."""
        decoded = from_array_record(snapshot)
        return OrderedDict((k, decoded[k].to(self.tensors[k].device)) for k in keys)

    def changed(self) -> None:
        """Mark the network as written (the record is re-encoded when next asked for)."""
        self._record = None

    def load_(self, arrays: ArrayRecord, *, cast: bool = False) -> None:
        """Write ``arrays`` (canonical keys, or every state_dict key with agreeing aliases) into the network.

        Parameters
        ----------
        arrays
            The new global model (local groups, if present, are ignored).
        cast
            Cast each array to its group's dtype first (integers rounded), for
            results of numpy code that turns int64 buffers into float64.

        Raises
        ------
        ValueError
            If keys, shapes or dtypes differ from the network's, or values are
            not finite; the network is left unchanged.
        """
        if self.is_current(arrays):
            return
        tensors = from_array_record(arrays)
        if set(tensors) == set(self.alias_map.keys):
            tensors = self.alias_map.collapse(tensors)
        tensors = OrderedDict((k, v) for k, v in tensors.items() if k not in self.local_groups)
        check_updates(self.tensors, [tensors])
        if cast:
            tensors = OrderedDict((k, _cast_like(v, self.tensors[k])) for k, v in tensors.items())
        problem = tensors_problem(self.tensors, tensors)
        if problem:
            raise ValueError(f"global arrays: {problem}")
        assign_(self.tensors, tensors)
        self.changed()

    def assign_all_(self, canonical: Mapping[str, torch.Tensor]) -> None:
        """Copy canonical tensors for every group, local ones included, into the network."""
        assign_(self.all_tensors, canonical)
        self.changed()

    def network_weights(self) -> OrderedDict[str, torch.Tensor]:
        """Every state_dict key on the CPU, the keys of a group sharing one tensor (what checkpoints hold)."""
        return self.alias_map.expand(OrderedDict((k, t.detach().cpu()) for k, t in self.all_tensors.items()))
