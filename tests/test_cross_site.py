"""Evaluation across sites (issue 18, item 4): the final global model and each site's local model at every site.

Three sites of the demo's kind train two rounds with ``cross-site-evaluation = "local-models"``; then every site
scores the global model and every site's model after its last round on its own validation cases. Checked: the
matrix (models x sites) and what it says, that a local model crosses as canonical tensors only where the run opts
in, and that a site's bad local model is refused while the matrix is made of the others.
"""

from __future__ import annotations

import json

import pytest
from federation_support import run_config, run_federation
from test_federated_planning import query_grid

from flwr_nnunet.apps.cross_site import LOCAL_MODEL_QUERY, MATRIX_FILE, summarize
from flwr_nnunet.demo.data import make_demo_dataset

SITES = ["site-0", "site-1", "site-2"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from flwr_nnunet.site import local_model as module

    demo = make_demo_dataset(tmp_path_factory.mktemp("cross-site") / "data", num_sites=3, planned=False)
    honest = module.local_model

    def site_2_diverged(spec):
        tensors = honest(spec)
        if spec.name == "site-2":
            next(iter(tensors.values())).fill_(float("nan"))
        return tensors

    config = run_config(
        demo.root, demo.dataset_name, "2d", 3, **{"num-server-rounds": 2, "cross-site-evaluation": "local-models"}
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("flwr_nnunet.apps.client.local_model", site_2_diverged)
        run = run_federation(config, 3)
    return {"demo": demo, "run": run, "result": json.loads((run["model"] / MATRIX_FILE).read_text())}


@pytest.mark.slow
def test_every_model_is_scored_at_every_site_and_a_bad_local_model_is_refused(evaluated):
    matrix = evaluated["result"]["matrix"]
    assert list(matrix) == ["global", "site-0", "site-1"]  # site-2's local model was not finite: refused
    for row, scores in matrix.items():
        assert sorted(scores) == SITES, row
        assert all(0.0 <= dice <= 1.0 for dice in scores.values()), row
    assert evaluated["result"]["server_round"] == 2
    assert evaluated["result"]["served_worst"]["site"] == min(matrix["global"], key=matrix["global"].get)
    assert evaluated["result"]["fails_elsewhere"]["site"] in ("site-0", "site-1")
    assert list(evaluated["result"]["refused_local_models"]) == ["site-2"]
    assert "NaN" in evaluated["result"]["refused_local_models"]["site-2"]


@pytest.mark.slow
def test_a_local_model_crosses_once_per_alias_group(evaluated):
    grid = evaluated["run"]["grid"]
    replies = [r for r in grid.replies if r.metadata.message_type == LOCAL_MODEL_QUERY and not r.has_error()]
    assert len(replies) == 3
    sizes = {len(r.content.array_records["arrays"]) for r in replies}
    train = next(r for r in grid.replies if r.metadata.message_type == "train" and not r.has_error())
    assert sizes == {len(train.content.array_records["arrays"])}  # the canonical keys, as every update


@pytest.mark.parametrize("mode", ["global", ""])
def test_a_site_shares_its_local_model_only_where_the_run_opts_in(evaluated, mode):
    from flwr.app import ConfigRecord, Message, RecordDict

    demo = evaluated["demo"]
    grid = query_grid(run_config(demo.root, demo.dataset_name, "2d", 1, **{"cross-site-evaluation": mode}), 1)
    message = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=100, message_type=LOCAL_MODEL_QUERY)
    (reply,) = grid.send_and_receive([message])
    assert reply.has_error() and "does not share the sites' local models" in reply.error.reason
    assert not reply.has_content()  # site-0 has a local model (it trained), and nothing of it left


def test_the_summary_names_the_site_served_worst_and_the_model_that_fails_elsewhere():
    matrix = {
        "global": {"a": 0.9, "b": 0.6, "c": 0.8},
        "a": {"a": 0.95, "b": 0.2, "c": 0.3},
        "b": {"a": 0.7, "b": 0.9, "c": 0.7},
    }
    assert summarize(matrix) == {
        "served_worst": {"site": "b", "dice": 0.6},
        "fails_elsewhere": {"site": "a", "mean_dice_at_other_sites": pytest.approx(0.25)},
    }
    assert summarize({"global": {"a": 0.5}}) == {"served_worst": {"site": "a", "dice": 0.5}}
