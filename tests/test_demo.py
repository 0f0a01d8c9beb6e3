"""The synthetic multi-site demo: data, one set of plans for all sites, local-only baseline, prediction."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from flwr_nnunet.demo.data import load_demo_dataset, make_demo_dataset
from flwr_nnunet.demo.heldout import dice_scores, predict_test_cases, train_local_only
from flwr_nnunet.nnunet.digests import plans_sha256
from flwr_nnunet.nnunet.planning import merge_fingerprints
from flwr_nnunet.site.site import Site
from flwr_nnunet.site.spec import SiteSpec, TrainOptions


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", num_sites=3)


DEMO_PLANS = {
    (2, 3): "a0ae5322f006e9bea761f1df9ca3ad2d30c116c74ee739848a618b18ad4e2439",
    (3, 3): "1aa040167483bf863bcc20fb9daf0d94adcd5735d99c8314c8c055540021670c",
}
"""sha256 of the sorted-key JSON of the demo's plans (dims, sites) as the demo planned them before the run planned
them (commit 04e2a92): the plans of the Dice tables (README, documentation/getting-started.md)."""


def image(path):
    return np.array(Image.open(path)).astype(np.float64)


def plans_digest(plans_file):
    return hashlib.sha256(json.dumps(json.loads(plans_file.read_text()), sort_keys=True).encode()).hexdigest()


@pytest.fixture(scope="module")
def raw_demo(tmp_path_factory):
    """What make-demo=true writes before the run: the sites' raw data and splits, nothing planned."""
    return make_demo_dataset(tmp_path_factory.mktemp("raw") / "data", num_sites=3, planned=False)


def test_the_unplanned_demo_holds_only_what_hospitals_hold(raw_demo):
    root = raw_demo.root
    assert sorted(p.name for p in (root / "server").iterdir()) == ["nnUNet_results"]
    assert not any((root / "server" / "nnUNet_results").iterdir())
    for site in raw_demo.sites:
        assert sorted(p.name for p in site.preprocessed_dataset_folder.iterdir()) == ["splits_final.json"]
        assert sorted(p.name for p in site.raw_dataset_folder.iterdir()) == [
            "dataset.json",
            "imagesTr",
            "imagesTs",
            "labelsTr",
            "labelsTs",
        ]


def test_the_run_s_planning_phase_gives_the_demo_the_plans_it_had(raw_demo, demo):
    """The planning phase over client_app.py's query handler, with make-demo's options: the pinned plans."""
    from test_federated_planning import query_grid

    from flwr_nnunet.apps.planning_phase import run_planning_phase
    from flwr_nnunet.apps.server import planning_options, read_settings
    from flwr_nnunet.demo.run_data import DEMO_RUN_DATA

    config = {"data-root": str(raw_demo.root), "node-wait": 0.0, "min-available-nodes": 3}
    settings = read_settings(config)
    result = run_planning_phase(query_grid(config, 3), settings, planning_options(settings, DEMO_RUN_DATA))
    assert result.folder == raw_demo.server.preprocessed_dataset_folder
    assert plans_digest(raw_demo.plans_file) == DEMO_PLANS[(2, 3)] == plans_digest(demo.plans_file)
    for site in raw_demo.sites:
        assert plans_digest(site.preprocessed_dataset_folder / "nnUNetPlans.json") == DEMO_PLANS[(2, 3)]
        assert {p.stem for p in (site.preprocessed_dataset_folder / "nnUNetPlans_2d").glob("*.pkl")} == set(
            site.training_cases
        )
        splits = json.loads((site.preprocessed_dataset_folder / "splits_final.json").read_text())
        assert splits[0]["val"] == list(site.validation_cases)  # the demo's split, kept


def test_sites_share_one_set_of_tiny_plans(demo):
    assert plans_digest(demo.plans_file) == DEMO_PLANS[(2, 3)]
    assert demo.run_config()["planning"] == "fixed"  # a run pointed at a planned demo trains on its plans
    server_plans = json.loads(demo.plans_file.read_text())
    assert list(server_plans["configurations"]) == ["2d"]
    assert max(server_plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["features_per_stage"]) <= 32
    for site in demo.sites:
        plans = json.loads((site.preprocessed_dataset_folder / "nnUNetPlans.json").read_text())
        assert plans_sha256(plans) == plans_sha256(server_plans)
    merged = json.loads((demo.server.preprocessed_dataset_folder / "dataset_fingerprint.json").read_text())
    assert len(merged["spacings"]) == sum(len(site.training_cases) for site in demo.sites)
    assert not (demo.root / "server" / "nnUNet_raw").exists()  # planned from the sites' statistics: no case copied


def test_every_site_is_written_in_nnunet_raw_and_preprocessed_format(demo):
    for site in demo.sites:
        raw = site.raw_dataset_folder
        assert sorted(p.name for p in (raw / "imagesTr").iterdir()) == sorted(
            f"{c}_0000.png" for c in site.training_cases
        )
        assert sorted(p.name for p in site.images_ts.iterdir()) == sorted(f"{c}_0000.png" for c in site.test_cases)
        assert all((site.labels_ts / f"{c}.png").is_file() for c in site.test_cases)
        preprocessed = site.preprocessed_dataset_folder / "nnUNetPlans_2d"
        assert {p.name.split(".")[0] for p in preprocessed.glob("*.pkl")} == set(site.training_cases)
        splits = json.loads((site.preprocessed_dataset_folder / "splits_final.json").read_text())
        assert splits[0]["val"] == list(site.validation_cases) and site.validation_cases
        labels = np.unique(np.concatenate([image(site.labels_ts / f"{c}.png").ravel() for c in site.test_cases]))
        assert labels.tolist() == [0, 1, 2]


def test_sites_look_different(demo):
    def statistics(site):
        cases = [image(site.raw_dataset_folder / "imagesTr" / f"{c}_0000.png") for c in site.training_cases]
        labels = [image(site.raw_dataset_folder / "labelsTr" / f"{c}.png") for c in site.training_cases]
        background = np.median([np.median(i[l == 0]) for i, l in zip(cases, labels)])
        organ_size = np.mean([np.mean(l > 0) for l in labels])
        return background, organ_size

    backgrounds, sizes = zip(*(statistics(site) for site in demo.sites))
    assert min(abs(a - b) for i, a in enumerate(backgrounds) for b in backgrounds[i + 1 :]) > 10
    assert max(sizes) > 1.5 * min(sizes)


def test_demo_is_reused_and_other_data_is_never_overwritten(demo, tmp_path):
    manifest = demo.root / "demo.json"
    stamp = manifest.stat().st_mtime_ns
    assert make_demo_dataset(demo.root, num_sites=3) == demo == load_demo_dataset(demo.root)
    assert manifest.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other parameters"):
        make_demo_dataset(demo.root, num_sites=2)
    (tmp_path / "server").mkdir()
    with pytest.raises(ValueError, match="not a demo"):
        make_demo_dataset(tmp_path)
    assert (tmp_path / "server").is_dir()
    with pytest.raises(FileNotFoundError, match="flwr-nnunet demo"):
        load_demo_dataset(tmp_path / "empty")


def fingerprint(values, cases):
    low, median, high = np.percentile(values, (0.5, 50, 99.5))
    return {
        "spacings": [[1.0, 1.0]] * cases,
        "shapes_after_crop": [[8, 8]] * cases,
        "foreground_intensity_properties_per_channel": {
            "0": {
                "mean": values.mean(),
                "median": median,
                "std": values.std(),
                "min": values.min(),
                "max": values.max(),
                "percentile_99_5": high,
                "percentile_00_5": low,
            }
        },
        "median_relative_size_after_cropping": 1.0,
    }


def test_merged_fingerprint_pools_statistics_like_the_pooled_voxels():
    rng = np.random.default_rng(0)
    a, b = rng.normal(10, 2, 3000), rng.normal(40, 5, 1000)  # 3 cases and 1 case, 1000 samples each
    merged = merge_fingerprints([fingerprint(a, 3), fingerprint(b, 1)])
    pooled = np.concatenate([a, b])
    stats = merged["foreground_intensity_properties_per_channel"]["0"]
    assert stats["mean"] == pytest.approx(pooled.mean())
    assert stats["std"] == pytest.approx(pooled.std())
    assert (stats["min"], stats["max"]) == (pooled.min(), pooled.max())
    assert len(merged["spacings"]) == 4
    with pytest.raises(ValueError, match="no fingerprints"):
        merge_fingerprints([])


def test_dice_scores(demo):
    site = demo.sites[0]
    perfect = dice_scores(site.labels_ts, site.labels_ts, site.test_cases, ".png")
    assert perfect == {"organ": 1.0, "lesion": 1.0, "mean": 1.0}


@pytest.mark.slow
def test_local_only_baseline_predicts_with_nnunetv2_predict(demo, tmp_path):
    site = demo.sites[0]
    model = train_local_only(
        demo, site, tmp_path / "local", epochs=3, iterations_per_epoch=20, val_iterations_per_epoch=2
    )
    assert (model / "fold_0" / "checkpoint_final.pth").is_file() and (model / "plans.json").is_file()
    scores = predict_test_cases(demo, site, tmp_path / "local", tmp_path / "predictions", fold="0")
    assert sorted(p.name for p in (tmp_path / "predictions").glob("*.png")) == sorted(
        f"{c}.png" for c in site.test_cases
    )
    labels = [image(site.labels_ts / f"{c}.png") for c in site.test_cases]
    everything_organ = max(2 * np.mean(label == 1) / (1 + np.mean(label == 1)) for label in labels)
    assert scores["organ"] > everything_organ + 0.3  # a model that learned nothing scores at most the first term


@pytest.mark.slow
def test_3d_demo_trains_and_evaluates(tmp_path):
    demo = make_demo_dataset(tmp_path / "data3d", num_sites=2, dims=3, size=16)
    assert demo.configuration == "3d_fullres" and demo.file_ending == ".nii.gz"
    plans = json.loads(demo.plans_file.read_text())
    assert len(plans["configurations"]["3d_fullres"]["patch_size"]) == 3
    site = demo.sites[0]
    spec = SiteSpec(
        name=site.name,
        dataset=demo.dataset_name,
        nnunet_preprocessed=site.nnunet_preprocessed,
        nnunet_results=site.nnunet_results,
        configuration="3d_fullres",
        device="cpu",
    )
    live = Site(spec)
    live.start(TrainOptions())
    start = {k: v.clone() for k, v in live.canonical().items()}
    options = TrainOptions(local_epochs=1, num_epochs=1, iterations_per_epoch=2, val_iterations_per_epoch=1)
    update, metrics = live.train(start, options)
    assert metrics["num-examples"] > 0 and update.keys() == start.keys()
    assert live.evaluate(update, options)["num-examples"] == len(site.validation_cases)
