"""The ClientApp side of a run: which site a node serves, and its answers to Flower messages.

In simulation, the node's ``partition-id`` K picks ``<data-root>/site-K``; in
deployment the SuperNode's ``--node-config`` names the site's folders
(:data:`NODE_CONFIG_KEYS`). :func:`handle_message` routes ``train`` and
``evaluate`` messages to the node's :class:`~flwr_nnunet.site.site.Site`, kept
alive between rounds where the process survives. In deployment the ClientApp
first hands them, unread, to the site's warm worker where one runs
(:mod:`flwr_nnunet.apps.warm_forwarding`, without importing this module), which
answers them with :func:`answer_forwarded`: the same checks and reply.

Every instruction is checked whole before the site's trainer is touched (its
records, every config entry, the decoded arrays, then the site's own checks):
a malformed one gets an error reply naming the problem and leaves the site's
trainer and state file as they were. No exception leaves :func:`handle_message`.
"""

from __future__ import annotations

import json
import os
import traceback
from collections import OrderedDict
from collections.abc import Callable, Mapping
from logging import ERROR
from pathlib import Path
from typing import Any

import torch
from flwr.supercore import log

from flwr_nnunet.apps.dp_clipping import CLIENT_DP_MODES, dp_clipping_mod
from flwr_nnunet.apps.run_config import data_root, run_config_value
from flwr_nnunet.apps.warm_forwarding import (
    decode_forwarded,
    encode_content,
    refusal,
    site_name,
    site_results,
)
from flwr_nnunet.core.codec import from_array_record, to_array_record
from flwr_nnunet.core.delta_codec import COMPRESSION_KEY
from flwr_nnunet.errors import FlwrNnUNetError
from flwr_nnunet.site.compressed_updates import compress_reply_content, received_model
from flwr_nnunet.site.crossval_ensemble import ensemble_counts, ensemble_request
from flwr_nnunet.site.crossval_validation import COUNTS_KEY, FOLD_KEY
from flwr_nnunet.site.local_model import local_model
from flwr_nnunet.site.request import SiteRequest
from flwr_nnunet.site.site import Site
from flwr_nnunet.site.spec import (
    DEFAULT_MAX_LOCAL_EPOCHS,
    InstructionError,
    SiteError,
    SiteSpec,
    TrainOptions,
    checked_dataset_name,
    find_site_dataset,
    find_site_plans,
)
from flwr_nnunet.site.warm_channel import WarmSiteRefused

__all__ = [
    "CLIENT_DP_MODES",
    "NODE_CONFIG_KEYS",
    "answer_forwarded",
    "dp_clipping_mod",
    "handle_ensemble_query",
    "handle_local_model_query",
    "handle_message",
    "handle_query",
    "live_site",
    "site_name",
    "site_spec",
]

NODE_CONFIG_KEYS = {
    "nnunet-preprocessed": "the site's nnUNet_preprocessed root (default: the nnUNet_preprocessed variable)",
    "nnunet-results": "where the site's trainer writes its logs and round state (default: nnUNet_results)",
    "site-name": "name in logs and errors (default: node-<node id>)",
    "device": "overrides run-config 'device' on this node (auto, cpu, cuda)",
    "fold": "overrides run-config 'fold' on this node",
    "max-local-epochs": f"the most local epochs this site trains per round (default {DEFAULT_MAX_LOCAL_EPOCHS})",
    "nnunet-raw": "the site's nnUNet_raw root, read by federated planning (default: the nnUNet_raw variable)",
    "dataset": "this site's dataset folder Dataset<ID>_<Name> in its nnU-Net roots (default: run-config 'dataset')",
    "batch-size": "a smaller batch than the plans' for this site's GPU memory (its epochs run more iterations, so "
    "they see as many patches)",
    "patch-size": "a smaller patch than the plans', e.g. '96,96,96' (each edge a multiple of the network's pooling)",
    "plans": "this site's own plans (a <plans>.json in its preprocessed dataset folder, its data preprocessed with "
    "them) instead of run-config 'plans'; trained only with run-config layer-matching='role', the server holding a copy",
    "warm-site": "true: start the site's warm worker on first use; false: always train in the ClientApp's process "
    "(default: use the warm worker when one runs, as configs/deployment/supernode.sh starts it)",
}
"""Deployment: ``flower-supernode --node-config "nnunet-preprocessed='/data/pp' nnunet-results='/data/res'"``."""

_LIVE: dict[tuple[int, SiteSpec], Site] = {}


def _fold(value: Any) -> int | str:
    return "all" if str(value) == "all" else int(value)


def site_spec(run_config: Mapping[str, Any], node_config: Mapping[str, Any], node_id: int = 0) -> SiteSpec:
    """The site a ClientApp serves, from the run config and the node config.

    In simulation (``partition-id`` in the node config) site K uses
    ``<data-root>/site-K/nnUNet_preprocessed`` and ``.../nnUNet_results``, and
    its own dataset name is found in its folders
    (:func:`~flwr_nnunet.site.spec.find_site_dataset`), and with run-config
    ``layer-matching = "role"`` its own plans too (:func:`~flwr_nnunet.site.spec.find_site_plans`). In
    deployment the SuperNode's node config names the folders, the dataset and
    the site's own plans (:data:`NODE_CONFIG_KEYS`), falling back to nnU-Net's
    environment variables and the run config's ``dataset`` and ``plans``, the federation's.

    Raises
    ------
    SiteError
        If a deployed node has neither ``nnunet-preprocessed`` nor ``nnUNet_preprocessed``, its node-config
        ``dataset`` is not of the form ``Dataset<ID>_<Name>``, or a simulated site's folders hold several
        datasets or (``layer-matching = "role"``) several plans that could be its own.
    """
    federation, name = str(run_config_value(run_config, "dataset")), site_name(node_config, node_id)
    plans = str(node_config.get("plans", run_config_value(run_config, "plans")))
    if "partition-id" in node_config:
        folder = data_root(run_config) / name
        preprocessed, results = folder / "nnUNet_preprocessed", folder / "nnUNet_results"
        dataset = find_site_dataset(federation, (folder / "nnUNet_raw", preprocessed), name)
        if run_config_value(run_config, "layer-matching") and "plans" not in node_config:
            plans = find_site_plans(plans, preprocessed / dataset, name)
    else:
        preprocessed = node_config.get("nnunet-preprocessed") or os.environ.get("nnUNet_preprocessed")
        results = site_results(node_config)
        if not preprocessed or not results:
            raise SiteError(
                f"{name}: start the SuperNode with --node-config \"nnunet-preprocessed='<folder>' "
                "nnunet-results='<folder>'\" (or set nnUNet_preprocessed and nnUNet_results)"
            )
        dataset = checked_dataset_name(node_config["dataset"], name) if "dataset" in node_config else federation
    return SiteSpec(
        name=name,
        dataset=dataset,
        nnunet_preprocessed=Path(preprocessed).expanduser().absolute(),
        nnunet_results=Path(results).expanduser().absolute(),
        configuration=str(run_config_value(run_config, "configuration")),
        plans=plans,
        trainer=str(run_config_value(run_config, "trainer")),
        fold=_fold(node_config.get("fold", run_config_value(run_config, "fold"))),
        device=str(node_config.get("device", run_config_value(run_config, "device"))),
        batch_size=_batch_size(node_config.get("batch-size"), name),
        patch_size=_patch_size(node_config.get("patch-size"), name),
    )


def _batch_size(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SiteError(f"{name}: node-config 'batch-size' must be an integer >= 1, not {value!r}")
    return value


def _patch_size(value: Any, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    try:
        edges = tuple(int(str(part).strip()) for part in parts)
    except ValueError:
        edges = ()
    if not edges or any(edge < 1 for edge in edges):
        raise SiteError(f"{name}: node-config 'patch-size' must be edges like '96,96,96', not {value!r}")
    return edges


def live_site(run_id: int, spec: SiteSpec) -> Site:
    """The site object of this run in this process (kept between rounds where the process survives)."""
    for key in [key for key in _LIVE if key[0] != run_id]:
        del _LIVE[key]
    return _LIVE.setdefault((run_id, spec), Site(spec))


_DECODE_ERRORS = (FlwrNnUNetError, ValueError, KeyError, TypeError)
"""What decoding a malformed ``arrays`` record raises (the codec's PayloadError is a ValueError)."""


def max_local_epochs(node_config: Mapping[str, Any]) -> int:
    """This site's bound on ``local-epochs`` (node config ``max-local-epochs``, default :data:`DEFAULT_MAX_LOCAL_EPOCHS`).

    Raises
    ------
    SiteError
        If the node config's value is not an integer >= 1.
    """
    value = node_config.get("max-local-epochs", DEFAULT_MAX_LOCAL_EPOCHS)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SiteError(f"node-config 'max-local-epochs' must be an integer >= 1, not {value!r}")
    return value


def _record(content: Any, name: str, kind: type) -> Any:
    record = content.get(name) if name in content else None
    if not isinstance(record, kind):
        found = "none" if record is None else type(record).__name__
        raise InstructionError(f"the instruction has no {kind.__name__} {name!r} (found {found}); it needs one")
    return record


def _local_keys(config: Any) -> list[str]:
    value = config.get("local-keys", "[]")
    try:
        keys = json.loads(value) if isinstance(value, (str, bytes)) else None
    except ValueError as error:
        raise InstructionError(f"config 'local-keys' is not JSON ({error})") from None
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise InstructionError("config 'local-keys' must be the JSON text of a list of key names")
    return keys


def _received(message: Any, *, max_epochs: int) -> tuple[OrderedDict[str, torch.Tensor], Any, TrainOptions, list[str]]:
    """The instruction's tensors, config, options and local keys, every part checked (nothing else is touched).

    Raises
    ------
    InstructionError
        Naming the first missing record, malformed config entry or undecodable array.
    """
    from flwr.app import ArrayRecord, ConfigRecord

    if message.has_error() or not message.has_content():
        raise InstructionError("the instruction carries no content")
    config = _record(message.content, "config", ConfigRecord)
    arrays = _record(message.content, "arrays", ArrayRecord)
    options = TrainOptions.from_config(config, max_local_epochs=max_epochs)
    local_keys = _local_keys(config)
    for key in ("alias-map", "plans-sha256"):
        if key in config and not isinstance(config[key], (str, bytes) if key == "alias-map" else str):
            raise InstructionError(f"config {key!r} must be text, not {type(config[key]).__name__}")
    try:
        received = from_array_record(arrays)
    except _DECODE_ERRORS as error:
        raise InstructionError(f"the instruction's 'arrays' cannot be decoded ({error})") from None
    return received, config, options, local_keys


def _crossval_fold(config: Any) -> int:
    """The fold of a cross-validation request (config :data:`FOLD_KEY`: an integer >= 0)."""
    value = config[FOLD_KEY]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InstructionError(f"config {FOLD_KEY!r} must be a cross-validation fold (an integer >= 0), not {value!r}")
    return value


def _unexpected(message: Any, error: Exception, name: str) -> Any:
    """An error reply for an exception nobody raised on purpose, logged with its traceback."""
    log(ERROR, "%s: unexpected error\n%s", name, "".join(traceback.format_exception(error)))
    return refusal(message, f"{name}: unexpected {type(error).__name__}: {error}")


def handle_message(message: Any, context: Any, *, train: bool) -> Any:
    """Answer a ``train`` or ``evaluate`` message for the site this node serves.

    Replies ``RecordDict({"arrays", "metrics", "config"})`` for train and
    ``RecordDict({"metrics", "config"})`` for evaluate; ``config`` carries the
    site's ``plans-sha256`` and ``site-name``. An evaluate message whose config
    holds ``crossval-fold`` asks for the fold's whole-case validation
    (:meth:`~flwr_nnunet.site.site.Site.crossval_validate`): the reply's metrics
    are ``num-examples`` (the cases) and its config adds ``crossval-counts``, the
    per-case counts as JSON text. A site that cannot take part, or
    a malformed instruction (see :func:`_received` and
    :meth:`~flwr_nnunet.site.spec.TrainOptions.from_config`), gets an error reply
    naming the problem, the site's trainer and state file untouched, and the run
    goes on without it. No exception escapes: an unexpected one is logged with
    its traceback and answered with an error reply too.
    """
    try:
        return _reply(message, context, train=train, site_for=lambda request: live_site(request.run_id, request.spec))
    except Exception as error:  # noqa: BLE001 - nothing may end the node's answer; logged with its traceback
        return _unexpected(message, error, _node_name(context))


def answer_forwarded(frames: list[bytes], site_for: Callable[[SiteRequest], Site]) -> bytes:
    """A warm worker's answer to the frames of a message the ClientApp forwarded
    (:func:`~flwr_nnunet.apps.warm_forwarding.forwarded`): checked and answered as :func:`handle_message` does, by
    ``site_for``'s site; the reply's content as bytes.

    Raises
    ------
    WarmSiteRefused
        The reason of the error reply :func:`handle_message` would give (the ClientApp gives it).
    """
    from flwr.app import MessageType

    message, context = decode_forwarded(frames)
    reply = _reply(message, context, train=message.metadata.message_type == MessageType.TRAIN, site_for=site_for)
    if reply.has_error():
        raise WarmSiteRefused(reply.error.reason)
    return encode_content(reply.content)


def _node_name(context: Any) -> str:
    try:
        return site_name(context.node_config, context.node_id)
    except Exception:  # noqa: BLE001 - a malformed partition-id: the node's id names it
        return f"node-{getattr(context, 'node_id', '?')}"


def _reply(message: Any, context: Any, *, train: bool, site_for: Callable[[SiteRequest], Site]) -> Any:
    """:func:`handle_message`'s reply, answered by ``site_for``'s site; an unexpected exception escapes."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    name = _node_name(context)
    try:
        spec = site_spec(context.run_config, context.node_config, context.node_id)
        try:
            received, config, options, local_keys = _received(message, max_epochs=max_local_epochs(context.node_config))
            if COMPRESSION_KEY in config:
                received = received_model(spec.output_folder, config, dict(message.content.items()))
        except InstructionError as error:
            raise InstructionError(f"{name}: the server's instruction is refused: {error}") from None
        crossval = not train and FOLD_KEY in config  # after a cross-validation fold: whole-case validation, counts
        request = SiteRequest(
            kind="train" if train else "crossval" if crossval else "evaluate",
            run_id=context.run_id,
            spec=spec,
            options=options,
            received=received,
            plans_sha=config.get("plans-sha256"),
            local_keys=tuple(local_keys),
            alias_map_json=config.get("alias-map"),
            fold=_crossval_fold(config) if crossval else None,
        )
        answered = site_for(request).answer(request)
        counts = {COUNTS_KEY: answered.counts} if answered.counts is not None else {}
        about = ConfigRecord({"plans-sha256": answered.plans_sha, "site-name": spec.name, **counts})
        content = {"metrics": MetricRecord(answered.metrics), "config": about}
        if answered.tensors is not None:
            content["arrays"] = to_array_record(answered.tensors)
        if COMPRESSION_KEY in config:
            compress_reply_content(spec.output_folder, options.server_round, content, received, config)
        return Message(RecordDict(content), reply_to=message)
    except FlwrNnUNetError as error:
        text = str(error)
        return refusal(message, text if text.startswith(f"{name}:") else f"{name}: {text}")


def _answer_query(message: Any, context: Any, answer: Any) -> Any:
    """Reply to a ``query`` message with ``answer(spec, config)``'s records; a refusal naming the site otherwise.

    No exception escapes: one nobody raised on purpose is logged with its traceback and answered with an error.
    """
    from flwr.app import Message, RecordDict

    name = f"node-{getattr(context, 'node_id', '?')}"
    try:
        name = site_name(context.node_config, context.node_id)
        spec = site_spec(context.run_config, context.node_config, context.node_id)
        if message.has_error() or not message.has_content() or "config" not in message.content:
            raise InstructionError("the query carries no config record")
        return Message(RecordDict(answer(spec, message.content["config"])), reply_to=message)
    except (FlwrNnUNetError, FileNotFoundError) as error:
        text = str(error)
        return refusal(message, text if text.startswith(f"{name}:") else f"{name}: {text}")
    except Exception as error:  # noqa: BLE001 - nothing may end the node's answer; logged with its traceback
        return _unexpected(message, error, name)


def handle_query(message: Any, context: Any) -> Any:
    """Answer a planning ``query`` message (:mod:`flwr_nnunet.apps.site_planning`) for this node's site, or the
    ``site-plans`` query of a run with ``layer-matching = "role"`` (which plans the site trains).

    Replies ``RecordDict({"config": {"planning-stage", "site-name", "planning": <JSON answer>}})``; a
    query the site cannot answer gets an error reply naming the site and the problem. No exception escapes.
    """
    from flwr.app import ConfigRecord

    from flwr_nnunet.apps.site_planning import SITE_PLANS_STAGE, answer_planning, answer_site_plans, raw_dataset_folder

    def planning(spec: SiteSpec, config: Any) -> dict:
        if config.get("planning-stage") == SITE_PLANS_STAGE:
            stage, answer = SITE_PLANS_STAGE, answer_site_plans(Site(spec))
        else:
            raw = raw_dataset_folder(context.run_config, context.node_config, spec.dataset)
            stage, answer = answer_planning(config, raw, spec.dataset_folder)
        return {
            "config": ConfigRecord({"planning-stage": stage, "site-name": spec.name, "planning": json.dumps(answer)})
        }

    return _answer_query(message, context, planning)


def handle_ensemble_query(message: Any, context: Any) -> Any:
    """Answer a ``query.ensemble`` message: this site's ensemble of two configurations' cross-validation.

    The site ensembles its own validation softmax (:func:`~flwr_nnunet.site.crossval_ensemble.ensemble_counts`)
    and replies ``RecordDict({"metrics": {"num-examples"}, "config": {"site-name", "crossval-counts"}})``: the
    per-case counts, as a fold's validation replies. No exception escapes.
    """
    from flwr.app import ConfigRecord, MetricRecord

    def ensemble(spec: SiteSpec, config: Any) -> dict:
        payload = ensemble_counts(spec, *ensemble_request(config))
        about = {"site-name": spec.name, COUNTS_KEY: json.dumps(payload, allow_nan=False)}
        return {"metrics": MetricRecord({"num-examples": len(payload)}), "config": ConfigRecord(about)}

    return _answer_query(message, context, ensemble)


def handle_local_model_query(message: Any, context: Any) -> Any:
    """Answer a ``query.local_model`` message: this site's model after its last round, for cross-site evaluation.

    Only where the run shares local models (run-config ``cross-site-evaluation = "local-models"``); replies
    ``RecordDict({"arrays": <canonical tensors>, "config": {"site-name"}})``. No exception escapes.
    """
    from flwr.app import ConfigRecord

    def shared(spec: SiteSpec, config: Any) -> dict:
        if run_config_value(context.run_config, "cross-site-evaluation") != "local-models":
            raise InstructionError(
                "this run does not share the sites' local models (run-config cross-site-evaluation is not "
                "'local-models')"
            )
        return {"arrays": to_array_record(local_model(spec)), "config": ConfigRecord({"site-name": spec.name})}

    return _answer_query(message, context, shared)
