"""The round loop: Flower's ``Strategy.start``, continuing a resumed run and checkpointing every round.

:func:`run_rounds` works on any Flower ``Strategy`` plus the
:class:`~flwr_nnunet.strategy.global_model.GlobalModel` it trains and the
run's :class:`~flwr_nnunet.strategy.checkpoints.RunCheckpoints`. With
``streaming=True`` the training half of each round of a strategy that streams
runs through :func:`~flwr_nnunet.strategy.stream_round.stream_train_round`
(replies folded as they arrive) instead of ``send_and_receive`` then
``aggregate_train``.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info
from flwr.supercore import log

from flwr_nnunet.strategy.checkpoints import RunCheckpoints
from flwr_nnunet.strategy.global_model import GlobalModel
from flwr_nnunet.strategy.nodes import configure_round
from flwr_nnunet.strategy.stream_round import LateReplies, stream_train_round
from flwr_nnunet.strategy.streaming import streams

__all__ = ["run_rounds"]


# pylint: disable=too-many-arguments,too-many-locals
def run_rounds(
    strategy: Strategy,
    model: GlobalModel,
    checkpoints: RunCheckpoints,
    grid: Grid,
    *,
    initial_arrays: ArrayRecord | None = None,
    num_rounds: int = 3,
    timeout: float = 3600,
    train_config: ConfigRecord | None = None,
    evaluate_config: ConfigRecord | None = None,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    on_round_end: Callable[[int], None] | None = None,
    node_wait: float | None = None,
    streaming: bool = False,
    quorum: float | None = None,
    grace: float = 0.0,
    poll_interval: float = 0.1,
) -> Result:
    """Flower's round loop on ``model``, continuing after ``checkpoints.completed_rounds``.

    Like ``Strategy.start`` but: ``initial_arrays`` default to the model (when
    given, they are loaded into it, except after a resume); rounds run from
    ``checkpoints.completed_rounds + 1`` to ``num_rounds`` (the run's total);
    every ArrayRecord a round returns is written into the model; after each
    round ``checkpoint_latest.pth`` is written, then ``on_round_end(round)`` is
    called; at the end ``checkpoint_final.pth`` is written and
    ``result.arrays`` is the global model even when no round changed it.

    Streaming options (training rounds; evaluation always uses ``send_and_receive``):

    - ``streaming``: fold each training reply into a running sum as it arrives
      (:func:`~flwr_nnunet.strategy.stream_round.stream_train_round`) when the
      strategy streams (:func:`~flwr_nnunet.strategy.streaming.streams`: its class sets ``streams = True``; a DP
      wrapper, when what it wraps streams too); other strategies keep
      the batch path, with one log line.
    - ``quorum``: None, or a fraction in (0, 1] of the sampled nodes; once that
      many replies are accepted the round waits at most ``grace`` seconds more.
    - ``poll_interval``: seconds between two pulls of outstanding replies.

    ``timeout`` closes a streaming round as it ends a batch one; replies that
    arrive after their round closed are dropped and logged.
    A resumed run that already completed ``num_rounds`` returns at once, with
    one log line and nothing written (``checkpoint_final.pth`` stays as it is).

    ``node_wait``: the most seconds each sampling step waits for the strategy's
    ``min_available_nodes`` (None: without end, as Flower); with fewer than the
    round's minimum then, the run stops after the last completed round
    (:func:`~flwr_nnunet.strategy.nodes.configure_round`; no ``checkpoint_final.pth``).
    """
    if checkpoints.completed_rounds >= num_rounds and checkpoints.completed_rounds > 0:
        log(
            INFO,
            "the resumed run already finished (round %d, num_rounds=%d): nothing to do, nothing written",
            checkpoints.completed_rounds,
            num_rounds,
        )
        finished = Result()
        finished.arrays = model.record()
        return finished
    if initial_arrays is not None and checkpoints.completed_rounds > 0:
        log(
            WARNING,
            "resumed after round %d: ignoring initial_arrays, the network holds the resumed model",
            checkpoints.completed_rounds,
        )
        initial_arrays = None
    if initial_arrays is not None:
        model.load_(initial_arrays)
    arrays = model.record()
    first = checkpoints.completed_rounds + 1
    log(INFO, "Starting %s strategy (rounds %d to %d):", type(strategy).__name__, first, num_rounds)
    log_strategy_start_info(num_rounds, arrays, train_config, evaluate_config)
    strategy.summary()
    train_config = ConfigRecord() if train_config is None else train_config
    evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
    checkpoints.prepare_folder()
    result = Result()
    started = time.time()
    stream = streaming and streams(strategy)
    if streaming and not stream:
        log(INFO, "%s does not stream (it needs every reply at once): batch rounds", type(strategy).__name__)
    late = LateReplies()
    if evaluate_fn and first == 1:
        res = evaluate_fn(0, arrays)
        log(INFO, "Initial global evaluation results: %s", res)
        if res is not None:
            result.evaluate_metrics_serverapp[0] = res
    for server_round in range(first, num_rounds + 1):
        log(INFO, "")
        log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
        instructions = configure_round(
            strategy, grid, server_round, arrays, train_config, train=True, node_wait=node_wait
        )
        if instructions is None:
            break
        if stream:
            new_arrays, train_metrics = stream_train_round(
                strategy,
                grid,
                server_round,
                instructions,
                timeout=timeout,
                quorum=quorum,
                grace=grace,
                poll_interval=poll_interval,
                late=late,
            )
        else:
            replies = grid.send_and_receive(messages=instructions, timeout=timeout)
            new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
            del replies
        if new_arrays is not None:
            model.load_(new_arrays)
            arrays = model.record()
        if train_metrics is not None:
            log(INFO, "\t└──> Aggregated MetricRecord: %s", train_metrics)
            result.train_metrics_clientapp[server_round] = train_metrics
        instructions = configure_round(
            strategy, grid, server_round, arrays, evaluate_config, train=False, node_wait=node_wait
        )
        if instructions is None:
            break
        replies = grid.send_and_receive(messages=instructions, timeout=timeout)
        evaluate_metrics = strategy.aggregate_evaluate(server_round, replies)
        if evaluate_metrics is not None:
            log(INFO, "\t└──> Aggregated MetricRecord: %s", evaluate_metrics)
            result.evaluate_metrics_clientapp[server_round] = evaluate_metrics
        if evaluate_fn:
            res = evaluate_fn(server_round, arrays)
            log(INFO, "Global evaluation: %s", res)
            if res is not None:
                result.evaluate_metrics_serverapp[server_round] = res
        checkpoints.end_round(server_round, strategy)
        if on_round_end is not None:
            on_round_end(server_round)
    result.arrays = model.record()
    if checkpoints.completed_rounds >= num_rounds:
        checkpoints.save("final", checkpoints.completed_rounds)
    else:
        log(WARNING, "stopped after round %d of %d: no checkpoint_final.pth", checkpoints.completed_rounds, num_rounds)
    log(INFO, "Strategy execution finished in %.2fs", time.time() - started)
    for line in io.StringIO(str(result)):
        log(INFO, "\t%s", line.strip("\n"))
    return result
