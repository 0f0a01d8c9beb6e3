"""The planning phase's label-convention check: a site whose label volumes contradict the others' is named.

Unit tests of the rule on hand-made surveys, properties (site order and a
site's scale do not matter), and the check end to end: the demo's raw sites
with one site's labels 1 and 2 swapped in its labelsTr, through the real
``site_survey`` and the planning phase's log.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from flwr_nnunet.demo.data import make_demo_dataset, plan_demo
from flwr_nnunet.nnunet.fingerprint import site_survey
from flwr_nnunet.nnunet.label_convention import label_convention_warnings

LABELS = {"background": 0, "organ": 1, "lesion": 2}


def survey(organ, lesion, background=10000, num_cases=5, labels=LABELS):
    """A survey with the fields the check reads: labels, number of cases, voxels per label value."""
    return {
        "labels": labels,
        "num_cases": num_cases,
        "label_voxels": {"0": background, "1": organ, "2": lesion},
    }


def named(warnings):
    assert all(line.startswith(f"{site}: ") for site, line in warnings.items())
    return set(warnings)


def test_honest_sites_with_ratios_between_3_and_7_give_no_warning():
    surveys = {f"site-{k}": survey(ratio * 100, 100) for k, ratio in enumerate((3, 4.5, 7, 5))}
    assert label_convention_warnings(surveys) == {}


def test_a_site_with_the_ratio_reversed_is_named_with_both_labels_and_the_evidence():
    surveys = {"site-0": survey(390, 100), "site-1": survey(620, 100), "site-2": survey(21, 100)}
    surveys["site-3"] = survey(500, 100)
    (line,) = label_convention_warnings(surveys).values()
    assert line == (
        "site-2: labels 'organ' (1) and 'lesion' (2) look swapped: 'organ' / 'lesion' voxels = 0.21 here, "
        "3.9 to 6.2 at the other 3 sites; check this site's labelsTr against dataset.json's labels"
    )


@pytest.mark.parametrize(
    "ratios",
    [
        (1.1, 0.9, 1.2, 0.95),  # every site near 1: the sign is noise
        (4, 5, 6, 0.9),  # the others agree, but this site's ratio is only noisy around 1
        (4, 5, 1.2, 0.5),  # one other site does not clearly agree
    ],
)
def test_ratios_near_1_give_no_warning(ratios):
    surveys = {f"site-{k}": survey(int(ratio * 1000), 1000) for k, ratio in enumerate(ratios)}
    assert label_convention_warnings(surveys) == {}


def test_a_site_without_a_label_every_other_site_has_is_named():
    surveys = {"site-0": survey(400, 100), "site-1": survey(300, 0, num_cases=7), "site-2": survey(500, 90)}
    assert label_convention_warnings(surveys) == {
        "site-1": "site-1: no voxel of label 'lesion' (2) in its 7 training cases, which every other site has; "
        "check this site's labelsTr against dataset.json's labels"
    }


def test_a_label_two_sites_lack_names_neither():
    surveys = {"site-0": survey(400, 100), "site-1": survey(300, 0), "site-2": survey(500, 0), "site-3": survey(9, 1)}
    assert label_convention_warnings(surveys) == {}


@pytest.mark.parametrize("second", [survey(10, 100), survey(400, 0)])
def test_with_a_single_other_site_no_site_is_named(second):
    assert label_convention_warnings({"site-0": survey(400, 100), "site-1": second}) == {}


def test_surveys_without_label_voxels_are_left_out():
    older = {k: v for k, v in survey(10, 100).items() if k != "label_voxels"}
    assert label_convention_warnings({f"site-{k}": older for k in range(4)}) == {}
    surveys = {"site-0": older, "site-1": survey(400, 100), "site-2": survey(500, 100), "site-3": survey(10, 100)}
    assert named(label_convention_warnings(surveys)) == {"site-3"}
    surveys["site-2"] = older  # only one other site with counts is left
    assert label_convention_warnings(surveys) == {}


@pytest.mark.parametrize(
    "surveys",
    [
        {},
        {"site-0": survey(400, 100)},
        {f"site-{k}": survey(0, 0, background=0) for k in range(3)},
        {f"site-{k}": {"label_voxels": {}} for k in range(3)},
        {f"site-{k}": {"label_voxels": {"1": "many", "2": None}} for k in range(3)},
        {f"site-{k}": {"label_voxels": {"1": -5, "2": float("nan")}} for k in range(3)},
        {f"site-{k}": {"label_voxels": [1, 2]} for k in range(3)},
        {"site-0": None, "site-1": "survey", "site-2": 3},
    ],
    ids=["none", "one site", "zero counts", "empty counts", "text counts", "negative and nan", "a list", "no mapping"],
)
def test_odd_input_gives_no_warning_and_never_raises(surveys):
    assert label_convention_warnings(surveys) == {}


def test_without_label_names_the_values_are_quoted():
    surveys = {f"site-{k}": {"label_voxels": {"1": 500, "2": 100}} for k in range(3)}
    surveys["site-1"]["label_voxels"] = {"1": 100, "2": 500}
    (line,) = label_convention_warnings(surveys).values()
    assert line.startswith("site-1: labels value 1 and value 2 look swapped: value 1 / value 2 voxels = 0.2 here")


def test_of_several_reversed_pairs_the_swapped_one_is_named_and_the_rest_listed():
    labels = {"background": 0, "organ": 1, "lesion": 2, "vessel": 3}
    honest = {"0": 10000, "1": 1000, "2": 10, "3": 100}
    swapped = {"0": 10000, "1": 10, "2": 1000, "3": 100}
    surveys = {f"site-{k}": {"labels": labels, "label_voxels": dict(honest)} for k in range(3)}
    surveys["site-9"] = {"labels": labels, "label_voxels": swapped}
    (line,) = label_convention_warnings(surveys).values()
    assert line.startswith("site-9: labels 'organ' (1) and 'lesion' (2) look swapped: 'organ' / 'lesion' voxels")
    assert "(also reversed here: 'organ' / 'vessel', 'lesion' / 'vessel')" in line


def test_the_ignore_label_is_not_compared():
    labels = {"background": 0, "organ": 1, "ignore": 2}
    surveys = {f"site-{k}": {"labels": labels, "label_voxels": {"1": 500, "2": 100}} for k in range(3)}
    surveys["site-1"]["label_voxels"] = {"1": 100, "2": 5000}
    assert label_convention_warnings(surveys) == {}


counts = st.one_of(st.integers(0, 20), st.integers(0, 10**6))
surveys_strategy = st.lists(
    st.fixed_dictionaries({"0": counts, "1": counts, "2": counts, "3": counts}), min_size=3, max_size=6
).map(
    lambda voxels: {
        f"site-{k}": {"labels": {"background": 0, "a": 1, "b": 2, "c": 3}, "num_cases": 4, "label_voxels": v}
        for k, v in enumerate(voxels)
    }
)


@settings(max_examples=200, deadline=None)
@given(surveys=surveys_strategy, data=st.data())
def test_the_order_of_the_sites_does_not_change_which_are_named(surveys, data):
    order = data.draw(st.permutations(list(surveys)))
    permuted = {site: surveys[site] for site in order}
    assert label_convention_warnings(permuted) == label_convention_warnings(surveys)


@settings(max_examples=200, deadline=None)
@given(surveys=surveys_strategy, data=st.data())
def test_scaling_one_site_s_counts_does_not_change_the_result(surveys, data):
    site = data.draw(st.sampled_from(sorted(surveys)))
    factor = data.draw(st.integers(2, 1000))
    scaled = dict(surveys)
    scaled[site] = {**surveys[site], "label_voxels": {k: c * factor for k, c in surveys[site]["label_voxels"].items()}}
    assert label_convention_warnings(scaled) == label_convention_warnings(surveys)


SWAPPED_SITE = "site-1"


@pytest.fixture(scope="module")
def swapped_demo(tmp_path_factory):
    """The raw demo (3 sites) with labels 1 and 2 swapped in every labelsTr file of SWAPPED_SITE."""
    demo = make_demo_dataset(tmp_path_factory.mktemp("swapped") / "data", num_sites=3, planned=False)
    (site,) = [s for s in demo.sites if s.name == SWAPPED_SITE]
    for path in sorted((site.raw_dataset_folder / "labelsTr").glob("*.png")):
        labels = np.array(Image.open(path))
        swapped = labels.copy()
        swapped[labels == 1], swapped[labels == 2] = 2, 1
        Image.fromarray(swapped).save(path)
    return demo


def _warning(site):
    return f"{site}: labels 'organ' (1) and 'lesion' (2) look swapped: 'organ' / 'lesion' voxels = "


def test_site_survey_counts_voxels_per_label_and_the_swapped_site_is_named(swapped_demo):
    surveys = {site.name: site_survey(site.raw_dataset_folder) for site in swapped_demo.sites}
    for name, answer in surveys.items():
        voxels = answer["label_voxels"]
        assert set(voxels) == {"0", "1", "2"} and all(type(c) is int for c in voxels.values())
        assert sum(voxels.values()) == answer["num_cases"] * 64 * 64  # every voxel of every case, once
        assert len(json.dumps(answer)) < 1000, name
    ratios = {name: s["label_voxels"]["1"] / s["label_voxels"]["2"] for name, s in surveys.items()}
    assert ratios[SWAPPED_SITE] < 1 < min(r for name, r in ratios.items() if name != SWAPPED_SITE)
    (line,) = label_convention_warnings(surveys).values()
    assert line.startswith(_warning(SWAPPED_SITE)) and "at the other 2 sites" in line


def test_the_planning_phase_warns_naming_the_site_and_plans_as_it_would_without_the_swap(swapped_demo, flwr_log):
    """plan_with_sites (in-process, the demo's options) logs the line and goes on to the demo's pinned plans."""
    from test_demo import DEMO_PLANS, plans_digest

    plan_demo(swapped_demo)
    assert plans_digest(swapped_demo.plans_file) == DEMO_PLANS[(2, 3)]  # the same foreground: the same plans
    warnings = [r.getMessage() for r in flwr_log if r.levelname == "WARNING" and "look swapped" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("flwr-nnunet: federated planning: " + _warning(SWAPPED_SITE))
