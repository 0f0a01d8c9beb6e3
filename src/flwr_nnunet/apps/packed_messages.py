"""Messages whose arrays travel packed (:mod:`flwr_nnunet.core.packed_arrays`), unpacked before anyone reads them.

The server's grid (:class:`PackedGrid`) packs every instruction's ArrayRecords and unpacks every reply's; the
ClientApp's outermost mod (:func:`packed_arrays_mod`) unpacks an instruction that came packed and packs its reply.
Strategies, sites, the warm worker and the DP mods see the arrays as before. A reply or instruction whose packed
layout is malformed becomes an error reply naming what is wrong, and the round goes on without it.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING
from typing import Any

from flwr.app import ArrayRecord, Context, Error, Message
from flwr.common.constant import ErrorCode
from flwr.supercore import log

from flwr_nnunet.apps.warm_forwarding import refusal
from flwr_nnunet.core.packed_arrays import PackedArraysError, is_packed, pack_content, unpack_content

__all__ = ["PackedGrid", "packed_arrays_mod"]


def _carries_packed_arrays(message: Message) -> bool:
    return message.has_content() and any(
        isinstance(record, ArrayRecord) and is_packed(record) for record in message.content.values()
    )


def packed_arrays_mod(message: Message, context: Context, call_next: Any) -> Message:
    """ClientApp mod (the outermost): an instruction whose arrays came packed is unpacked before the app sees it,
    and the arrays of its reply are packed; a malformed packing is answered with an error reply naming it."""
    if not _carries_packed_arrays(message):
        return call_next(message, context)
    try:
        message.content = unpack_content(message.content)
    except PackedArraysError as error:
        return refusal(message, f"node {context.node_id}: the server's instruction is refused: {error}")
    reply = call_next(message, context)
    if reply.has_content():
        reply.content = pack_content(reply.content)
    return reply


def _unpacked(reply: Message) -> Message:
    """``reply`` with its arrays unpacked; an error reply in its place where its packing is malformed."""
    if not _carries_packed_arrays(reply):
        return reply
    try:
        reply.content = unpack_content(reply.content)
    except PackedArraysError as error:
        reason = f"node {reply.metadata.src_node_id}: the reply's packed arrays are malformed: {error}"
        log(WARNING, "flwr-nnunet: %s; the reply is refused", reason)
        return Message(metadata=reply.metadata, error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason))
    return reply


class PackedGrid:
    """A grid whose instructions carry their arrays packed and whose replies are unpacked when they arrive; every
    other call goes to ``grid`` as it is.

    A model sent to many nodes is one ArrayRecord object, packed once per call: equal packed records are one
    object for Flower, sent once.
    """

    def __init__(self, grid: Any):
        self._grid = grid

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    @staticmethod
    def _packed_all(messages: Iterable[Message]) -> list[Message]:
        """``messages`` themselves (Flower sets their ids as it pushes them), their content's arrays packed."""
        messages, done = list(messages), {}
        for message in messages:
            if message.has_content():
                message.content = pack_content(message.content, done=done)
        return messages

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Flower's ``Grid.push_messages``, the arrays packed."""
        return self._grid.push_messages(self._packed_all(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Flower's ``Grid.pull_messages``, the replies' arrays unpacked."""
        return [_unpacked(reply) for reply in self._grid.pull_messages(message_ids)]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's ``Grid.send_and_receive``, the arrays packed both ways."""
        replies = self._grid.send_and_receive(self._packed_all(messages), timeout=timeout)
        return [_unpacked(reply) for reply in replies]
