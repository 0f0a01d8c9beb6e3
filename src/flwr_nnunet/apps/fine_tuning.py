"""After the last round: every site fine-tunes the global model into its personal model (run-config
``fine-tune-epochs``).

One Flower ``evaluate`` message per site carries the final global model and ``fine-tune-epochs``; the site
fine-tunes, keeps the result only where its validation Dice beats the global model's, writes its personal model
at the site (:meth:`flwr_nnunet.site.site.Site.fine_tune`) and answers metrics only. The server logs one line
per site and files the metrics in the run's history under ``fine-tune``.
"""

from __future__ import annotations

from logging import INFO
from typing import Any

from flwr.app import ConfigRecord
from flwr.supercore import log

__all__ = ["fine_tune_sites"]


def fine_tune_sites(grid: Any, core: Any, settings: Any, history: Any) -> list[Any]:
    """Ask every site to fine-tune the global model of ``core`` (an ``NnUNetFedAvg``); the accepted replies.

    ``settings`` is the run's :class:`~flwr_nnunet.apps.run_config.RunSettings`; ``history`` its
    :class:`~flwr_nnunet.apps.history.RunHistory`. Replies are checked as evaluation replies; a site that fails
    is logged and left out.
    """
    server_round = core.checkpoints.completed_rounds
    config = ConfigRecord({**settings.train_config(), "fine-tune-epochs": settings.fine_tune_epochs})
    log(INFO, "flwr-nnunet: fine-tuning the global model at every site (%d epochs)", settings.fine_tune_epochs)
    messages = core.configure_evaluate(server_round, None, config, grid)
    replies = grid.send_and_receive(messages=messages, timeout=settings.round_timeout)
    accepted = core.validator.accept(server_round, replies, weight=None, minimum=1)
    history.note_fine_tune([reply.message.content for reply in accepted], core.weighted_by_key)
    for reply in accepted:
        metrics = reply.metrics
        kept = metrics.get("fine-tune-kept") == 1
        log(
            INFO,
            "flwr-nnunet: site %s keeps %s as its personal model (validation Dice %.4f; global model %.4f)",
            core.diagnostics.name(reply.node_id),
            "the fine-tuned model" if kept else "the global model",
            float(metrics.get("personal-dice", 0.0)),
            float(metrics.get("dice", 0.0)),
        )
    return accepted
