"""Federated planning in a real loopback deployment (issue 22, items 3 and 5): one SuperLink for the module,
SuperNodes started and stopped by process id, the sites' raw demo data planned in the run.

- A busy machine: the run plans and completes while a busy loop holds a core. Before the fix, nnU-Net's planner
  forked a pool inside the ServerApp; a worker SIGTERMed as the pool closed ran Flower's inherited exit handler,
  reported the ServerApp's task as failed, and the SuperLink ended the run (2 of 7 runs on a busy machine).
- A site lost during the survey: the others go on (they meet min-available-nodes), the run completes, and the
  site started again gets the plans before its first instruction; with too few left, planning stops naming the
  lost node and the fix.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from deployment_support import Deployment, Service, run_config, wait_for

from flwr_nnunet.demo.data import DemoDataset, make_demo_dataset
from flwr_nnunet.nnunet.digests import plans_sha256

SURVEY_RECEIVED = "Receiving: query message"
TASK_TOKEN_REFUSED = "Runtime task-token authentication failed"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """One insecure SuperLink for the module's runs; everything it and the tests started is stopped at the end."""
    failures = request.session.testsfailed
    deployment = Deployment(tmp_path_factory.mktemp("planning-deployment"))
    try:
        deployment.start_superlink()
        deployment.write_connection()
        yield deployment
    finally:
        deployment.stop()
        if request.session.testsfailed > failures:
            print(deployment.logs())


@pytest.fixture
def supernodes(deployment: Deployment) -> Iterator[Deployment]:
    """The test's SuperNodes are killed (by process id, with what they started) when it ends. The SuperLink lists
    them for up to a minute more: the next test's planning may ask them too, and goes on without them."""
    yield deployment
    for service in deployment.supernodes.values():
        if service.process.poll() is None:
            service.kill()
    deployment.supernodes.clear()


def raw_demo(deployment: Deployment, name: str, sites: int) -> DemoDataset:
    """The demo's raw data only (each site's nnUNet_raw): the run plans it."""
    return make_demo_dataset(deployment.tmp_path / name, num_sites=sites, planned=False)


def start_sites(deployment: Deployment, demo: DemoDataset, count: int) -> list[Service]:
    """SuperNodes for the first ``count`` demo sites, named ``<demo folder>-site-K`` (their results folders too:
    each test's sites start without another run's round state)."""
    return [deployment.start_supernode(site, name=f"{demo.root.name}-{site.name}") for site in demo.sites[:count]]


def planning_config(demo: DemoDataset, nodes: int) -> dict[str, object]:
    """The deployment tests' run config with federated planning, one round, no evaluation rounds; a round-timeout
    no busy machine reaches (the SuperLink answers for a lost site within about a minute)."""
    counts = {"min_available_nodes": nodes, "min_train_nodes": nodes, "min_evaluate_nodes": nodes}
    return run_config(
        demo, planning="federated", num_server_rounds=1, fraction_evaluate=0.0, round_timeout=900.0, **counts
    )


def lose_the_last_site_in_the_survey(deployment: Deployment, demo: DemoDataset, nodes: int) -> tuple[str, int]:
    """A SuperNode per demo site, a run needing ``nodes``, the last site SIGKILLed (with what it started) as the
    survey reaches it; the run id and the lost node's id."""
    services = start_sites(deployment, demo, len(demo.sites))
    lost = services[-1].node_id()
    run_id = deployment.submit(planning_config(demo, nodes=nodes))
    wait_for(lambda: SURVEY_RECEIVED in services[-1].text(), 300, f"the survey reaching {services[-1].name}")
    services[-1].kill()
    deployment.supernodes.pop(services[-1].name)
    return run_id, lost


def server_plans(demo: DemoDataset) -> dict:
    """The plans the run made, as the server holds them."""
    return json.loads(demo.plans_file.read_text())


@pytest.mark.slow
def test_a_run_plans_and_completes_while_the_machine_is_busy(supernodes: Deployment) -> None:
    """One site, a busy loop on a core for the whole run: the three planning queries reach the site, the run
    completes, and the SuperLink never refuses the ServerApp's task token."""
    deployment = supernodes
    demo = raw_demo(deployment, "busy", sites=2)
    (site,) = start_sites(deployment, demo, 1)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        run_id = deployment.submit(planning_config(demo, nodes=1))
        status = deployment.wait_until_finished(run_id, demo.server.nnunet_results / "never")
    finally:
        busy.kill()
        busy.wait()
    assert status == "finished:completed", deployment.server_log(run_id)[-3000:]
    assert site.text().count(SURVEY_RECEIVED) == 3  # survey, statistics, plans
    assert TASK_TOKEN_REFUSED not in deployment.superlink.text()
    installed = demo.sites[0].preprocessed_dataset_folder / f"{demo.plans_name}.json"
    assert plans_sha256(json.loads(installed.read_text())) == plans_sha256(server_plans(demo))


@pytest.mark.slow
def test_a_site_lost_during_the_survey_leaves_the_others_to_plan_and_gets_the_plans_when_it_comes_back(
    supernodes: Deployment,
) -> None:
    """3 sites, min-available-nodes=2: site-2 is SIGKILLed as the survey reaches it and started again at once
    (a new node). Planning goes on with site-0 and site-1 once the SuperLink answers for the lost node; round 1
    samples all three, and the site that came back gets the plans before its train instruction: 3 of 3 replies."""
    deployment = supernodes
    demo = raw_demo(deployment, "lost", sites=3)
    run_id, lost = lose_the_last_site_in_the_survey(deployment, demo, nodes=2)
    back = deployment.start_supernode(demo.sites[2], name="site-2-back")

    assert deployment.wait_until_finished(run_id, demo.server.nnunet_results / "never") == "finished:completed"
    log = deployment.server_log(run_id)
    assert "goes on with the 2 site(s) that answered (min-available-nodes 2) without node" in log, log[-3000:]
    assert f"node {lost}: the SuperLink answered for node {lost}" in log  # (and any node of an earlier test)
    assert f"site-2-back (node {back.node_id()}) installed the plans {plans_sha256(server_plans(demo))}" in log
    assert "round 1: 3 of 3 replies accepted" in log, log[-3000:]
    text = back.text()
    assert text.index(SURVEY_RECEIVED) < text.index("Receiving: train message")  # the plans came first
    for site in demo.sites:
        installed = site.preprocessed_dataset_folder / f"{demo.plans_name}.json"
        assert plans_sha256(json.loads(installed.read_text())) == plans_sha256(server_plans(demo)), site.name
    fingerprint = json.loads((demo.server.preprocessed_dataset_folder / "dataset_fingerprint.json").read_text())
    cases = [len(list((site.raw_dataset_folder / "imagesTr").iterdir())) for site in demo.sites]
    assert len(fingerprint["spacings"]) == cases[0] + cases[1]  # the statistics of the sites that planned


@pytest.mark.slow
def test_too_few_sites_left_after_a_loss_stop_the_run_naming_the_node_and_the_fix(supernodes: Deployment) -> None:
    """2 sites, min-available-nodes=2, site-1 SIGKILLed as the survey reaches it: the run fails before any plans
    are made, its log naming the lost node, the count and what to do; site-0 has nothing preprocessed."""
    deployment = supernodes
    demo = raw_demo(deployment, "too-few", sites=2)
    run_id, lost = lose_the_last_site_in_the_survey(deployment, demo, nodes=2)

    assert deployment.wait_until_finished(run_id, demo.server.nnunet_results / "never") == "finished:failed"
    log = deployment.server_log(run_id)
    assert "federated planning (survey) stopped: node " in log, log[-3000:]
    assert f"node {lost}: the SuperLink answered for node {lost}" in log
    assert "1 site(s) answered, fewer than the 2 needed (run-config min-available-nodes)" in log
    assert "start the lost SuperNodes and submit the run again (resume=true" in log
    assert not demo.plans_file.exists()
    assert not (demo.sites[0].preprocessed_dataset_folder / f"{demo.plans_name}.json").exists()
