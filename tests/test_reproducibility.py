"""Same seed, same run config: the same model, whatever the node-to-worker placement and the node ids.

Round r of site s may depend only on (seed, r, s), the weights it receives and its saved state; the
global model of a round only on the replies' contents and weights, never on the order they arrive in
or on the node ids the SuperLink drew for this run (random in every run, simulation included).
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from strategy_support import canonical, perturbed, reply, set_task_identity, tiny_network, tiny_plans
from test_site import copies, initial_weights, options, spec_for

from flwr_nnunet import NnUNetFedAvg
from flwr_nnunet.demo.data import make_demo_dataset
from flwr_nnunet.site.site import Site

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("reproducibility") / "data", num_sites=2)


def _assert_bit_identical(found, expected):
    assert found.keys() == expected.keys()
    differing = [key for key in expected if not torch.equal(found[key], expected[key])]
    assert not differing, f"{len(differing)} of {len(expected)} tensors differ, first {differing[0]}"


def _disturb_process_rngs():
    """What whatever ran before in a shared worker process leaves behind."""
    random.random(), np.random.rand(17), torch.rand(23)


@pytest.mark.slow
def test_round_two_is_the_same_on_the_live_site_and_on_a_site_rebuilt_after_another_site_trained(demo, tmp_path):
    first = initial_weights(demo)

    # (a) One worker keeps the site alive for both rounds (and evaluates it in between, as every round does).
    live = Site(spec_for(demo, tmp_path / "live"))
    round_1, _ = live.train(copies(first), options(1))
    round_1 = copies(round_1)
    second = copies(round_1)  # the global model after round 1 (any tensors do)
    live.evaluate(copies(second), options(1))
    expected, expected_metrics = live.train(copies(second), options(2))
    expected = copies(expected)

    # (b) Round 1 in one worker; that worker then trains and evaluates another site; round 2 in another worker
    # (a Site rebuilt from the state file) whose process RNGs were left anywhere by earlier work.
    elsewhere = Site(spec_for(demo, tmp_path / "elsewhere"))
    again, _ = elsewhere.train(copies(first), options(1))
    _assert_bit_identical(copies(again), round_1)
    other = Site(spec_for(demo, tmp_path / "other", site=1))
    other.train(copies(first), options(1))
    other.evaluate(copies(second), options(1))
    _disturb_process_rngs()
    rebuilt = Site(spec_for(demo, tmp_path / "elsewhere"))
    found, found_metrics = rebuilt.train(copies(second), options(2))

    _assert_bit_identical(copies(found), expected)
    assert found_metrics == expected_metrics


@pytest.fixture
def _task_identity():
    set_task_identity()


@pytest.mark.usefixtures("_task_identity")
def test_the_global_model_does_not_depend_on_node_ids_or_arrival_order():
    """The same three site updates under other node ids (every run draws new ones) and in another arrival order."""
    network = tiny_network()
    base = {key: value.clone() for key, value in canonical(network).items()}
    updates = [perturbed(base, seed) for seed in (1, 2, 3)]
    weights = [6, 7, 11]  # unequal: with equal weights a two-term mean happens not to depend on the order

    def aggregate(node_ids, order):
        strategy = NnUNetFedAvg(tiny_network(), plans=tiny_plans())
        replies = [reply(node_ids[i], updates[i], weights[i]) for i in order]
        arrays, _ = strategy.aggregate_train(1, replies)
        assert arrays is not None
        return {key: torch.from_numpy(arrays[key].numpy()) for key in arrays}

    expected = aggregate([11, 22, 33], [0, 1, 2])
    _assert_bit_identical(aggregate([11, 22, 33], [2, 0, 1]), expected)  # arrival order
    _assert_bit_identical(aggregate([33, 22, 11], [0, 1, 2]), expected)  # node ids of another run
    _assert_bit_identical(aggregate([22, 33, 11], [1, 2, 0]), expected)


def _run_simulation(data_root: Path, *, workers: int, node_ids: list[int], packed: bool, monkeypatch) -> None:
    """What `flwr run .` does in its simulation process, with ``workers`` Ray workers and the given node ids;
    ``packed``: run-config ``packed-arrays``."""
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.server.superlink.linkstate import in_memory_linkstate
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    draw = in_memory_linkstate.generate_rand_int_from_bytes
    chosen = iter(node_ids)

    def generate(num_bytes, exclude=None):  # node registration excludes the SuperLink's id; nothing else does
        return next(chosen) if exclude and SUPERLINK_NODE_ID in exclude else draw(num_bytes, exclude)

    monkeypatch.setattr(in_memory_linkstate, "generate_rand_int_from_bytes", generate)
    override = {
        "data-root": str(data_root),
        "num-server-rounds": 2,
        "iterations-per-epoch": 4,
        "val-iterations-per-epoch": 2,
        "device": "cpu",
        "demo-sites": 2,
        "seed": 3,
        "packed-arrays": packed,
    }
    run = Run.create_empty(run_id=int.from_bytes(os.urandom(7), "little"))
    run.override_config = override
    run.primary_task_id = 1
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    context = Context(
        run_id=run.run_id,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=get_fused_config_from_dir(REPO, override),
    )
    _run_simulation(
        server_app_attr="server_app:app",
        client_app_attr="client_app:app",
        num_supernodes=2,
        # One CPU per ClientApp (so torch runs one intra-op thread in every worker) and 1 or 2 workers.
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0}, "init_args": {"num_cpus": workers}},
        app_dir=str(REPO),
        run=run,
        server_app_context=context,
        is_app=True,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
    )
    assert next(chosen, None) is None, "the simulation registered fewer nodes than expected"


@pytest.mark.slow
def test_two_simulations_with_the_same_seed_give_the_same_final_model(demo, tmp_path, monkeypatch):
    """One worker running both sites vs two workers that swap sites between rounds, under other node ids, with
    the arrays sent per tensor instead of packed."""
    final = {}
    runs = (("one-worker", 1, [1001, 2002], True), ("two-workers", 2, [2002, 1001], False))
    for name, workers, node_ids, packed in runs:
        root = tmp_path / name / "data"
        shutil.copytree(demo.root, root, symlinks=True)
        start = time.perf_counter()
        with monkeypatch.context() as patch:
            _run_simulation(root, workers=workers, node_ids=node_ids, packed=packed, monkeypatch=patch)
        print(f"{name}: {time.perf_counter() - start:.1f} s")
        model = (
            root / "server" / "nnUNet_results" / demo.dataset_name / f"nnUNetTrainer__nnUNetPlans__{demo.configuration}"
        )
        checkpoint = torch.load(model / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=True)
        final[name] = checkpoint["network_weights"]
    _assert_bit_identical(final["two-workers"], final["one-worker"])
