"""The 3D demo's parameters: what was measured to learn both labels, and 2D unchanged.

(documentation/getting-started.md, "The 3D demo".)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from flwr_nnunet.demo.synthesis import SITE_STYLES, SITE_STYLES_3D, site_styles, synthesize_case

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo-3d.toml"


def test_2d_sites_are_unchanged_and_3d_sites_have_their_own_styles():
    assert site_styles(2) is SITE_STYLES and site_styles(3) is SITE_STYLES_3D
    assert all(style.lesion == (0.35, 0.5) for style in SITE_STYLES)
    # the 2D images are the ones the README's 2D table was measured on (digests of the images before 3D styles);
    # the fourth style serves the 4-site experiments (documentation/hospitals-that-differ.md)
    pinned = ("04b50b3d33b4038d", "d3c0644e967cbd31", "afde397871c3f464")
    assert len(SITE_STYLES) == 4
    for index, style in enumerate(SITE_STYLES[:3]):
        image, label = synthesize_case(np.random.default_rng([0, index]), style, (64, 64))
        assert hashlib.sha256(image.tobytes() + label.tobytes()).hexdigest()[:16] == pinned[index]


def test_3d_lesions_are_large_enough_to_learn_in_a_few_minutes():
    """Every 3D site's lesion holds at least ~100 of the 32^3 voxels and stands out of the noise."""
    for index, style in enumerate(SITE_STYLES_3D):
        rng = np.random.default_rng([0, index])
        fractions = []
        for _ in range(4):
            _, label = synthesize_case(rng, style, (32, 32, 32))
            fractions.append((label == 2).mean())
        assert min(fractions) > 0.003, (index, fractions)
        assert style.contrast / style.noise >= 4.0


def test_the_3d_run_config_is_the_measured_budget():
    config = tomllib.loads(CONFIG.read_text())
    assert config["demo-3d"] is True and config["configuration"] == "3d_fullres"
    assert (config["num-server-rounds"], config["iterations-per-epoch"]) == (6, 30)


def test_the_3d_demo_planned_in_the_run_has_the_plans_it_had(tmp_path):
    """make-demo=true with demo-3d=true: raw volumes only, then the run's planning phase gives the pinned plans."""
    from test_demo import DEMO_PLANS, plans_digest
    from test_federated_planning import query_grid

    from flwr_nnunet.apps.planning_phase import run_planning_phase
    from flwr_nnunet.apps.server import planning_options, prepare_data, read_settings
    from flwr_nnunet.demo.run_data import DEMO_RUN_DATA

    config = {**tomllib.loads(CONFIG.read_text()), "data-root": str(tmp_path / "data"), "node-wait": 0.0}
    settings = read_settings(config)
    prepare_data(settings, DEMO_RUN_DATA)
    assert not settings.server_dataset_folder.exists()  # nothing planned before the run
    run_planning_phase(query_grid(config, 3), settings, planning_options(settings, DEMO_RUN_DATA))
    plans = settings.server_dataset_folder / "nnUNetPlans.json"
    assert plans_digest(plans) == DEMO_PLANS[(3, 3)]
    assert list(json.loads(plans.read_text())["configurations"]) == ["3d_fullres"]
