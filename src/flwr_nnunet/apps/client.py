"""The ClientApp side of a run: which site a node serves, and its answers to Flower messages.

In simulation, the node's ``partition-id`` K picks ``<data-root>/site-K``; in
deployment the SuperNode's ``--node-config`` names the site's folders
(:data:`NODE_CONFIG_KEYS`). :func:`handle_message` routes ``train`` and
``evaluate`` messages to the node's :class:`~flwr_nnunet.site.site.Site`, kept
alive between rounds where the process survives.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from logging import ERROR
from pathlib import Path
from typing import Any

import torch
from flwr.supercore import log

from flwr_nnunet.apps.run_config import data_root, run_config_value
from flwr_nnunet.core.codec import from_array_record, to_array_record
from flwr_nnunet.nnunet.digests import plans_sha256
from flwr_nnunet.site.site import Site
from flwr_nnunet.site.spec import SiteError, SiteSpec, TrainOptions

__all__ = [
    "CLIENT_DP_MODES",
    "NODE_CONFIG_KEYS",
    "dp_clipping_mod",
    "handle_message",
    "live_site",
    "site_spec",
]

NODE_CONFIG_KEYS = {
    "nnunet-preprocessed": "the site's nnUNet_preprocessed root (default: the nnUNet_preprocessed variable)",
    "nnunet-results": "where the site's trainer writes its logs and round state (default: nnUNet_results)",
    "site-name": "name in logs and errors (default: node-<node id>)",
    "device": "overrides run-config 'device' on this node (auto, cpu, cuda)",
    "fold": "overrides run-config 'fold' on this node",
}
"""Deployment: ``flower-supernode --node-config "nnunet-preprocessed='/data/pp' nnunet-results='/data/res'"``."""

_LIVE: dict[tuple[int, SiteSpec], Site] = {}


def _fold(value: Any) -> int | str:
    return "all" if str(value) == "all" else int(value)


def site_spec(run_config: Mapping[str, Any], node_config: Mapping[str, Any], node_id: int = 0) -> SiteSpec:
    """The site a ClientApp serves, from the run config and the node config.

    In simulation (``partition-id`` in the node config) site K uses
    ``<data-root>/site-K/nnUNet_preprocessed`` and ``.../nnUNet_results``. In
    deployment the SuperNode's node config names the folders
    (:data:`NODE_CONFIG_KEYS`), falling back to nnU-Net's environment variables.

    Raises
    ------
    SiteError
        If a deployed node has neither ``nnunet-preprocessed`` nor ``nnUNet_preprocessed``.
    """
    if "partition-id" in node_config:
        name = f"site-{int(node_config['partition-id'])}"
        folder = data_root(run_config) / name
        preprocessed, results = folder / "nnUNet_preprocessed", folder / "nnUNet_results"
    else:
        name = str(node_config.get("site-name", f"node-{node_id}"))
        preprocessed = node_config.get("nnunet-preprocessed") or os.environ.get("nnUNet_preprocessed")
        results = node_config.get("nnunet-results") or os.environ.get("nnUNet_results")
        if not preprocessed or not results:
            raise SiteError(
                f"{name}: start the SuperNode with --node-config \"nnunet-preprocessed='<folder>' "
                "nnunet-results='<folder>'\" (or set nnUNet_preprocessed and nnUNet_results)"
            )
    return SiteSpec(
        name=name,
        dataset=str(run_config_value(run_config, "dataset")),
        nnunet_preprocessed=Path(preprocessed).expanduser().absolute(),
        nnunet_results=Path(results).expanduser().absolute(),
        configuration=str(run_config_value(run_config, "configuration")),
        plans=str(run_config_value(run_config, "plans")),
        trainer=str(run_config_value(run_config, "trainer")),
        fold=_fold(node_config.get("fold", run_config_value(run_config, "fold"))),
        device=str(node_config.get("device", run_config_value(run_config, "device"))),
    )


def live_site(run_id: int, spec: SiteSpec) -> Site:
    """The site object of this run in this process (kept between rounds where the process survives)."""
    for key in [key for key in _LIVE if key[0] != run_id]:
        del _LIVE[key]
    return _LIVE.setdefault((run_id, spec), Site(spec))


def _received(message: Any) -> tuple[OrderedDict[str, torch.Tensor], Any, TrainOptions, list[str]]:
    config = message.content["config"]
    local_keys = json.loads(config["local-keys"]) if "local-keys" in config else []
    return from_array_record(message.content["arrays"]), config, TrainOptions.from_config(config), local_keys


def _refusal(message: Any, error: SiteError) -> Any:
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    log(ERROR, "%s", error)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(error)), reply_to=message)


def handle_message(message: Any, context: Any, *, train: bool) -> Any:
    """Answer a ``train`` or ``evaluate`` message for the site this node serves.

    Replies ``RecordDict({"arrays", "metrics", "config"})`` for train and
    ``RecordDict({"metrics", "config"})`` for evaluate; ``config`` carries the
    site's ``plans-sha256`` and ``site-name``. A site that cannot take part
    replies with an error naming the fix, and the run goes on without it.
    """
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    try:
        spec = site_spec(context.run_config, context.node_config, context.node_id)
        site = live_site(context.run_id, spec)
        received, config, options, local_keys = _received(message)
        plans_sha, alias_map = config.get("plans-sha256"), config.get("alias-map")
        if train:
            tensors, metrics = site.train(received, options, plans_sha, local_keys, alias_map_json=alias_map)
        else:
            metrics = site.evaluate(received, options, plans_sha, local_keys, alias_map_json=alias_map)
    except SiteError as error:
        return _refusal(message, error)
    about = ConfigRecord({"plans-sha256": plans_sha256(site.check()), "site-name": spec.name})
    content = {"metrics": MetricRecord(metrics), "config": about}
    if train:
        content["arrays"] = to_array_record(tensors)
    return Message(RecordDict(content), reply_to=message)


CLIENT_DP_MODES = ("client-fixed", "client-adaptive")
"""Run-config ``dp`` values that clip each site's update on the site (Flower's client-side clipping mods)."""


def dp_clipping_mod(message: Any, context: Any, call_next: Any) -> Any:
    """ClientApp mod: Flower's client-side DP clipping of training replies when run-config ``dp`` asks for it.

    With ``dp = "client-fixed"`` / ``"client-adaptive"`` the server's DP wrapper
    sends a clipping norm and each site must clip its update before replying
    (``fixedclipping_mod`` / ``adaptiveclipping_mod``); the update norm then
    counts each shared tensor once, since the records are canonical. Other
    messages and runs pass through unchanged.
    """
    from flwr.app import MessageType
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

    mode = str(context.run_config.get("dp", "") or "")
    if message.metadata.message_type != MessageType.TRAIN or mode not in CLIENT_DP_MODES:
        return call_next(message, context)
    mod = fixedclipping_mod if mode == "client-fixed" else adaptiveclipping_mod
    return mod(message, context, call_next)
