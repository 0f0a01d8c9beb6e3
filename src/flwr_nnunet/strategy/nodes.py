"""Waiting for nodes, with an end: Flower's node sampling waits forever while too few nodes are connected.

Flower's ``FedAvg.configure_train`` / ``configure_evaluate`` call ``sample_nodes``, which loops on
"Waiting for nodes to connect" until ``min_available_nodes`` (at least the round's minimum) are connected:
after a hospital's SuperNode is lost for good, a run would wait without end. :func:`enough_nodes` waits at
most ``node_wait`` seconds before each sampling step; then the round goes on with the nodes that are
connected if they meet the round's minimum (``min_train_nodes`` / ``min_evaluate_nodes``), and otherwise
:class:`NodesUnavailableError` ends the run (the round loop stops cleanly, the checkpoints of the completed
rounds intact, and ``resume=true`` continues it once the nodes are back).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from logging import ERROR, INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.supercore import log

from flwr_nnunet.errors import FlwrNnUNetError

__all__ = ["NodesUnavailableError", "configure_round", "enough_nodes", "wait_for_nodes"]

POLL_S = 1.0
"""How often the connected nodes are counted while waiting (Flower's own loop polls every second too)."""


class NodesUnavailableError(FlwrNnUNetError, RuntimeError):
    """Fewer nodes than a round's minimum were connected when the wait for them ended."""


def wait_for_nodes(
    grid: Grid,
    wanted: int,
    timeout: float,
    *,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> list[int]:
    """The connected node ids once ``wanted`` are connected, or after ``timeout`` seconds, whichever is first.

    Logs once when it starts waiting and once when the wait ends without ``wanted`` nodes; ``what`` names the
    step in those lines (e.g. ``"configure_train: round 3"``).
    """
    nodes = list(grid.get_node_ids())
    if len(nodes) >= wanted:
        return nodes
    log(INFO, "%s: waiting up to %.0f s for %d nodes (%d connected)", what, timeout, wanted, len(nodes))
    deadline = clock() + timeout
    while len(nodes) < wanted and clock() < deadline:
        sleep(min(POLL_S, max(deadline - clock(), 0.0)))
        nodes = list(grid.get_node_ids())
    if len(nodes) < wanted:
        log(
            WARNING,
            "%s: %d of %d wanted nodes connected after waiting %.0f s (run-config node-wait): %s",
            what,
            len(nodes),
            wanted,
            timeout,
            sorted(nodes)[:20],
        )
    return nodes


def _core(strategy: Any) -> Any:
    """The strategy that holds the sampling settings (the one inside a DP wrapper, or the strategy itself)."""
    inner = getattr(strategy, "strategy", None)
    return inner if inner is not None and hasattr(inner, "min_available_nodes") else strategy


@contextmanager
def enough_nodes(strategy: Any, grid: Grid, timeout: float | None, *, server_round: int, train: bool) -> Iterator[None]:
    """Around a ``configure_train`` / ``configure_evaluate`` call: wait at most ``timeout`` seconds for the
    strategy's ``min_available_nodes``; fewer but at least the round's minimum: sample from those (its
    ``min_available_nodes`` lowered for this call only).

    ``timeout`` None: Flower's own behaviour (wait without end). A strategy without ``min_available_nodes``
    is left alone.

    Raises
    ------
    NodesUnavailableError
        If fewer nodes than the round's minimum (``min_train_nodes`` / ``min_evaluate_nodes``) are connected
        when the wait ends; nothing was sent.
    """
    core = _core(strategy)
    if timeout is None or not hasattr(core, "min_available_nodes"):
        yield
        return
    stage = "configure_train" if train else "configure_evaluate"
    fraction = core.fraction_train if train else core.fraction_evaluate
    if fraction == 0.0:  # Flower sends nothing then, and samples no nodes
        yield
        return
    minimum = max(1, core.min_train_nodes if train else core.min_evaluate_nodes)
    wanted = max(core.min_available_nodes, minimum)
    nodes = wait_for_nodes(grid, wanted, timeout, what=f"{stage}: round {server_round}")
    if len(nodes) < minimum:
        raise NodesUnavailableError(
            f"{stage}: round {server_round}: {len(nodes)} node(s) connected, fewer than the round's minimum of "
            f"{minimum} ({'min-train-nodes' if train else 'min-evaluate-nodes'}), after waiting {timeout:.0f} s "
            "(run-config node-wait); start the missing SuperNodes, then continue the run with resume=true"
        )
    if len(nodes) >= wanted:
        yield
        return
    log(WARNING, "%s: round %d: going on with the %d connected nodes", stage, server_round, len(nodes))
    saved = core.min_available_nodes
    core.min_available_nodes = len(nodes)
    try:
        yield
    finally:
        core.min_available_nodes = saved


def configure_round(
    strategy: Any,
    grid: Grid,
    server_round: int,
    arrays: ArrayRecord,
    config: ConfigRecord,
    *,
    train: bool,
    node_wait: float | None,
) -> list[Message] | None:
    """``strategy.configure_train`` (``train``) or ``configure_evaluate`` inside :func:`enough_nodes`: the
    round's messages, or None (logged: the run stops here) when too few nodes are connected after ``node_wait``
    seconds."""
    configure = strategy.configure_train if train else strategy.configure_evaluate
    try:
        with enough_nodes(strategy, grid, node_wait, server_round=server_round, train=train):
            return list(configure(server_round, arrays, config, grid))
    except NodesUnavailableError as error:
        log(ERROR, "%s: the run stops; the checkpoints of the completed rounds are intact", error)
        return None
