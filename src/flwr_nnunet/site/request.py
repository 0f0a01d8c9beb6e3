"""What one checked instruction asks of a site, what the site answers, and both as bytes.

A :class:`SiteRequest` is a train, evaluate or cross-validation instruction after the
ClientApp checked it (records, config entries, decoded arrays); :meth:`Site.answer
<flwr_nnunet.site.site.Site.answer>` answers it with a :class:`SiteAnswer`, in the
ClientApp's process or in the site's warm worker (:mod:`flwr_nnunet.site.warm_worker`).
Between the two processes both travel as Flower's own ``RecordDict`` protobuf: the
tensors as the project's ``.npy`` payloads (:mod:`flwr_nnunet.core.codec`, decoded
without unpickling), everything else as JSON text in a ``ConfigRecord``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from flwr_nnunet.core.codec import from_array_record, to_array_record
from flwr_nnunet.errors import FlwrNnUNetError
from flwr_nnunet.site.spec import SiteSpec, TrainOptions

__all__ = ["KINDS", "RequestError", "SiteAnswer", "SiteRequest", "decode_answer", "decode_request", "encode"]

KINDS = ("train", "evaluate", "crossval")
"""What a request asks: a training round, an evaluation round, a cross-validation fold's whole-case validation."""


class RequestError(FlwrNnUNetError, ValueError):
    """Bytes that are not a request or an answer of this module."""


@dataclass(frozen=True)
class SiteRequest:
    """One checked instruction for one site.

    Attributes
    ----------
    kind
        One of :data:`KINDS`.
    run_id
        The Flower run: a site keeps one trainer per run.
    spec
        The site.
    options
        The round's options.
    received
        The server's canonical tensors.
    plans_sha, local_keys, alias_map_json
        The instruction's ``plans-sha256``, ``local-keys`` and ``alias-map`` (see :meth:`Site.train
        <flwr_nnunet.site.site.Site.train>`).
    fold
        The cross-validation fold (kind ``crossval`` only).
    """

    kind: str
    run_id: int
    spec: SiteSpec
    options: TrainOptions
    received: Mapping[str, torch.Tensor] = field(repr=False)
    plans_sha: str | None = None
    local_keys: tuple[str, ...] = ()
    alias_map_json: str | bytes | None = None
    fold: int | None = None


@dataclass(frozen=True)
class SiteAnswer:
    """A site's answer: its metrics, its plans digest, and its tensors (train) or counts (crossval, JSON text)."""

    metrics: dict[str, Any]
    plans_sha: str
    tensors: Mapping[str, torch.Tensor] | None = field(default=None, repr=False)
    counts: str | None = None


def _spec_json(spec: SiteSpec) -> str:
    return json.dumps({key: str(value) if isinstance(value, Path) else value for key, value in asdict(spec).items()})


def _spec(text: str) -> SiteSpec:
    entries = json.loads(text)
    patch = entries.get("patch_size")
    return SiteSpec(
        **{
            **entries,
            "nnunet_preprocessed": Path(entries["nnunet_preprocessed"]),
            "nnunet_results": Path(entries["nnunet_results"]),
            "patch_size": None if patch is None else tuple(patch),
        }
    )


def encode(item: SiteRequest | SiteAnswer) -> bytes:
    """``item`` as the bytes of a Flower ``RecordDict`` protobuf."""
    if isinstance(item, SiteRequest):
        about: dict[str, Any] = {
            "kind": item.kind,
            "run-id": str(item.run_id),
            "spec": _spec_json(item.spec),
            "options": json.dumps(asdict(item.options)),
            "local-keys": json.dumps(list(item.local_keys)),
        }
        optional = {"plans-sha256": item.plans_sha, "alias-map": item.alias_map_json, "fold": item.fold}
        about.update({key: value for key, value in optional.items() if value is not None})
        content = {"config": ConfigRecord(about), "arrays": to_array_record(item.received)}
    else:
        about = {"plans-sha256": item.plans_sha, "metrics": json.dumps(item.metrics)}
        if item.counts is not None:
            about["counts"] = item.counts
        content = {"config": ConfigRecord(about)}
        if item.tensors is not None:
            content["arrays"] = to_array_record(item.tensors)
    return recorddict_to_proto(RecordDict(content)).SerializeToString()


def _decoded(data: bytes, what: str, build: Callable[[RecordDict], Any]) -> Any:
    """``build`` applied to the ``RecordDict`` that ``data`` holds; any failure a :class:`RequestError`."""
    try:
        return build(recorddict_from_proto(ProtoRecordDict.FromString(data)))
    except RequestError:
        raise
    except Exception as error:  # noqa: BLE001 - protobuf's DecodeError, a missing or mistyped entry
        raise RequestError(f"a malformed site {what} ({type(error).__name__}: {error})") from None


def decode_request(data: bytes) -> SiteRequest:
    """The :class:`SiteRequest` that :func:`encode` wrote.

    Raises
    ------
    RequestError
        If ``data`` is not one.
    """
    return _decoded(data, "request", _request)


def decode_answer(data: bytes) -> SiteAnswer:
    """The :class:`SiteAnswer` that :func:`encode` wrote.

    Raises
    ------
    RequestError
        If ``data`` is not one.
    """
    return _decoded(data, "answer", _answer)


def _request(content: RecordDict) -> SiteRequest:
    config = content["config"]
    kind = str(config["kind"])
    if kind not in KINDS:
        raise RequestError(f"unknown kind {kind!r}")
    fold, alias_map, plans_sha = config.get("fold"), config.get("alias-map"), config.get("plans-sha256")
    return SiteRequest(
        kind=kind,
        run_id=int(config["run-id"]),
        spec=_spec(str(config["spec"])),
        options=TrainOptions(**json.loads(str(config["options"]))),
        received=from_array_record(content["arrays"]),
        plans_sha=None if plans_sha is None else str(plans_sha),
        local_keys=tuple(str(key) for key in json.loads(str(config["local-keys"]))),
        alias_map_json=alias_map if isinstance(alias_map, (str, bytes)) else None,
        fold=None if fold is None else int(fold),
    )


def _answer(content: RecordDict) -> SiteAnswer:
    config = content["config"]
    arrays = content.get("arrays")
    counts = config.get("counts")
    return SiteAnswer(
        metrics=dict(json.loads(str(config["metrics"]))),
        plans_sha=str(config["plans-sha256"]),
        tensors=OrderedDict(from_array_record(arrays)) if isinstance(arrays, ArrayRecord) else None,
        counts=None if counts is None else str(counts),
    )
