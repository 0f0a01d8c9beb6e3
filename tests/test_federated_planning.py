"""Federated planning: site statistics, exact merge, plans without raw data, the planning phase over queries.

Three synthetic 2D sites of different image sizes (40, 80, 144 pixels) and
intensity distributions. Planned alone they get different networks; planned
together they get one set of plans, equal (architecture, patch size, spacing,
normalization) to what nnU-Net's own fingerprint extractor and planner give on
the three sites' raw data pooled into one dataset.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from flwr_nnunet.demo.synthesis import SITE_STYLES, synthesize_case, write_case
from flwr_nnunet.nnunet.fingerprint import (
    SURVEY_FIELDS,
    FederationMismatchError,
    agreed_bins,
    check_consistency,
    federation_dataset_json,
    merge_site_statistics,
    samples_per_case,
    site_statistics,
    site_survey,
)
from flwr_nnunet.nnunet.intensity import (
    PERCENTILES,
    channel_statistics,
    histogram_bins,
    merge_channel_statistics,
)
from flwr_nnunet.nnunet.planning import PLANNERS, nnunet_environment, plan_from_fingerprint

DATASET = "Dataset100_Federation"
SIZES = (40, 80, 144)
CASES = (4, 3, 3)
TOTAL_SAMPLES = 30000  # nnU-Net's 1e8 foreground samples shrunk for a test (the same rule: total // cases)
SAMPLES_PER_CASE = samples_per_case(sum(CASES), TOTAL_SAMPLES)
LABELS = {"background": 0, "organ": 1, "lesion": 2}


def _dataset_json(num_training, labels=LABELS):
    return {"channel_names": {"0": "MRI"}, "labels": labels, "numTraining": num_training, "file_ending": ".png"}


def write_site(folder, index, size, num_cases, labels=LABELS):
    rng = np.random.default_rng([7, index])
    for i in range(num_cases):
        write_case(
            folder,
            "imagesTr",
            "labelsTr",
            f"site{index}_{i:03d}",
            synthesize_case(rng, SITE_STYLES[index], (size,) * 2),
            2,
        )
    (folder / "dataset.json").write_text(json.dumps(_dataset_json(num_cases, labels)))
    return folder


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("federation")
    return {
        f"site-{k}": write_site(root / f"site-{k}" / "nnUNet_raw" / DATASET, k, size, n)
        for k, (size, n) in enumerate(zip(SIZES, CASES))
    }


@pytest.fixture(scope="module")
def federated(sites):
    surveys = {name: site_survey(folder) for name, folder in sites.items()}
    check_consistency(surveys)
    bins = agreed_bins(surveys)
    num_samples = samples_per_case(sum(s["num_cases"] for s in surveys.values()), TOTAL_SAMPLES)
    statistics = {name: site_statistics(folder, bins, num_samples) for name, folder in sites.items()}
    fingerprint = merge_site_statistics(list(statistics.values()), bins)
    dataset_json = federation_dataset_json(surveys)
    plans = plan_from_fingerprint(fingerprint, dataset_json, DATASET, surveys["site-0"]["reader_writer"])
    return {"surveys": surveys, "bins": bins, "statistics": statistics, "fingerprint": fingerprint, "plans": plans}


@pytest.fixture(scope="module")
def pooled(sites, tmp_path_factory):
    """nnU-Net's own fingerprint extraction and planning on the three sites' raw data in one dataset."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    root = tmp_path_factory.mktemp("pooled")
    raw, preprocessed = root / "nnUNet_raw", root / "nnUNet_preprocessed"
    folder = raw / DATASET
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
        for site in sites.values():
            for path in (site / sub).iterdir():
                shutil.copyfile(path, folder / sub / path.name)
    (folder / "dataset.json").write_text(json.dumps(_dataset_json(sum(CASES))))
    with nnunet_environment(raw, preprocessed):
        extractor = DatasetFingerprintExtractor(DATASET, num_processes=1)
        extractor.num_foreground_voxels_for_intensitystats = TOTAL_SAMPLES
        extractor.show_progress_bar = False
        fingerprint = extractor.run()
        planner = ExperimentPlanner(DATASET)
        planner.plan_experiment()
    plans = json.loads((preprocessed / DATASET / "nnUNetPlans.json").read_text())
    return {"fingerprint": json.loads(json.dumps(fingerprint)), "plans": plans, "folder": folder}


def _architecture(plans, configuration="2d"):
    c = plans["configurations"][configuration]
    return {
        key: c[key]
        for key in ("architecture", "patch_size", "spacing", "normalization_schemes", "use_mask_for_norm", "batch_size")
    }


# --- 1. site statistics -------------------------------------------------------------------------------------------


def test_a_survey_and_the_statistics_hold_only_aggregates_of_bounded_size(federated):
    for name, survey in federated["surveys"].items():
        assert set(survey) == set(SURVEY_FIELDS)
        assert survey["reader_writer"] == "NaturalImage2DIO" and survey["file_ending"] == ".png"
        assert len(json.dumps(survey)) < 1000, name
    for (name, statistics), num_cases in zip(federated["statistics"].items(), CASES):
        assert statistics["num_cases"] == num_cases
        assert len(statistics["shapes_after_crop"]) == len(statistics["spacings"]) == num_cases
        (channel,) = statistics["intensities"]
        assert set(channel) == {"count", "sum", "sum_squared_deviations", "min", "max", "histogram"}
        assert len(channel["histogram"]) == federated["bins"][0]["num_bins"]
        assert sum(channel["histogram"]) == channel["count"]


# --- 2. exact merge -----------------------------------------------------------------------------------------------


def test_merged_statistics_equal_the_pooled_ones(federated, pooled):
    """Mean/std to 1e-6 relative, min/max exactly, percentiles within one bin of nnU-Net's pooled fingerprint."""
    merged = federated["fingerprint"]["foreground_intensity_properties_per_channel"]["0"]
    reference = pooled["fingerprint"]["foreground_intensity_properties_per_channel"]["0"]
    bins = federated["bins"][0]
    width = (bins["high"] - bins["low"]) / bins["num_bins"]
    assert merged["mean"] == pytest.approx(reference["mean"], rel=1e-6)
    assert merged["std"] == pytest.approx(reference["std"], rel=1e-6)
    assert (merged["min"], merged["max"]) == (reference["min"], reference["max"])
    for key in ("percentile_00_5", "median", "percentile_99_5"):
        assert abs(merged[key] - reference[key]) < width, key
    assert sorted(map(tuple, federated["fingerprint"]["shapes_after_crop"])) == sorted(
        map(tuple, pooled["fingerprint"]["shapes_after_crop"])
    )
    assert sorted(map(tuple, federated["fingerprint"]["spacings"])) == sorted(
        map(tuple, pooled["fingerprint"]["spacings"])
    )
    assert federated["fingerprint"]["median_relative_size_after_cropping"] == pytest.approx(
        pooled["fingerprint"]["median_relative_size_after_cropping"]
    )


@pytest.mark.parametrize(
    ("modality", "parts", "widest_bin"),
    [
        ("CT, Hounsfield units", [(-1024, 3071, 40000), (-200, 400, 30000), (3000, 30000, 50)], 2.0),
        ("MRI", [(0, 4000, 30000), (100, 900, 30000)], 0.25),
        ("8-bit natural images", [(0, 255, 30000), (30, 200, 20000)], 0.016),
    ],
)
def test_the_histogram_merge_is_exact_for_ct_mri_and_natural_ranges(modality, parts, widest_bin):
    rng = np.random.default_rng(3)
    sites = [rng.triangular(lo, (lo + hi) / 2, hi, n).round(1) for lo, hi, n in parts]
    pooled = np.concatenate(sites)
    bins = histogram_bins(min(s.min() for s in sites), max(s.max() for s in sites))
    width = (bins["high"] - bins["low"]) / bins["num_bins"]
    assert width <= widest_bin, modality
    merged = merge_channel_statistics([channel_statistics(np.array_split(s, 4), bins) for s in sites], bins)
    assert merged["mean"] == pytest.approx(pooled.mean(), rel=1e-9)
    assert merged["std"] == pytest.approx(pooled.std(), rel=1e-9)
    assert (merged["min"], merged["max"]) == (pooled.min(), pooled.max())
    for key, q in zip(("percentile_00_5", "median", "percentile_99_5"), PERCENTILES):
        assert abs(merged[key] - np.percentile(pooled, q)) < width, (modality, key)


def test_averaged_percentiles_were_wrong_and_the_histogram_is_not():
    """The old merge (case-weighted means of the sites' percentiles) misses the pooled percentile by far."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(50, 5, 10000), rng.normal(200, 5, 10000)
    bins = histogram_bins(min(a.min(), b.min()), max(a.max(), b.max()))
    merged = merge_channel_statistics([channel_statistics([a], bins), channel_statistics([b], bins)], bins)
    pooled = np.percentile(np.concatenate([a, b]), 0.5)
    averaged = (np.percentile(a, 0.5) + np.percentile(b, 0.5)) / 2
    assert abs(averaged - pooled) > 50
    assert abs(merged["percentile_00_5"] - pooled) < (bins["high"] - bins["low"]) / bins["num_bins"]


def test_sites_with_other_labels_are_named_with_the_field(sites, tmp_path):
    other = write_site(tmp_path / DATASET, 1, 40, 2, labels={"background": 0, "organ": 1})
    surveys = {"site-0": site_survey(sites["site-0"]), "site-9": site_survey(other)}
    with pytest.raises(FederationMismatchError) as caught:
        check_consistency(surveys)
    message = str(caught.value)
    assert "labels" in message and "site-0" in message and "site-9" in message
    assert set(caught.value.mismatches) == {"labels"}


# --- 3. plans without raw data ------------------------------------------------------------------------------------


def test_sites_planned_alone_get_different_networks_planned_together_nnunets_pooled_plans(sites, federated, pooled):
    alone = []
    for name in sites:
        survey = federated["surveys"][name]
        fingerprint = merge_site_statistics([federated["statistics"][name]], federated["bins"])
        plans = plan_from_fingerprint(
            fingerprint, federation_dataset_json({name: survey}), DATASET, survey["reader_writer"]
        )
        alone.append(_architecture(plans))
    stages = [a["architecture"]["arch_kwargs"]["n_stages"] for a in alone]
    assert len(set(stages)) == 3, stages  # weights of these networks could not be averaged
    assert len({json.dumps(a["patch_size"]) for a in alone}) == 3
    assert _architecture(federated["plans"]) == _architecture(pooled["plans"])
    for key in ("transpose_forward", "original_median_spacing_after_transp", "original_median_shape_after_transp"):
        assert federated["plans"][key] == pooled["plans"][key]
    assert federated["plans"]["image_reader_writer"] == pooled["plans"]["image_reader_writer"] == "NaturalImage2DIO"


@pytest.mark.parametrize("preset", ["resenc-m"])
def test_residual_encoder_presets_plan_with_their_own_plans_name(federated, preset):
    planner, plans_name = PLANNERS[preset]
    plans = plan_from_fingerprint(
        federated["fingerprint"],
        federation_dataset_json(federated["surveys"]),
        DATASET,
        "NaturalImage2DIO",
        planner=planner,
        plans_name=plans_name,
    )
    assert plans["plans_name"] == plans_name == "nnUNetResEncUNetMPlans"
    assert plans["configurations"]["2d"]["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")


# --- 4. the planning phase over Flower query messages -------------------------------------------------------------


class QueryGrid:
    """A Grid that delivers each message to the ClientApp of ``client_app.py`` in-process and keeps every reply."""

    def __init__(self, contexts):
        self.contexts = contexts  # node id -> Context
        self.replies = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        import time

        from flwr.app import Metadata
        from flwr.app.message.message import make_message

        from client_app import app

        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            metadata = Metadata(
                run_id=1,
                message_id=f"query-{len(self.replies)}",
                src_node_id=0,
                dst_node_id=node,
                reply_to_message_id="",
                group_id=message.metadata.group_id,
                created_at=time.time(),
                ttl=3600.0,
                message_type=message.metadata.message_type,
            )
            reply = app(make_message(metadata, content=message.content), self.contexts[node])
            replies.append(reply)
        self.replies.extend(replies)
        return replies


def _settings(root, **overrides):
    from flwr_nnunet.apps.run_config import RunSettings

    values = {
        "data-root": str(root),
        "make-demo": False,
        "dataset": DATASET,
        "configuration": "2d",
        "planning": "federated",
        "min-available-nodes": 3,
        "node-wait": 0.0,
        **overrides,
    }
    return RunSettings.from_run_config(values)


def _options():
    from flwr_nnunet.apps.planning_phase import PlanningOptions

    return PlanningOptions(samples_per_case=SAMPLES_PER_CASE)


def query_grid(run_config, num_sites):
    """A :class:`QueryGrid` of ``num_sites`` simulated sites (``partition-id`` K) with this run config."""
    import sys
    from pathlib import Path

    from flwr.app import Context, RecordDict
    from strategy_support import set_task_identity

    repo = str(Path(__file__).resolve().parents[1])
    if repo not in sys.path:
        sys.path.insert(0, repo)  # client_app.py
    set_task_identity()  # what a running ServerApp has: messages are built with its run id
    return QueryGrid(
        {
            100 + k: Context(
                run_id=1,
                node_id=100 + k,
                node_config={"partition-id": k, "num-partitions": num_sites},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for k in range(num_sites)
        }
    )


def _grid(root, num_sites):
    return query_grid(
        {"data-root": str(root), "dataset": DATASET, "configuration": "2d", "make-demo": False}, num_sites
    )


@pytest.fixture(scope="module")
def planning_phase(sites):
    from flwr_nnunet.apps.planning_phase import run_planning_phase

    root = next(iter(sites.values())).parents[2]
    grid = _grid(root, len(sites))
    result = run_planning_phase(grid, _settings(root), _options())
    return {"root": root, "grid": grid, "result": result}


def test_the_planning_phase_gives_every_site_the_plans_nnunet_makes_of_the_pooled_data(
    planning_phase, pooled, federated
):
    from flwr_nnunet.nnunet.digests import plans_sha256

    result, root = planning_phase["result"], planning_phase["root"]
    assert result.plans == federated["plans"] | {"dataset_name": DATASET}
    assert _architecture(result.plans) == _architecture(pooled["plans"])
    assert sorted(result.sites.values()) == ["site-0", "site-1", "site-2"]
    assert not (root / "server" / "nnUNet_raw").exists()  # the server held no raw data at all
    server = json.loads((result.folder / "nnUNetPlans.json").read_text())
    for k, num_cases in enumerate(CASES):
        folder = root / f"site-{k}" / "nnUNet_preprocessed" / DATASET
        assert plans_sha256(json.loads((folder / "nnUNetPlans.json").read_text())) == plans_sha256(server)
        assert len(list((folder / "nnUNetPlans_2d").glob("*.pkl"))) == num_cases
        assert (folder / "dataset_fingerprint.json").is_file() and (folder / "splits_final.json").is_file()


def test_every_planning_reply_holds_only_the_listed_statistics_of_bounded_size(planning_phase):
    """Nothing per voxel, no image: each reply is one config record with the documented fields only."""
    from flwr_nnunet.nnunet.fingerprint import STATISTICS_FIELDS
    from flwr_nnunet.nnunet.intensity import DEFAULT_NUM_BINS

    replies = planning_phase["grid"].replies
    assert len(replies) == 9  # 3 stages x 3 sites
    stages = {"survey": set(SURVEY_FIELDS), "statistics": set(STATISTICS_FIELDS)}
    stages["plans"] = {"plans-sha256", "preprocessed", "num_cases"}
    case_counts = {}
    for reply in replies:
        assert not reply.has_error(), reply.error
        assert list(reply.content.keys()) == ["config"]  # no ArrayRecord, no MetricRecord
        assert not reply.content.array_records
        config = reply.content["config"]
        assert set(config.keys()) == {"planning-stage", "site-name", "planning"}
        stage, site, answer = config["planning-stage"], config["site-name"], json.loads(config["planning"])
        assert set(answer) == stages[stage], (stage, site)
        if stage == "survey":
            case_counts[site] = answer["num_cases"]
            assert len(config["planning"]) < 1000
        if stage == "statistics":
            n = case_counts[site]
            assert answer["num_cases"] == n
            for key in ("shapes_after_crop", "spacings", "relative_sizes_after_crop"):
                assert len(answer[key]) == n
            assert all(len(x) == 3 for x in answer["shapes_after_crop"] + answer["spacings"])
            (channel,) = answer["intensities"]
            assert set(channel) == {"count", "sum", "sum_squared_deviations", "min", "max", "histogram"}
            assert len(channel["histogram"]) <= DEFAULT_NUM_BINS and all(type(c) is int for c in channel["histogram"])
            # bounded by cases and bins, not by voxels (an 144x144 case alone has 20736)
            assert len(config["planning"]) < 200 * n + 8 * DEFAULT_NUM_BINS + 1000
        if stage == "plans":
            assert len(config["planning"]) < 200


def test_a_second_planning_phase_finds_the_sites_preprocessed_and_skips_them(planning_phase):
    from flwr_nnunet.apps.planning_phase import run_planning_phase

    root = planning_phase["root"]
    grid = _grid(root, len(CASES))
    run_planning_phase(grid, _settings(root), _options())
    answers = [
        json.loads(r.content["config"]["planning"])
        for r in grid.replies
        if r.content["config"]["planning-stage"] == "plans"
    ]
    assert [a["preprocessed"] for a in answers] == [False, False, False]


def test_a_site_with_another_label_set_stops_the_planning_phase_naming_it(planning_phase, tmp_path):
    from flwr_nnunet.apps.planning_phase import PlanningPhaseError, run_planning_phase

    root = tmp_path / "federation"
    for k, (size, n) in enumerate(zip((40, 40), (2, 2))):
        labels = LABELS if k == 0 else {"background": 0, "organ": 1, "tumour": 2}
        write_site(root / f"site-{k}" / "nnUNet_raw" / DATASET, k, size, n, labels=labels)
    settings = _settings(root, **{"min-available-nodes": 2})
    with pytest.raises(PlanningPhaseError) as caught:
        run_planning_phase(_grid(root, 2), settings, _options())
    message = str(caught.value)
    assert "before training" in message and "labels" in message and "site-0" in message and "site-1" in message
    assert not settings.server_dataset_folder.exists()  # no plans: no round can start
    assert not (root / "site-0" / "nnUNet_preprocessed").exists()


def test_a_site_without_raw_data_is_named_with_the_fix(planning_phase, tmp_path):
    from flwr_nnunet.apps.planning_phase import PlanningPhaseError, run_planning_phase

    root = tmp_path / "federation"
    write_site(root / "site-0" / "nnUNet_raw" / DATASET, 0, 40, 2)
    with pytest.raises(PlanningPhaseError, match=r"site-1: .*dataset.json not found.*nnU-Net's raw format"):
        run_planning_phase(_grid(root, 2), _settings(root, **{"min-available-nodes": 2}), _options())


@pytest.mark.parametrize(
    ("overrides", "fix"),
    [
        ({"planning": "pooled"}, "set run-config planning to 'federated'"),
        ({"planner": "resenc-m"}, "set plans='nnUNetResEncUNetMPlans'"),
        ({"planner": "huge"}, "set run-config planner to one of default, resenc-m, resenc-l, resenc-xl"),
    ],
)
def test_planning_settings_that_do_not_fit_stop_the_server_before_any_data_with_the_fix(tmp_path, overrides, fix):
    from flwr_nnunet.apps.config_errors import ServerConfigError
    from flwr_nnunet.apps.server import plan_before_training

    with pytest.raises(ServerConfigError, match=re.escape(fix)):
        plan_before_training(None, _settings(tmp_path, **overrides), check_only=True)
    assert not any(tmp_path.iterdir())


def test_a_stopped_planning_phase_is_one_server_config_error(planning_phase, tmp_path):
    from flwr_nnunet.apps.config_errors import ServerConfigError
    from flwr_nnunet.apps.server import plan_before_training

    with pytest.raises(ServerConfigError, match=r"needs every site: 0 node\(s\) connected"):
        plan_before_training(QueryGrid({}), _settings(tmp_path))


# --- the whole run: raw data at each site, nothing on the server, one simulation ----------------------------------


def _raw_only_federation(root, labels_of_site_2=LABELS):
    """``<root>/site-K/nnUNet_raw/<dataset>/`` and nothing else (documentation/your-own-datasets.md)."""
    for k, size in enumerate((40, 48, 56)):
        labels = LABELS if k < 2 else labels_of_site_2
        write_site(root / f"site-{k}" / "nnUNet_raw" / DATASET, k, size, 3, labels=labels)
    return root


def _simulate(root, **extra):
    from federation_support import run_config
    from test_apps_simulation import run_app_simulation

    run_app_simulation(run_config(root, DATASET, "2d", 3, **{"node-wait": 120.0}, **extra), num_supernodes=3)


@pytest.mark.slow
def test_one_simulation_plans_preprocesses_and_trains_from_raw_data_at_each_site(tmp_path):
    from flwr_nnunet.nnunet.digests import plans_sha256

    root = _raw_only_federation(tmp_path / "data")
    _simulate(root)
    model = root / "server" / "nnUNet_results" / DATASET / "nnUNetTrainer__nnUNetPlans__2d"
    assert (model / "plans.json").is_file() and (model / "fold_all" / "checkpoint_final.pth").is_file()
    assert not (root / "server" / "nnUNet_raw").exists()
    plans = json.loads((model / "plans.json").read_text())
    assert max(plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["features_per_stage"]) <= 16
    for k in range(3):
        site_plans = root / f"site-{k}" / "nnUNet_preprocessed" / DATASET / "nnUNetPlans.json"
        assert plans_sha256(json.loads(site_plans.read_text())) == plans_sha256(plans)


@pytest.mark.slow
def test_a_site_with_another_label_set_stops_the_simulation_before_training(tmp_path, flwr_log):
    """One line in the simulation's log names the sites and the field; nothing is planned, preprocessed or trained."""
    from flwr_nnunet.apps.config_errors import ServerConfigError

    root = _raw_only_federation(tmp_path / "data", labels_of_site_2={"background": 0, "organ": 1, "tumour": 2})
    with pytest.raises(ServerConfigError):
        _simulate(root)
    errors = [r.getMessage() for r in flwr_log if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    assert errors[0].startswith("flwr-nnunet: federated planning stopped before training:"), errors
    assert "labels" in errors[0] and all(f"site-{k}" in errors[0] for k in (0, 2)), errors
    assert "make every site's dataset.json agree on channel_names, labels" in errors[0]  # the fix
    assert "\n" not in errors[0] and not any(r.exc_info for r in flwr_log if r.levelname == "ERROR")
    assert not (root / "server" / "nnUNet_preprocessed" / DATASET).exists()  # no plans were made
    assert not (root / "server" / "nnUNet_results").exists() or not list((root / "server").rglob("*.pth"))
    assert not any((root / f"site-{k}" / "nnUNet_preprocessed").exists() for k in range(3))
    assert not any(
        list((root / f"site-{k}" / "nnUNet_results").rglob("*.pth"))
        for k in range(3)
        if (root / f"site-{k}" / "nnUNet_results").exists()
    )


def test_a_site_lost_during_the_survey_is_named_by_its_own_node_id():
    """Issue 22, item 3 (first part): the SuperLink's error reply for a lost node names that node, not node 1."""
    from flwr.app import ConfigRecord, RecordDict
    from flwr.app.message.message import make_message
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
    from strategy_support import LoopbackGrid, metadata, set_task_identity

    from flwr_nnunet.apps.planning_phase import PlanningPhaseError, ask_sites

    set_task_identity()

    class LosesNode22(LoopbackGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = []
            for index, message in enumerate(messages):  # as the SuperLink's grids set them when they push
                message.metadata.__dict__["_message_id"] = f"query-{index}"
                node = message.metadata.dst_node_id
                if node == 22:
                    replies.append(create_message_error_unavailable_res_message(message.metadata, "node_unavail"))
                else:
                    about = ConfigRecord({"site-name": f"site-{node}", "planning": "{}"})
                    replies.append(make_message(metadata(node, "query"), content=RecordDict({"config": about})))
            return replies

    with pytest.raises(PlanningPhaseError) as caught:
        ask_sites(LosesNode22([21, 22], lambda *_: None), [21, 22], "survey", {}, timeout=5)
    message = str(caught.value)
    assert "node 22: the SuperLink answered for node 22" in message and "Node Unavailable" in message
    assert "node 1:" not in message


# --- a site lost during planning (issue 22, item 3): the others go on when they meet min-available-nodes ----------


class LosingGrid(QueryGrid):
    """A :class:`QueryGrid` whose node ``lost`` is gone from planning stage ``stage`` on (the SuperLink answers
    for it, as Flower's does after the node's heartbeat), and that records the other messages it is given."""

    def __init__(self, contexts, lost, stage):
        super().__init__(contexts)
        self.lost, self.stage, self.gone, self.instructions = lost, stage, False, []

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import MessageType
        from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

        messages = list(messages)
        if messages[0].metadata.message_type != MessageType.QUERY:
            self.instructions.extend(messages)
            return []
        self.gone = self.gone or messages[0].content["config"]["planning-stage"] == self.stage
        for index, message in enumerate(messages):  # as the SuperLink's grids set them when they push
            message.metadata.__dict__["_message_id"] = f"query-{len(self.replies)}-{index}"
        lost = [m for m in messages if self.gone and m.metadata.dst_node_id == self.lost]
        kept = [m for m in messages if m not in lost]
        unavailable = [create_message_error_unavailable_res_message(m.metadata, "node_unavail") for m in lost]
        return super().send_and_receive(kept, timeout=timeout) + unavailable


def _small_federation(root):
    for k, size in enumerate((40, 48, 56)):
        write_site(root / f"site-{k}" / "nnUNet_raw" / DATASET, k, size, 2)
    return root


def _losing_grid(root, stage):
    grid = _grid(root, 3)
    return LosingGrid(grid.contexts, lost=102, stage=stage)


def test_a_site_lost_during_the_statistics_is_left_out_and_gets_the_plans_before_its_first_instruction(
    tmp_path, flwr_log
):
    """3 sites, min-available-nodes=2: site-2 (node 102) is lost at the statistics stage. The plans are made from
    the 2 others' statistics and installed there, a warning names node 102; when node 102 is back, the plans go to
    it before its first train instruction (once), and it holds the server's plans."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from flwr_nnunet.apps.planning_phase import PlansForLateSites, run_planning_phase
    from flwr_nnunet.nnunet.digests import plans_sha256

    root = _small_federation(tmp_path / "federation")
    grid = _losing_grid(root, "statistics")
    settings = _settings(root, **{"min-available-nodes": 2})
    result = run_planning_phase(grid, settings, _options())
    assert result.with_plans == {100, 101}
    assert len(result.fingerprint["spacings"]) == 4  # the cases of site-0 and site-1
    assert result.dataset_json["numTraining"] == 4
    warnings = [r.getMessage() for r in flwr_log if r.levelname == "WARNING"]
    assert any(
        "goes on with the 2 site(s)" in w and "node 102: the SuperLink answered for node 102" in w for w in warnings
    )
    site_2 = root / "site-2" / "nnUNet_preprocessed" / DATASET
    assert not (site_2 / "nnUNetPlans.json").exists()

    grid.lost = None  # node 102 is back
    late = PlansForLateSites(grid, result, settings)
    instructions = [
        Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN)
        for node in (100, 101, 102)
    ]
    asked = len(grid.replies)
    late.send_and_receive(instructions, timeout=5)
    plans_replies = grid.replies[asked:]
    assert [r.metadata.src_node_id for r in plans_replies] == [102]  # only the late site was asked
    assert grid.instructions == instructions  # then every instruction went out
    assert plans_sha256(json.loads((site_2 / "nnUNetPlans.json").read_text())) == plans_sha256(result.plans)
    assert len(list((site_2 / "nnUNetPlans_2d").glob("*.pkl"))) == 2
    late.send_and_receive(instructions, timeout=5)
    assert len(grid.replies) == asked + 1  # asked once


def test_too_few_sites_left_stop_planning_with_the_lost_node_and_the_fix(tmp_path):
    """min-available-nodes=3 and site-2 lost during the survey: planning stops naming node 102 and the fix; no
    plans were made."""
    from flwr_nnunet.apps.config_errors import ServerConfigError
    from flwr_nnunet.apps.server import plan_before_training

    root = _small_federation(tmp_path / "federation")
    settings = _settings(root, **{"min-available-nodes": 3})
    with pytest.raises(ServerConfigError) as caught:
        plan_before_training(_losing_grid(root, "survey"), settings)
    message = str(caught.value)
    assert "federated planning (survey) stopped: node 102: the SuperLink answered for node 102" in message
    assert "2 site(s) answered, fewer than the 3 needed (run-config min-available-nodes)" in message
    assert "start the lost SuperNodes and submit the run again" in message and "resume=true" in message
    assert not settings.server_dataset_folder.exists()
