"""A ClientApp's way to its site's warm worker, importing only Flower: the choice, the message as bytes, the reply.

A Flower 1.42 SuperNode starts a ``flwr-clientapp`` process per message. Where the
site's warm worker (:mod:`flwr_nnunet.site.warm_worker`) runs, that process
imports neither torch nor nnU-Net: :func:`forwarded` hands the worker the message
as Flower's own protobuf, with the node's context, and the worker checks it as
the ClientApp's process would (``flwr_nnunet.apps.client.answer_forwarded``)
before its trainer is touched. Where no worker can take it, :func:`forwarded`
returns ``None`` (the fallback logged) and the ClientApp answers in its own
process (``flwr_nnunet.apps.client.handle_message``).
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Mapping, Sequence
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.supercore import log

from flwr_nnunet.site.warm_channel import (
    WarmSiteBusy,
    WarmSiteRefused,
    WarmSiteUnavailable,
    ask_warm_site,
    socket_path,
    start_warm_site,
    supernode_pid,
)

__all__ = [
    "decode_content",
    "decode_forwarded",
    "encode_content",
    "encode_forwarded",
    "forwarded",
    "refusal",
    "site_name",
    "site_results",
    "warm_site_choice",
]


def site_name(node_config: Mapping[str, Any], node_id: int = 0) -> str:
    """The name of a node's site in logs and errors: ``site-K`` in simulation, else node-config ``site-name``
    (default ``node-<node id>``)."""
    if "partition-id" in node_config:
        return f"site-{int(node_config['partition-id'])}"
    return str(node_config.get("site-name", f"node-{node_id}"))


def site_results(node_config: Mapping[str, Any]) -> Path | None:
    """A deployed site's results folder: node-config ``nnunet-results``, else ``nnUNet_results``; ``None`` if
    neither is set."""
    results = node_config.get("nnunet-results") or os.environ.get("nnUNet_results")
    return Path(results).expanduser().absolute() if results else None


def warm_site_choice(node_config: Mapping[str, Any], name: str) -> bool | None:
    """Node-config ``warm-site``: True (start the worker on first use), False (never), None (when one runs).

    Raises
    ------
    WarmSiteRefused
        If the value is neither true nor false.
    """
    value = node_config.get("warm-site")
    if value is None or isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise WarmSiteRefused(f"{name}: node-config 'warm-site' must be true or false, not {value!r}")


def encode_forwarded(message: Message, context: Context) -> list[bytes]:
    """``message`` and its node's context (run, node, configs; its state stays here) as the worker's frames."""
    node = Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=context.node_config,
        state=RecordDict(),
        run_config=context.run_config,
    )
    return [context_to_proto(node).SerializeToString(), message_to_proto(message).SerializeToString()]


def decode_forwarded(frames: Sequence[bytes]) -> tuple[Message, Context]:
    """The message and context that :func:`encode_forwarded` wrote.

    Raises
    ------
    ValueError
        If ``frames`` are not two frames; protobuf's ``DecodeError`` if they are not these messages.
    """
    context, message = frames
    return message_from_proto(ProtoMessage.FromString(message)), context_from_proto(ProtoContext.FromString(context))


def encode_content(content: RecordDict) -> bytes:
    """A reply's content as Flower's ``RecordDict`` protobuf."""
    return recorddict_to_proto(content).SerializeToString()


def decode_content(data: bytes) -> RecordDict:
    """The reply content that :func:`encode_content` wrote."""
    return recorddict_from_proto(ProtoRecordDict.FromString(data))


def refusal(message: Message, reason: str) -> Message:
    """The error reply to ``message`` that gives ``reason`` (logged)."""
    log(ERROR, "%s", reason)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


def forwarded(message: Message, context: Context) -> Message | None:
    """The reply of the site's warm worker to a ``train`` or ``evaluate`` message; ``None`` where no worker can
    take it (the ClientApp then answers in its own process).

    A simulation's sites live in their Ray actors: no worker. With node-config ``warm-site=true`` a worker is
    started when none can take the message and it is not busy (this message is answered in-process, the next
    ones by the worker); ``false`` never asks one. A refused instruction gets the error reply the ClientApp's
    process would give. No exception escapes.
    """
    if "partition-id" in context.node_config:
        return None
    name = site_name(context.node_config, context.node_id)
    try:
        warm, results = warm_site_choice(context.node_config, name), site_results(context.node_config)
        running = results is not None and socket_path(results).exists()
        if results is None or warm is False or (warm is None and not running):
            return None
        try:
            return Message(decode_content(ask_warm_site(results, encode_forwarded(message, context))), reply_to=message)
        except WarmSiteUnavailable as why:
            start = bool(warm) and not isinstance(why, WarmSiteBusy)
            if start:
                start_warm_site(results, supernode_pid())
            later = "; a warm site starts for the next messages" if start else ""
            log(WARNING if running else INFO, "%s: %s; this message is answered in-process%s", name, why, later)
    except WarmSiteRefused as refused:
        return refusal(message, str(refused))
    except Exception as error:  # noqa: BLE001 - the ClientApp's process answers it; logged with its traceback
        text = "".join(traceback.format_exception(error))
        log(WARNING, "%s: the warm site could not be asked; this message is answered in-process\n%s", name, text)
    return None
