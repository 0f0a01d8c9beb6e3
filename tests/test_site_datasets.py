"""Per-site dataset names (issues 11 and 12): ``Dataset003_Liver`` at one hospital, ``Dataset517_Liver`` at another.

The run config's ``dataset`` is the federation's name (server plans, global model folder); each site keeps its
data under its own name, found from its folder layout in simulation and named by node-config ``dataset`` in
deployment. The plans digest leaves ``dataset_name`` out, so every site's copy of the plans agrees with the server.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from test_client_hardening import send

from flwr_nnunet.apps.client import site_spec
from flwr_nnunet.apps.site_planning import raw_dataset_folder
from flwr_nnunet.nnunet.digests import plans_sha256
from flwr_nnunet.nnunet.planning import install_plans
from flwr_nnunet.site.spec import SiteError

REPO = Path(__file__).resolve().parents[1]
FEDERATION = "Dataset003_Liver"
SITE_DATASETS = ("Dataset003_Liver", "Dataset517_Liver")
MODEL = "nnUNetTrainer__nnUNetPlans__2d"


def _folders(root: Path, layout: dict[str, list[str]]) -> None:
    for relative, names in layout.items():
        for name in names:
            (root / relative / name).mkdir(parents=True)


def test_a_simulated_site_finds_its_own_dataset_folder(tmp_path):
    _folders(
        tmp_path,
        {
            "site-0/nnUNet_raw": [FEDERATION, "Dataset517_Liver"],  # the federation's name wins
            "site-1/nnUNet_raw": ["Dataset517_Liver", "Dataset120_Kidney"],  # the one with the same <Name>
            "site-2/nnUNet_preprocessed": ["Dataset042_Liver"],  # preprocessed only (planning=fixed)
            "site-3/nnUNet_raw": ["Dataset120_Kidney"],  # the only dataset folder
            "site-4/nnUNet_raw": ["Dataset004_Liver", "Dataset005_Liver", "notes"],
        },
    )
    run_config = {"data-root": str(tmp_path), "dataset": FEDERATION}
    found = {}
    for k in range(6):
        try:
            spec = site_spec(run_config, {"partition-id": k, "num-partitions": 6})
        except SiteError as error:
            found[k] = str(error)
            continue
        found[k] = spec.dataset
        assert spec.dataset_folder == tmp_path / f"site-{k}" / "nnUNet_preprocessed" / spec.dataset
        assert spec.output_folder.parts[-3] == spec.dataset
        raw = raw_dataset_folder(run_config, {"partition-id": k}, spec.dataset)
        assert raw == tmp_path / f"site-{k}" / "nnUNet_raw" / spec.dataset
    assert found[0] == FEDERATION and found[1] == "Dataset517_Liver" and found[2] == "Dataset042_Liver"
    assert found[3] == "Dataset120_Kidney"
    assert found[5] == FEDERATION  # nothing there: the site's checks name the missing folder
    assert found[4].startswith("site-4: the federation's dataset Dataset003_Liver is not in ")
    assert (
        "(Dataset004_Liver, Dataset005_Liver)" in found[4]
        and "rename this site's folder to Dataset003_Liver" in found[4]
    )


def test_node_config_dataset_names_a_deployed_sites_own_folders(tmp_path):
    run_config = {"dataset": FEDERATION}
    node = {"nnunet-preprocessed": str(tmp_path / "pp"), "nnunet-results": str(tmp_path / "res"), "site-name": "b"}
    assert site_spec(run_config, node).dataset == FEDERATION  # default: the run config's
    spec = site_spec(run_config, {**node, "dataset": "Dataset517_Liver"})
    assert spec.dataset_folder == tmp_path / "pp" / "Dataset517_Liver"
    assert spec.output_folder == tmp_path / "res" / "Dataset517_Liver" / MODEL / "fold_0"
    assert spec.fix_command("preprocess").startswith("nnUNetv2_preprocess -d 517 ")
    for bad in ("Liver", "Dataset17_Liver", "Dataset517Liver", "Dataset517_", 517, ""):
        with pytest.raises(SiteError, match=r"^b: node-config 'dataset' must be an nnU-Net dataset folder name"):
            site_spec(run_config, {**node, "dataset": bad})


def test_the_plans_digest_leaves_the_dataset_name_out_and_install_writes_the_sites_own(tmp_path):
    plans = {"dataset_name": FEDERATION, "plans_name": "nnUNetPlans", "configurations": {"2d": {"batch_size": 2}}}
    assert plans_sha256(plans) == plans_sha256({**plans, "dataset_name": "Dataset517_Liver"})
    assert plans_sha256(plans) != plans_sha256({**plans, "configurations": {"2d": {"batch_size": 3}}})
    plans_file = install_plans(plans, {"labels": {}}, tmp_path / "Dataset517_Liver")
    installed = json.loads(plans_file.read_text())
    assert installed == {**plans, "dataset_name": "Dataset517_Liver"}  # nnU-Net's trainer finds the folder by it
    assert plans["dataset_name"] == FEDERATION  # the caller's plans are left as they were


# ------------------------------------------------ raw data under two names -> planning -> one round at each site
@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A ServerApp run in-process (federated planning, one round) over sites holding Dataset003/517_Liver."""
    from federation_support import run_config, run_federation, write_site

    from flwr_nnunet.demo.synthesis import SITE_STYLES

    root = tmp_path_factory.mktemp("liver") / "data"
    labels = {"background": 0, "organ": 1, "lesion": 2}
    for k, name in enumerate(SITE_DATASETS):
        write_site(root / f"site-{k}" / "nnUNet_raw" / name, k, SITE_STYLES[k], (40, 40), 3, labels)
    config = run_config(root, FEDERATION, "2d", len(SITE_DATASETS))
    return {"root": root, "grid": run_federation(config, len(SITE_DATASETS))["grid"], "run_config": config}


@pytest.mark.slow
def test_sites_under_different_names_plan_together_and_train_a_round(federation):
    root, grid = federation["root"], federation["grid"]
    assert not [r.error.reason for r in grid.replies if r.has_error()]
    model = root / "server" / "nnUNet_results" / FEDERATION / MODEL  # the federation's name
    assert (model / "fold_all" / "checkpoint_final.pth").is_file()
    server_plans = json.loads((model / "plans.json").read_text())
    assert server_plans["dataset_name"] == FEDERATION
    assert sorted(p.name for p in (root / "server").glob("*/*")) == [FEDERATION, FEDERATION]
    for k, name in enumerate(SITE_DATASETS):
        site = root / f"site-{k}"
        plans = json.loads((site / "nnUNet_preprocessed" / name / "nnUNetPlans.json").read_text())
        assert plans["dataset_name"] == name and plans_sha256(plans) == plans_sha256(server_plans)
        assert len(list((site / "nnUNet_preprocessed" / name / "nnUNetPlans_2d").glob("*.pkl"))) == 3
        assert [p.name for p in (site / "nnUNet_preprocessed").iterdir()] == [name]
        assert [p.name for p in (site / "nnUNet_results").iterdir()] == [name]  # nnU-Net's trainer used the name
        assert (site / "nnUNet_results" / name / MODEL / "fold_0" / "flwr_site_state.pth").is_file()
    trained = [r for r in grid.replies if r.metadata.message_type == "train"]
    assert sorted(r.content["config"]["site-name"] for r in trained) == ["site-0", "site-1"]
    assert {r.content["config"]["plans-sha256"] for r in trained} == {plans_sha256(server_plans)}


def _global_model(root: Path) -> RecordDict:
    """What the server sends: the run's final global model, its alias map and the plans digest."""
    from flwr_nnunet.core.aliasing import AliasMap
    from flwr_nnunet.core.codec import to_array_record
    from flwr_nnunet.nnunet.checkpoint_io import load_checkpoint
    from flwr_nnunet.nnunet.networks import build_trainer_network

    model = root / "server" / "nnUNet_results" / FEDERATION / MODEL
    plans = json.loads((model / "plans.json").read_text())
    network = build_trainer_network(plans, json.loads((model / "dataset.json").read_text()), "2d", "nnUNetTrainer")
    network.load_state_dict(load_checkpoint(model / "fold_all" / "checkpoint_final.pth")["network_weights"])
    amap = AliasMap.from_module(network)
    config = {"server-round": 1, "local-epochs": 1, "num-epochs": 2, "iterations-per-epoch": 1, "seed": 1}
    config |= {"val-iterations-per-epoch": 1, "plans-sha256": plans_sha256(plans), "alias-map": amap.to_json()}
    return RecordDict({"arrays": to_array_record(amap.collapse(network.state_dict())), "config": ConfigRecord(config)})


def _deployed(federation, results: Path, **node_config) -> Context:
    node = {
        "nnunet-preprocessed": str(federation["root"] / "site-1" / "nnUNet_preprocessed"),
        "nnunet-raw": str(federation["root"] / "site-1" / "nnUNet_raw"),
        "nnunet-results": str(results),
        "site-name": "hospital-b",
        **node_config,
    }
    return Context(run_id=901, node_id=2, node_config=node, state=RecordDict(), run_config=federation["run_config"])


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.slow
def test_a_deployed_site_trains_under_the_dataset_its_node_config_names(federation, tmp_path):
    preprocessed = federation["root"] / "site-1" / "nnUNet_preprocessed" / "Dataset517_Liver"
    plans_file = preprocessed / "nnUNetPlans.json"
    copied = {**json.loads(plans_file.read_text()), "dataset_name": FEDERATION}  # a plain copy of the server's
    plans_file.write_text(json.dumps(copied))
    context = _deployed(federation, tmp_path / "results", dataset="Dataset517_Liver")
    reply = send("train", _global_model(federation["root"]), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content["config"]["site-name"] == "hospital-b"
    assert reply.content["config"]["plans-sha256"] == plans_sha256(copied)
    assert reply.content["metrics"]["num-examples"] == 2
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["Dataset517_Liver"]
    assert (tmp_path / "results" / "Dataset517_Liver" / MODEL / "fold_0" / "flwr_site_state.pth").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["train", "query"])
def test_a_malformed_node_config_dataset_gets_an_error_reply_and_nothing_is_touched(federation, tmp_path, kind):
    site = federation["root"] / "site-1"
    before = _tree(site)
    content = _global_model(federation["root"])
    if kind == "query":
        content = RecordDict({"config": ConfigRecord({"planning-stage": "survey"})})
    context = _deployed(federation, tmp_path / "results", dataset="Liver")
    reply = send(kind, content, context)
    assert reply.has_error()
    assert reply.error.reason.startswith("hospital-b: node-config 'dataset' must be an nnU-Net dataset folder name")
    assert (
        "not 'Liver'" in reply.error.reason and "--node-config \"dataset='Dataset517_Liver' ...\"" in reply.error.reason
    )
    assert not (tmp_path / "results").exists() and _tree(site) == before


def test_supernode_sh_passes_the_raw_root_and_dataset_only_when_given(tmp_path):
    fake = tmp_path / "bin" / "flower-supernode"  # prints the flags it is started with
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    (tmp_path / "ca.crt").write_text("")
    (tmp_path / "key").write_text("")
    env = {
        **os.environ,
        "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}",
        "SUPERLINK": "127.0.0.1:1",
        "CA_CERT": str(tmp_path / "ca.crt"),
        "NODE_KEY": str(tmp_path / "key"),
        "PREPROCESSED": "/pp",
        "RESULTS": "/res",
        "SITE_NAME": "hospital-b",
        "WARM_SITE": "false",  # no worker: it would hold the pipe this test reads open
    }

    def node_config(**extra):
        script = REPO / "configs" / "deployment" / "supernode.sh"
        out = subprocess.run(["bash", str(script)], env={**env, **extra}, capture_output=True, text=True, check=True)
        flags = out.stdout.splitlines()
        return flags[flags.index("--node-config") + 1]

    plain = "nnunet-preprocessed='/pp' nnunet-results='/res' site-name='hospital-b'"
    assert node_config(RAW="", DATASET="") == plain
    assert (
        node_config(RAW="/raw", DATASET="Dataset517_Liver") == f"{plain} nnunet-raw='/raw' dataset='Dataset517_Liver'"
    )
