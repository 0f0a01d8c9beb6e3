"""Server to site with compression: the model every site rebuilds, and what brings each site to it.

With run-config ``compression`` set, the sites do not receive the global model itself but a *reference* that
follows it: each time the global model changes, the reference moves by the compressed delta from the reference
to the global model, and every site rebuilds the same reference bit for bit (:func:`~flwr_nnunet.core.delta_codec.apply_delta`
on the CPU, on both sides). What the compression leaves out stays in the gap between the global model and the
reference, so the next delta carries it (error feedback on the server's side). A site says in each reply which
reference it holds (``base-sha256``); a site holding the current one gets nothing but its digest, one holding the
previous one the delta, any other the whole reference in float32 (a new site, a site that missed a round, every
site after the server resumed).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from flwr_nnunet.core.codec import PayloadError, from_array_record, to_array_record
from flwr_nnunet.core.delta_codec import (
    BASE_KEY,
    COMPRESSION_KEY,
    MODEL_KEY,
    SCALES_RECORD,
    CompressedDelta,
    apply_delta,
    decode_delta,
    encode_delta,
)
from flwr_nnunet.core.quantize import Scheme
from flwr_nnunet.nnunet.digests import tensors_sha256
from flwr_nnunet.strategy.global_model import GlobalModel
from flwr_nnunet.strategy.replies import AcceptedReply

__all__ = ["ModelSender"]


class ModelSender:
    """The reference model the sites rebuild, its digests, and which site holds which.

    Parameters
    ----------
    scheme
        The compression of the deltas.
    arrayrecord_key
        Where instructions carry their arrays.

    Attributes
    ----------
    digest
        The current reference's digest (None before the first model is sent).
    held
        Node id -> the digest of the reference the node said it holds in its last accepted reply.
    """

    def __init__(self, scheme: Scheme, arrayrecord_key: str = "arrays") -> None:
        self.scheme = scheme
        self.arrayrecord_key = arrayrecord_key
        self.reference: OrderedDict[str, torch.Tensor] | None = None
        self.digest: str | None = None
        self.previous: str | None = None
        self.held: dict[int, str] = {}
        self._source: ArrayRecord | None = None
        self._delta: CompressedDelta | None = None
        self._full: ArrayRecord | None = None

    def follow(self, model: GlobalModel) -> None:
        """Move the reference to ``model``'s current values, once per model version (the first: a copy)."""
        record = model.record()
        if record is self._source:
            return
        current = OrderedDict((k, t.detach().cpu()) for k, t in model.tensors.items())
        if self.reference is None:
            self.reference, self._delta, self.previous = (
                OrderedDict((k, t.clone()) for k, t in current.items()),
                None,
                None,
            )
        else:
            delta, _ = encode_delta(current, self.reference, self.scheme)
            moved = apply_delta(self.reference, decode_delta(delta, self.reference, self.scheme))
            self.reference, self._delta, self.previous = moved, delta, self.digest
        self.digest, self._full, self._source = tensors_sha256(self.reference), None, record

    def global_values(self) -> OrderedDict[str, torch.Tensor]:
        """The global model the reference last followed (read-only views of its record): what a reply's update
        is added to, unchanged while a streaming round folds replies into the network."""
        if self._source is None:
            raise PayloadError("no model was sent yet")
        return from_array_record(self._source)

    def address(self, model: GlobalModel, messages: Iterable[Message]) -> list[Message]:
        """``messages`` (instructions carrying ``model``'s record), each now carrying what brings its node to the
        reference of ``model``: nothing, the delta, or the whole reference, with the digests in its config."""
        self.follow(model)
        messages = list(messages)
        for message in messages:
            records = dict(message.content.items())
            config = ConfigRecord(dict(records.pop("config", ConfigRecord())))
            config[COMPRESSION_KEY], config[MODEL_KEY] = self.scheme.name, self.digest
            records.update(self._bringing(message.metadata.dst_node_id, config))
            records["config"] = config
            message.content = RecordDict(records)
        return messages

    def _bringing(self, node: int, config: ConfigRecord) -> dict[str, ArrayRecord]:
        """The records that bring ``node`` to the reference (``config`` gets ``base-sha256`` for a delta)."""
        held = self.held.get(node)
        if held is not None and held == self.digest:
            config[BASE_KEY] = self.digest
            return {self.arrayrecord_key: ArrayRecord()}
        if held is not None and held == self.previous and self._delta is not None:
            config[BASE_KEY] = self.previous
            codes, scales = self._delta
            return {self.arrayrecord_key: codes, SCALES_RECORD: scales}
        if self._full is None:
            self._full = to_array_record(self.reference)
        return {self.arrayrecord_key: self._full}

    def note(self, asked: Sequence[int], accepted: Sequence[AcceptedReply]) -> None:
        """After a round: each node of ``asked`` holds the reference its accepted reply names (``base-sha256``,
        when it is the current one); a node without one is forgotten (it gets the whole reference next time)."""
        replied = {reply.node_id: _reply_base(reply) for reply in accepted}
        for node in asked:
            if replied.get(node) == self.digest and self.digest is not None:
                self.held[node] = self.digest
            else:
                self.held.pop(node, None)


def _reply_base(reply: AcceptedReply) -> str | None:
    """The ``base-sha256`` of a reply's config records, or None."""
    for config in reply.message.content.config_records.values():
        if isinstance(config.get(BASE_KEY), str):
            return config[BASE_KEY]
    return None
