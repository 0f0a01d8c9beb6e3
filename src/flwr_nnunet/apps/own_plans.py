"""Sites that keep their own plans (run-config ``layer-matching = "role"``): the server side of such a run.

A site names its plans in its node config (``plans``); the server holds a copy of every plans a site may train in
its dataset folder (plans are not patient data: the consortium shares them), builds one global network and model
folder per plans (:func:`build_role_strategy`), and before round 1 asks every connected site which plans it trains
(the ``site-plans`` query, :func:`survey_site_plans`). A site whose plans the server does not hold, or holds
with another digest, is left out by name with the fix; a site that connects later is asked before its first
instruction. The rounds are :class:`~flwr_nnunet.strategy.role_fedavg.RoleMatchedFedAvg`'s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from logging import INFO, WARNING
from typing import Any

from flwr.supercore import log

from flwr_nnunet.apps.config_errors import ServerConfigError

__all__ = [
    "LAYER_MATCHINGS",
    "build_role_strategy",
    "check_layer_matching_settings",
    "held_plans",
    "identify_site_plans",
    "survey_site_plans",
]

LAYER_MATCHINGS = ("", "role")
"""Run-config ``layer-matching``: every site trains the federation's plans, or sites keep theirs (layers by role)."""


def _unsupported(settings: Any) -> list[str]:
    """``"<key>=<value> (set <fix>)"`` for each setting a ``layer-matching = "role"`` run does not support yet."""
    checks = (
        (
            settings.planning != "fixed",
            "planning",
            settings.planning,
            "planning='fixed' with every plans on the server",
        ),
        (settings.make_demo, "make-demo", settings.make_demo, "make-demo=false and data-root to the sites' data"),
        (
            settings.strategy.strip().lower() != "fedavg",
            "strategy",
            settings.strategy,
            "strategy='fedavg' (proximal-mu > 0 adds FedProx's term)",
        ),
        (bool(settings.dp), "dp", settings.dp, "dp=''"),
        (settings.compression != "none", "compression", settings.compression, "compression='none'"),
        (settings.streaming, "streaming", settings.streaming, "streaming=false"),
        (bool(settings.personalization), "personalization", settings.personalization, "personalization=''"),
        (settings.fine_tune_epochs != 0, "fine-tune-epochs", settings.fine_tune_epochs, "fine-tune-epochs=0"),
        (settings.crossval, "crossval", settings.crossval, "crossval=false"),
        (
            bool(settings.cross_site_evaluation),
            "cross-site-evaluation",
            settings.cross_site_evaluation,
            "cross-site-evaluation=''",
        ),
        (
            bool(settings.find_best_configuration),
            "find-best-configuration",
            settings.find_best_configuration,
            "find-best-configuration=''",
        ),
    )
    return [f"{key}={json.dumps(value)} (set {fix})" for bad, key, value, fix in checks if bad]


def check_layer_matching_settings(settings: Any) -> None:
    """Run-config ``layer-matching`` must be known, and with ``"role"`` the rest of the run config supported.

    Raises
    ------
    ServerConfigError
        Naming each key to change, before any data are made or network built.
    """
    if settings.layer_matching not in LAYER_MATCHINGS:
        raise ServerConfigError(
            f"unknown layer-matching {settings.layer_matching!r}: set run-config layer-matching to '' (every site "
            "trains the federation's plans) or 'role' (sites keep their own plans, layers matched by role)"
        )
    unsupported = _unsupported(settings) if settings.layer_matching else []
    if unsupported:
        raise ServerConfigError(
            f"run-config layer-matching='{settings.layer_matching}' does not support {'; '.join(unsupported)} yet"
        )


def held_plans(settings: Any, main: dict) -> dict[str, dict]:
    """Plans name -> plans of every plans file in the server's dataset folder with the run's configuration,
    run-config ``plans`` (``main``) first; a file named otherwise than its ``plans_name``, or without the
    configuration, is left out with one log line."""
    from flwr_nnunet.site.spec import plans_files

    held = {settings.plans: main}
    for name, plans in plans_files(settings.server_dataset_folder).items():
        if name == settings.plans:
            continue
        if plans["plans_name"] != name:
            why = f"its plans_name is {plans['plans_name']!r}: name the file <plans_name>.json"
        elif settings.configuration not in plans["configurations"]:
            why = f"it has no configuration {settings.configuration!r}"
        else:
            held[name] = plans
            continue
        log(
            WARNING,
            "flwr-nnunet: layer-matching='role': %s.json left out: %s",
            settings.server_dataset_folder / name,
            why,
        )
    return held


def build_role_strategy(
    settings: Any, run_config: Mapping[str, Any], plans: dict, dataset_json: dict, fingerprint: dict
) -> Any:
    """:class:`~flwr_nnunet.strategy.role_fedavg.RoleMatchedFedAvg` over every plans the server holds
    (:func:`held_plans`, ``plans`` the run's main one): each plans' network built from run-config ``seed``, its
    model folder ``<trainer>__<plans>__<configuration>/fold_all`` under ``results-dir``. A site is asked which plans
    it trains (:func:`identify_site_plans`) before its first instruction."""
    from flwr_nnunet.apps.server_model import (
        global_model_folder,
        global_network,
        round_options,
        strategy_options_named,
    )
    from flwr_nnunet.strategy.role_fedavg import RoleMatchedFedAvg

    held = held_plans(settings, plans)
    log(INFO, "flwr-nnunet: layer-matching='role': the server holds plans %s", ", ".join(held))
    with strategy_options_named(settings):
        return RoleMatchedFedAvg(
            {name: global_network(settings, one, dataset_json) for name, one in held.items()},
            held,
            model_folders={
                name: global_model_folder(settings, one, dataset_json, fingerprint) for name, one in held.items()
            },
            identify=lambda grid, nodes: identify_site_plans(grid, nodes, settings, held),
            run_config=dict(run_config),
            **round_options(settings),
            **settings.strategy_options,
        )


def identify_site_plans(
    grid: Any, nodes: list[int], settings: Any, held: Mapping[str, dict]
) -> tuple[dict[int, str], dict[int, str]]:
    """Ask ``nodes`` which plans they train (the ``site-plans`` query, waiting ``round-timeout``):
    ``({node: plans name}, {node: why it is left out})``, each node logged once.

    A node is left out when its plans are not among ``held`` (the server's), differ from the server's copy, or
    it answered an error or nothing.
    """
    from flwr_nnunet.apps.planning_phase import query_sites
    from flwr_nnunet.apps.site_planning import SITE_PLANS_STAGE
    from flwr_nnunet.nnunet.digests import plans_sha256

    folder = settings.server_dataset_folder
    answers, problems, lost = query_sites(grid, nodes, SITE_PLANS_STAGE, {}, float(settings.round_timeout))
    found, refused = {}, {**problems, **lost}
    for node, (site, answer) in answers.items():
        name, digest = str(answer.get("plans")), answer.get("plans-sha256")
        if name not in held:
            refused[node] = (
                f"{site} trains plans {name!r}, which the server does not hold: copy the site's {name}.json into "
                f"{folder} (plans are not patient data), then submit the run again"
            )
        elif digest != plans_sha256(held[name]):
            refused[node] = (
                f"{site}'s {name}.json differs from the server's copy in {folder} (plans-sha256 {str(digest)[:12]}... "
                f"!= {plans_sha256(held[name])[:12]}...): copy the site's plans file to the server (or the server's "
                "to the site, then preprocess with it)"
            )
        else:
            found[node] = name
            log(INFO, "flwr-nnunet: layer-matching='role': %s (node %d) trains plans %s", site, node, name)
    for node, why in refused.items():
        log(WARNING, "flwr-nnunet: layer-matching='role': node %d is left out: %s", node, why)
    return found, refused


def survey_site_plans(grid: Any, strategy: Any, settings: Any) -> None:
    """Before round 1: wait for ``min-available-nodes`` (at most ``node-wait`` seconds) and ask each connected node
    which plans it trains (:meth:`RoleMatchedFedAvg.identify_nodes`).

    Raises
    ------
    ServerConfigError
        If fewer than ``min-train-nodes`` sites train plans the server holds, naming each site left out and why.
    """
    from flwr_nnunet.strategy.nodes import wait_for_nodes

    wait = float("inf") if settings.node_wait < 0 else settings.node_wait
    nodes = wait_for_nodes(grid, settings.min_available_nodes, wait, what="layer-matching survey")
    strategy.identify_nodes(grid, sorted(int(n) for n in nodes))
    if len(strategy.site_plans) < settings.min_train_nodes:
        named = "; ".join(f"node {node}: {why}" for node, why in strategy.refused.items()) or "no site answered"
        raise ServerConfigError(
            f"layer-matching='role': {len(strategy.site_plans)} site(s) train plans the server holds, fewer than "
            f"min-train-nodes={settings.min_train_nodes}: {named}. Nothing was trained; fix the sites named, or lower "
            "run-config min-train-nodes"
        )
