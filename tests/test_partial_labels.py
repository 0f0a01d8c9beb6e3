"""Partial labels: a declared federation label set, sites that annotated part of it, the marginal loss, and the
per-label Dice weighted over the sites that scored each label."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from federation_support import run_config, run_federation
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from flwr_nnunet.demo.corruption import annotate_only
from flwr_nnunet.demo.data import make_demo_dataset
from flwr_nnunet.nnunet.label_sets import (
    DRAWN_AS_KEY,
    check_label_set,
    partial_label_shares,
    predictions_as_drawn,
    site_drawn_as,
)
from flwr_nnunet.site.marginal_loss import MarginalLoss, merge_classes
from flwr_nnunet.strategy.aggregation import aggregate_site_metrics

FEDERATION = {"background": 0, "organ": 1, "lesion": 2}


def nnunet_loss():
    """nnU-Net's default loss (Dice + cross-entropy), as its trainer builds it without deep supervision."""
    soft_dice = {"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}
    return DC_and_CE_loss(soft_dice, {}, weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)


def test_merged_classes_are_the_softmax_of_their_sum():
    logits = torch.randn(2, 3, 5, 5)
    merged = merge_classes(logits, [0, 1, 0])
    probabilities = logits.softmax(1)
    expected = torch.stack([probabilities[:, 0] + probabilities[:, 2], probabilities[:, 1]], dim=1)
    assert torch.allclose(merged.softmax(1), expected, atol=1e-6)


def test_the_marginal_loss_does_not_punish_an_unannotated_label_where_the_site_drew_background():
    target = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    target[..., 2:5, 2:5] = 1  # the organ; no lesion was drawn at this site
    organ = torch.full((1, 3, 8, 8), -10.0)
    organ[:, 1][target[:, 0] == 1] = 10.0
    background_there, lesion_there = organ.clone(), organ.clone()
    background_there[:, 0][target[:, 0] == 0] = 10.0
    lesion_there[:, 2][target[:, 0] == 0] = 10.0  # the model calls the background lesion
    marginal, naive = MarginalLoss(nnunet_loss(), [0, 1, 0]), nnunet_loss()
    assert marginal(lesion_there, target) == pytest.approx(float(marginal(background_there, target)), abs=1e-4)
    assert naive(lesion_there, target) > naive(background_there, target) + 1.0
    full = MarginalLoss(nnunet_loss(), [0, 1, 2])  # a site that annotated everything: nnU-Net's loss itself
    assert float(full(lesion_there, target)) == pytest.approx(float(naive(lesion_there, target)), abs=1e-6)
    deep = MarginalLoss(lambda outputs, targets: sum(nnunet_loss()(o, t) for o, t in zip(outputs, targets)), [0, 1, 0])
    assert float(deep([lesion_there, lesion_there], [target, target])) == pytest.approx(
        2 * float(marginal(lesion_there, target)), abs=1e-4
    )


def test_a_lesion_drawn_as_organ_is_merged_with_the_organ_not_the_background():
    logits = torch.randn(2, 3, 5, 5)
    probabilities = logits.softmax(1)
    merged = merge_classes(logits, [0, 1, 1]).softmax(1)
    assert torch.allclose(merged, torch.stack([probabilities[:, 0], probabilities[:, 1] + probabilities[:, 2]], 1))
    target = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    target[..., 2:6, 2:6] = 1  # the organ, drawn over its lesion
    lesion_within, lesion_outside = torch.full((1, 3, 8, 8), -10.0), torch.full((1, 3, 8, 8), -10.0)
    for logits_, where in ((lesion_within, target[:, 0] == 1), (lesion_outside, target[:, 0] == 0)):
        logits_[:, 0][target[:, 0] == 0] = 10.0
        logits_[:, 1][target[:, 0] == 1] = 10.0
    lesion_within[:, 2, 3:5, 3:5] = 30.0  # a lesion predicted inside the organ: what the site drew as organ
    lesion_outside[:, 2, 0:2, 0:2] = 30.0  # a lesion predicted in the background: wrong at this site
    within, inside_background = MarginalLoss(nnunet_loss(), [0, 1, 1]), MarginalLoss(nnunet_loss(), [0, 1, 0])
    assert float(within(lesion_within, target)) < 0.01
    assert float(within(lesion_outside, target)) > 0.1  # background voxels are known not to be lesion here
    assert float(inside_background(lesion_within, target)) > 0.1  # merged with background: punished in the organ


def test_a_site_declares_what_it_drew_its_unannotated_labels_as():
    organ_only = {"background": 0, "organ": 1}
    assert site_drawn_as(organ_only, {}, FEDERATION) == [0, 1, 0]
    assert site_drawn_as(organ_only, {"lesion": "organ"}, FEDERATION) == [0, 1, 1]
    assert site_drawn_as(FEDERATION, {}, FEDERATION) == [0, 1, 2]
    for wrong in ({"lesion": "tumour"}, {"organ": "background"}, {"vessel": "organ"}):
        with pytest.raises(ValueError, match="unannotated_drawn_as"):
            partial_label_shares({"a": FEDERATION, "b": organ_only}, FEDERATION, {"b": wrong})
    confusion = np.array([[5, 0, 1], [0, 7, 2], [0, 0, 0]])  # the site's labels hold no lesion; 2 predicted in organ
    assert predictions_as_drawn(confusion, [0, 1, 1]).tolist() == [[5, 1, 0], [0, 9, 0], [0, 0, 0]]
    assert predictions_as_drawn(confusion, [0, 1, 0]).tolist() == [[6, 0, 0], [2, 7, 0], [0, 0, 0]]


def test_declared_label_sets_and_what_a_site_may_declare():
    assert list(check_label_set({"lesion": 2, "background": 0, "organ": 1})) == ["background", "organ", "lesion"]
    with pytest.raises(ValueError, match="background=0 and the consecutive values"):
        check_label_set({"background": 0, "lesion": 2})
    shares = partial_label_shares({"a": FEDERATION, "b": {"background": 0, "organ": 1}}, FEDERATION)
    assert shares == {"b": ["background", "organ"]}
    with pytest.raises(ValueError, match="declares label 'tumour' = 2"):
        partial_label_shares({"a": FEDERATION, "b": {"background": 0, "tumour": 2}}, FEDERATION)
    with pytest.raises(ValueError, match=r"no site annotated \['lesion'\]"):
        partial_label_shares({"a": {"background": 0, "organ": 1}}, FEDERATION)


def site_reply(name, dice_per_class, annotated=None, cases=2):
    metrics = {"num-examples": cases, "dice": 0.5, "dice-per-class": dice_per_class}
    if annotated is not None:
        metrics["annotated-per-class"] = annotated
    return RecordDict({"metrics": MetricRecord(metrics), "config": ConfigRecord({"site-name": name})})


def test_a_label_is_averaged_over_the_sites_that_scored_it():
    replies = [site_reply("a", [0.9, 0.6]), site_reply("b", [0.7, 0.0], [1, 0], cases=6)]
    aggregated = aggregate_site_metrics(replies, "num-examples")
    assert aggregated["dice-per-class"] == pytest.approx([(2 * 0.9 + 6 * 0.7) / 8, 0.6])
    plain = aggregate_site_metrics([site_reply("a", [0.9, 0.6]), site_reply("b", [0.7, 0.2])], "num-examples")
    assert plain["dice-per-class"] == pytest.approx([0.8, 0.4])  # without partial labels: Flower's weighted mean


@pytest.mark.slow
def test_a_federation_with_a_site_that_annotated_the_organ_only(tmp_path, flwr_log):
    demo = make_demo_dataset(tmp_path / "data", num_sites=3, planned=False)
    annotate_only(demo.sites[2], demo.file_ending, {"background": 0, "organ": 1})
    declared = {"labels": "background=0 organ=1 lesion=2", "num-server-rounds": 1}
    done = run_federation(run_config(demo.root, demo.dataset_name, "2d", 3, **declared), 3)
    assert done["dataset_json"]["labels"] == FEDERATION
    installed = json.loads((demo.sites[2].preprocessed_dataset_folder / "dataset.json").read_text())
    assert installed["labels"] == FEDERATION and installed[DRAWN_AS_KEY] == [0, 1, 0]
    other = json.loads((demo.sites[0].preprocessed_dataset_folder / "dataset.json").read_text())
    assert DRAWN_AS_KEY not in other
    lines = [r.getMessage() for r in flwr_log if "annotated ['background', 'organ']" in r.getMessage()]
    assert lines and "site-2" in lines[0] and "marginal loss" in lines[0]
    evaluated = done["history"]["1"]["evaluate"]
    assert evaluated["sites"]["site-2"]["annotated-per-class"] == [1, 0]
    assert "annotated-per-class" not in evaluated["sites"]["site-0"]
    lesion = [evaluated["sites"][s]["dice-per-class"][1] for s in ("site-0", "site-1")]
    cases = [evaluated["sites"][s]["num-examples"] for s in ("site-0", "site-1")]
    expected = sum(d * n for d, n in zip(lesion, cases)) / sum(cases)
    assert evaluated["aggregated"]["dice-per-class"][1] == pytest.approx(expected)  # site-2 left out of the lesion


def test_an_undeclared_label_subset_still_stops_planning(tmp_path):
    demo = make_demo_dataset(tmp_path / "data", num_sites=3, planned=False)
    annotate_only(demo.sites[2], demo.file_ending, {"background": 0, "organ": 1})
    with pytest.raises(Exception, match="labels") as caught:
        run_federation(run_config(demo.root, demo.dataset_name, "2d", 3), 3)
    assert "site-2" in str(caught.value) and "make every site's dataset.json agree" in str(caught.value)
