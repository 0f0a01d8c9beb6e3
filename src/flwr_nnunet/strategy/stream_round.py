"""The streaming round's message loop: push the instructions, pull and offer the replies, close the round.

A round closes when every instruction is answered, at ``timeout`` seconds after
the push, or, with ``quorum`` (a fraction of the sampled nodes), ``grace``
seconds after ``ceil(quorum * sampled)`` replies were accepted. Replies that
arrive after their round closed are dropped with a log line (:class:`LateReplies`).
What each reply goes through is :class:`~flwr_nnunet.strategy.streaming.TrainStream`'s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from flwr_nnunet.strategy.streaming import (
    STAGE,
    OpensStreams,
    StreamingStrategy,
    TrainStream,
    open_stream,
    release_arrays,
)

__all__ = ["LateReplies", "quorum_count", "stream_train_round"]


def quorum_count(quorum: float | None, sampled: int) -> int:
    """Accepted replies after which the grace period starts: ``ceil(quorum * sampled)`` (at least 1), or
    ``sampled`` without a quorum."""
    if quorum is None:
        return sampled
    if not 0.0 < quorum <= 1.0:
        raise ValueError(f"quorum must be in (0, 1] or None, got {quorum!r}")
    return max(1, math.ceil(quorum * sampled - 1e-9))


class LateReplies:
    """Instructions of closed rounds still unanswered: their replies, when they come, are dropped and logged.

    The round loop keeps one across rounds and passes it to :func:`stream_train_round`, which also pulls these
    ids (so the grid frees the late replies) and calls :meth:`drop` for each one that comes back.
    """

    def __init__(self) -> None:
        self.pending: dict[str, tuple[int, int]] = {}  # instruction id -> (round, destination node)

    def add(self, server_round: int, sent_to: dict[str, int]) -> None:
        """Remember the unanswered instructions of a closed round (id -> node)."""
        for message_id, node in sent_to.items():
            self.pending[message_id] = (server_round, node)

    def drop(self, message: Message, server_round: int) -> None:
        """Log and forget a reply that came after its round closed."""
        closed, node = self.pending.pop(message.metadata.reply_to_message_id, (None, message.metadata.src_node_id))
        log(
            WARNING,
            "%s: round %d: dropped a reply from node %d: it arrived after round %s closed",
            STAGE,
            server_round,
            message.metadata.src_node_id or node,
            closed,
        )


def stream_train_round(
    strategy: StreamingStrategy | OpensStreams,
    grid: Grid,
    server_round: int,
    messages: Iterable[Message],
    *,
    timeout: float | None = 3600,
    quorum: float | None = None,
    grace: float = 0.0,
    poll_interval: float = 0.1,
    late: LateReplies | None = None,
) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """Push ``messages`` (the round's instructions), fold the replies as they arrive, close the round.

    Parameters
    ----------
    strategy, grid, server_round
        The streaming strategy (or a wrapper that opens its own streams, :func:`open_stream`), Flower's grid
        and the round.
    messages
        What ``strategy.configure_train`` returned.
    timeout
        Seconds after the push at which the round closes whatever has arrived (None: no limit).
    quorum
        Optional fraction of the sampled nodes, in (0, 1]: once ``ceil(quorum * sampled)`` replies were
        accepted, the round waits at most ``grace`` more seconds for the others.
    grace
        Seconds to wait after the quorum is met (0: close at once).
    poll_interval
        Seconds between two pulls while replies are outstanding.
    late
        The :class:`LateReplies` of the run: unanswered instructions are added to it when the round closes, and
        replies to earlier rounds' instructions are dropped and logged.

    Returns
    -------
    tuple
        ``(ArrayRecord | None, MetricRecord | None)``, as ``aggregate_train``.
    """
    messages = list(messages)
    needed = quorum_count(quorum, len(messages))
    stream = open_stream(strategy, server_round)
    opened = time.monotonic()
    ids = [str(i) for i in grid.push_messages(messages) if i]
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
    del messages
    pending = set(ids)
    deadline = math.inf if timeout is None else opened + timeout
    try:
        _pull_round(stream, grid, pending, sent_to, deadline, needed, grace, poll_interval, late)
    except BaseException:
        stream.abort()  # the network back to the pre-round model
        raise
    stream.note_held()  # before finish, which a DP wrapper's stream may end early
    return stream.finish()


# pylint: disable-next=too-many-arguments
def _pull_round(
    stream: TrainStream,
    grid: Grid,
    pending: set[str],
    sent_to: dict[str, int],
    deadline: float,
    needed: int,
    grace: float,
    poll_interval: float,
    late: LateReplies | None,
) -> None:
    """Pull and offer replies until the round closes; log the instructions left unanswered (in ``pending``)."""
    server_round = stream.server_round
    closes, quorum_met = deadline, False
    why = "every instruction was answered"
    while pending:
        earlier = set(late.pending) if late is not None else set()
        for reply in grid.pull_messages(pending | earlier):
            instruction = reply.metadata.reply_to_message_id
            if instruction in pending:
                pending.discard(instruction)
                sent_to.pop(instruction, None)
                stream.offer(reply)
            elif late is not None:
                late.drop(reply, server_round)
                release_arrays(reply)
            del reply
        now = time.monotonic()
        if not quorum_met and len(stream.folded) >= needed and pending:
            quorum_met, closes = True, min(deadline, now + grace)
            log(
                INFO,
                "%s: round %d: quorum of %d accepted replies met: waiting up to %.1f s for %d more",
                STAGE,
                server_round,
                needed,
                closes - now,
                len(pending),
            )
        if not pending:
            break
        if now >= closes:
            why = "the grace period after the quorum ended" if closes < deadline else "the round timed out"
            break
        time.sleep(max(0.0, min(poll_interval, closes - now)))
    if pending:
        nodes = sorted(sent_to.get(i, -1) for i in pending)
        log(
            WARNING,
            "%s: round %d: closed with %d replies outstanding (%s): nodes %s",
            STAGE,
            server_round,
            len(pending),
            why,
            nodes[:20],
        )
        if late is not None:
            late.add(server_round, {i: sent_to.get(i, -1) for i in pending})
