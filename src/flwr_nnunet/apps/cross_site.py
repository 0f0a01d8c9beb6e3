"""Evaluation across sites after the last round (run-config ``cross-site-evaluation``): a matrix of models x sites.

The rows are the final global model and, with ``cross-site-evaluation = "local-models"`` (an opt-in: it shares each
site's model with the others), each site's local model after its last round (a ``query.local_model`` message:
:func:`~flwr_nnunet.site.local_model.local_model`). Every row goes to every site in an ``evaluate`` message; each
site scores it on its own validation cases as it scores the global model every round (whole cases, sliding
window) and replies with the Dice only. The matrix shows which hospital the federation serves worst (the lowest
entry of the global row) and which site's model fails everywhere else (the lowest mean off its own column).
It is written as ``cross_site_evaluation.json`` beside the global model and logged as a table.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.supercore import log

from flwr_nnunet.apps.config_errors import ServerConfigError
from flwr_nnunet.core.codec import PayloadError, from_array_record
from flwr_nnunet.nnunet.checkpoint_io import atomic_write
from flwr_nnunet.strategy.nodes import wait_for_nodes
from flwr_nnunet.strategy.validator import error_reason, instruction_nodes

__all__ = [
    "CROSS_SITE_MODES",
    "LOCAL_MODEL_QUERY",
    "MATRIX_FILE",
    "ROW_KEY",
    "check_cross_site_settings",
    "evaluate_across_sites",
    "summarize",
]

CROSS_SITE_MODES = ("", "global", "local-models")
"""Run-config ``cross-site-evaluation``: off, the global model at every site, or also every site's local model."""

LOCAL_MODEL_QUERY = "query.local_model"
"""The message type a site answers with its local model (``client_app.py``'s ``@app.query("local_model")``)."""

ROW_KEY = "cross-site-model"
"""The evaluate message's config entry naming the row (``global`` or the site whose model it is)."""

MATRIX_FILE = "cross_site_evaluation.json"
"""The matrix, in the global model folder."""

GLOBAL = "global"


def check_cross_site_settings(settings: Any) -> None:
    """Raise :class:`ServerConfigError` naming the values when ``cross-site-evaluation`` is not one of them."""
    if settings.cross_site_evaluation not in CROSS_SITE_MODES:
        raise ServerConfigError(
            f"run-config cross-site-evaluation is {settings.cross_site_evaluation!r}: set 'global', 'local-models' "
            "(shares each site's model with the others) or '' (off)"
        )


def _local_models(grid: Any, core: Any, nodes: list[int], timeout: float) -> tuple[dict[str, Any], dict[str, str]]:
    """Each site's local model, checked against the global model's keys, shapes, dtypes and finiteness; and
    ``{site: why refused}``."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID

    messages = [
        Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type=LOCAL_MODEL_QUERY) for n in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    sent_to = instruction_nodes(messages)
    models: dict[str, Any] = {}
    refused: dict[str, str] = {}
    for reply in replies:
        node = int(reply.metadata.src_node_id)
        if node == SUPERLINK_NODE_ID:
            node = int(sent_to.get(reply.metadata.reply_to_message_id, node))
        name = core.diagnostics.name(node)
        reason = error_reason(reply, node) if reply.has_error() else None
        if reason is None:
            record = reply.content.array_records.get("arrays")
            try:
                tensors = from_array_record(record) if isinstance(record, ArrayRecord) else None
            except PayloadError as error:
                tensors, reason = None, f"undecodable payload: {error}"
            if reason is None and (tensors is None or set(tensors) != set(core.validator.reference)):
                reason = "its arrays are not the global model's alias groups"
            reason = reason or core.validator.check_tensors(tensors)
        if reason is None and (name in models or name == GLOBAL):
            reason = f"the site name {name!r} is taken"
        if reason is not None:
            log(WARNING, "cross-site evaluation: the local model of %s (node %d) is refused: %s", name, node, reason)
            refused[name] = reason
            continue
        models[name] = record
    return models, refused


def _scores(grid: Any, core: Any, nodes: list[int], row: str, record: Any, settings: Any) -> dict[str, float]:
    """``{site: mean foreground Dice}`` of the model ``record`` on every site's validation cases."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    server_round = core.checkpoints.completed_rounds
    config = {**settings.train_config(), "server-round": server_round, ROW_KEY: row}
    messages = [
        Message(
            RecordDict({"arrays": record, "config": core.wire_config(ConfigRecord(config))}),
            dst_node_id=node,
            message_type=MessageType.EVALUATE,
        )
        for node in nodes
    ]
    replies = grid.send_and_receive(messages=core.validator.expect(messages), timeout=settings.round_timeout)
    accepted = core.validator.accept(server_round, replies, weight=None, minimum=1)
    return {core.diagnostics.name(reply.node_id): float(reply.metrics["dice"]) for reply in accepted}


def summarize(matrix: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The site the global model serves worst, and the site whose local model does worst at the other sites."""
    about: dict[str, Any] = {}
    if matrix.get(GLOBAL):
        worst = min(matrix[GLOBAL], key=matrix[GLOBAL].get)
        about["served_worst"] = {"site": worst, "dice": matrix[GLOBAL][worst]}
    elsewhere = {
        row: sum(v for site, v in scores.items() if site != row) / max(1, sum(site != row for site in scores))
        for row, scores in matrix.items()
        if row != GLOBAL and any(site != row for site in scores)
    }
    if elsewhere:
        worst = min(elsewhere, key=elsewhere.get)
        about["fails_elsewhere"] = {"site": worst, "mean_dice_at_other_sites": elsewhere[worst]}
    return about


def _table(matrix: dict[str, dict[str, float]]) -> str:
    sites = sorted({site for scores in matrix.values() for site in scores})
    lines = [f"{'model':<14}" + "".join(f"{site:>10}" for site in sites)]
    for row, scores in matrix.items():
        lines.append(f"{row:<14}" + "".join(f"{scores[s]:>10.3f}" if s in scores else f"{'-':>10}" for s in sites))
    return "\n".join(lines)


def evaluate_across_sites(grid: Any, core: Any, settings: Any, folder: Path) -> dict[str, Any]:
    """After the last round: every row model evaluated at every site; the matrix written to ``folder``.

    ``core`` is the run's ``NnUNetFedAvg`` holding the final global model. Returns the file's content:
    ``{"server_round", "matrix": {row: {site: Dice}}, "served_worst", "fails_elsewhere", "refused_local_models":
    {site: why}}``.
    """
    nodes = wait_for_nodes(
        grid, settings.min_available_nodes, max(settings.node_wait, 0.0), what="cross-site evaluation"
    )
    rows: dict[str, Any] = OrderedDict([(GLOBAL, core.model.record())])
    refused: dict[str, str] = {}
    if settings.cross_site_evaluation == "local-models":
        local, refused = _local_models(grid, core, nodes, settings.round_timeout)
        rows.update(local)
    matrix = {row: _scores(grid, core, nodes, row, record, settings) for row, record in rows.items()}
    result = {"server_round": core.checkpoints.completed_rounds, "matrix": matrix, **summarize(matrix)}
    result["refused_local_models"] = refused
    text = json.dumps(result, indent=2).encode()
    atomic_write(folder / MATRIX_FILE, lambda handle: handle.write(text))
    log(INFO, "cross-site evaluation (mean Dice on each site's validation cases):\n%s", _table(matrix))
    for key, line in (
        ("served_worst", "the global model serves %s worst (%.4f)"),
        ("fails_elsewhere", "the local model of %s does worst at the other sites (%.4f)"),
    ):
        if key in result:
            log(INFO, "cross-site evaluation: " + line, *result[key].values())
    return result
