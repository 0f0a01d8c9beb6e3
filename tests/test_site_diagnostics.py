"""A site that hurts the federation: label matching from voxel counts, update cosines, the flag and what it changes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MessageType, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from strategy_support import LoopbackGrid, canonical, evaluate_reply, perturbed, reply, set_task_identity, tiny_network

from flwr_nnunet import NnUNetFedAvg
from flwr_nnunet.nnunet.checkpoint_io import load_checkpoint
from flwr_nnunet.nnunet.metrics import best_label_matching, label_confusion
from flwr_nnunet.strategy.registry import strategy_from_name
from flwr_nnunet.strategy.replies import AcceptedReply
from flwr_nnunet.strategy.site_diagnostics import (
    SiteDiagnostics,
    cosines_to_others,
    is_segmentation_head,
    update_gram,
)

HONEST = [[9000, 40, 10], [60, 700, 30], [20, 40, 180]]
"""Reference rows x predicted columns (background, organ, lesion): a model that fits the labels as they are."""
SWAPPED = [[9000, 40, 10], [20, 40, 180], [60, 700, 30]]
"""The same voxels at a site whose labels 1 and 2 are swapped."""


def flat(matrix):
    return [float(v) for row in matrix for v in row]


def test_label_confusion_counts_reference_rows_against_predicted_columns():
    truth = np.array([[0, 1, 1], [2, 2, 0]])
    predicted = np.array([[0, 1, 2], [2, 1, 1]])
    assert label_confusion(truth, predicted, 3).tolist() == [[1, 1, 0], [0, 1, 1], [0, 1, 1]]
    assert label_confusion(np.array([-1, 0]), np.array([0, 0]), 3).sum() == 1  # the ignore label is not counted


def test_best_label_matching_finds_a_swap_and_keeps_the_identity_otherwise():
    honest, swapped = best_label_matching(np.array(HONEST)), best_label_matching(np.array(SWAPPED))
    assert honest.is_identity and honest.dice_matched == honest.dice_as_labelled
    assert swapped.permutation == (2, 1) and swapped.swaps() == [(1, 2), (2, 1)]
    assert swapped.dice_matched == pytest.approx(honest.dice_as_labelled)
    assert swapped.dice_as_labelled < 0.1 and swapped.dice_matched > 0.8
    assert swapped.mean_dice((1, 2)) == pytest.approx(swapped.dice_as_labelled)
    with pytest.raises(ValueError, match="square"):
        best_label_matching(np.zeros((2, 3)))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 4).flatmap(
        lambda k: st.tuples(st.just(k), st.lists(st.integers(0, 50), min_size=k * k, max_size=k * k))
    )
)
def test_best_label_matching_is_the_best_of_every_permutation(drawn):
    size, values = drawn
    counts = np.array(values, dtype=float).reshape(size, size)
    found = best_label_matching(counts)
    brute = max(found.mean_dice(p) for p in itertools.permutations(range(1, size)))
    assert found.dice_matched == pytest.approx(brute)
    assert found.dice_matched >= found.dice_as_labelled


@settings(max_examples=40, deadline=None)
@given(st.integers(3, 6), st.integers(0, 10_000))
def test_cosines_to_others_match_the_vectors_and_update_gram_sums_over_keys(count, seed):
    generator = torch.Generator().manual_seed(seed)
    reference = {"a": torch.randn(5, generator=generator), "b": torch.randn(2, 3, generator=generator)}
    updates = [{k: v + torch.randn(v.shape, generator=generator) for k, v in reference.items()} for _ in range(count)]
    flat_deltas = [torch.cat([(u[k] - reference[k]).reshape(-1) for k in reference]).double() for u in updates]
    gram = update_gram(updates, reference)
    assert np.allclose(gram, [[float(x @ y) for y in flat_deltas] for x in flat_deltas], rtol=1e-5, atol=1e-5)
    directions = [d / d.norm() for d in flat_deltas]
    for index, cosine in enumerate(cosines_to_others(gram)):
        others = sum(directions[:index] + directions[index + 1 :])
        expected = float(flat_deltas[index] @ others / (flat_deltas[index].norm() * others.norm()))
        assert cosine == pytest.approx(expected, abs=1e-5)
    assert update_gram(updates, reference, lambda key: key == "a").trace() == pytest.approx(
        sum(float(((u["a"] - reference["a"]) ** 2).sum()) for u in updates), rel=1e-5
    )


def accepted_evaluation(node, confusion, name=None):
    message = reply(
        node,
        None,
        4,
        metrics={"dice": 0.5, "label-confusion": flat(confusion)},
        config={"site-name": name or f"site-{node}"},
        message_type=MessageType.EVALUATE,
    )
    return AcceptedReply(message, {}, message.content["metrics"], 4.0)


def evaluation_round(diagnostics, server_round, confusions):
    diagnostics.note_evaluate(server_round, [accepted_evaluation(n, c) for n, c in confusions.items()])


def test_a_site_with_swapped_labels_is_flagged_once_after_patience_rounds_and_named(flwr_log):
    set_task_identity()
    diagnostics = SiteDiagnostics(patience=2)
    honest = {1: HONEST, 2: HONEST, 3: HONEST}
    evaluation_round(diagnostics, 1, {**honest, 4: SWAPPED})
    assert not diagnostics.flags
    evaluation_round(diagnostics, 2, {**honest, 4: SWAPPED})
    evaluation_round(diagnostics, 3, {**honest, 4: SWAPPED})
    assert list(diagnostics.flags) == [4] and diagnostics.is_flagged(4) and not diagnostics.is_flagged(1)
    lines = [r.getMessage() for r in flwr_log if "disagrees with the federation" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("flwr-nnunet: site site-4 (node 4)")
    assert "rounds 1-2" in lines[0] and "its label 1 fits the model's label 2" in lines[0]
    assert diagnostics.report(3)["flagged"] == {"site-4": 2}
    assert diagnostics.report(3)["sites"]["site-4"]["labels"]["permutation"] == [2, 1]


def test_a_model_confused_by_the_site_still_names_the_site_not_the_honest_majority():
    diagnostics = SiteDiagnostics(patience=2)
    for server_round in (1, 2):  # the global model learnt the site's convention: every honest site looks swapped
        evaluation_round(diagnostics, server_round, {1: SWAPPED, 2: SWAPPED, 3: SWAPPED, 4: HONEST})
    assert list(diagnostics.flags) == [4]


def test_no_convention_or_an_interrupted_streak_flags_nobody():
    diagnostics = SiteDiagnostics(patience=2)
    evaluation_round(diagnostics, 1, {1: HONEST, 2: HONEST, 3: SWAPPED})
    evaluation_round(diagnostics, 2, {1: HONEST, 2: SWAPPED})  # no majority: neither for nor against
    evaluation_round(diagnostics, 3, {1: HONEST, 2: HONEST, 3: HONEST})  # site 3 fits: its streak ends
    evaluation_round(diagnostics, 4, {1: HONEST, 2: HONEST, 3: SWAPPED})
    assert not diagnostics.flags
    evaluation_round(diagnostics, 5, {1: HONEST, 2: HONEST, 3: SWAPPED})
    assert list(diagnostics.flags) == [3]


def test_honest_sites_with_different_skill_are_never_flagged():
    rng = np.random.default_rng(0)
    diagnostics = SiteDiagnostics(patience=2)
    for server_round in range(1, 30):
        confusions = {}
        for node in range(1, 5):  # each honest site: its own share of confusion between the labels and background
            noise = rng.uniform(0, 0.6)
            organ, lesion = 800 * (1 - noise), 200 * (1 - noise)
            confusions[node] = [[9000, 800 * noise, 200 * noise], [800 * noise, organ, 0], [200 * noise, 0, lesion]]
        evaluation_round(diagnostics, server_round, confusions)
    assert not diagnostics.flags


def strategy_with_flags(flagged_weight):
    set_task_identity()
    network = tiny_network()
    strategy = NnUNetFedAvg(
        network, min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1, flagged_weight=flagged_weight
    )
    for server_round in (1, 2):
        strategy.aggregate_evaluate(
            server_round,
            [evaluate_reply_with(node, HONEST if node < 4 else SWAPPED) for node in (1, 2, 3, 4)],
        )
    assert strategy.diagnostics.is_flagged(4)
    return strategy, canonical(network)


def evaluate_reply_with(node, confusion):
    message = evaluate_reply(node, 0.5)
    message.content["metrics"]["label-confusion"] = flat(confusion)
    message.content["config"] = ConfigRecord({"site-name": f"site-{node}"})
    return message


def test_flagged_weight_zero_leaves_the_flagged_site_out_of_training_rounds(flwr_log):
    strategy, _ = strategy_with_flags(0.0)
    grid = LoopbackGrid([1, 2, 3, 4], lambda node, message: RecordDict())
    sent = strategy.configure_train(3, None, ConfigRecord(), grid)
    assert sorted(m.metadata.dst_node_id for m in sent) == [1, 2, 3]
    assert any("site site-4 (node 4) is flagged: excluded from training" in r.getMessage() for r in flwr_log)
    evaluated = strategy.configure_evaluate(3, None, ConfigRecord(), grid)
    assert sorted(m.metadata.dst_node_id for m in evaluated) == [1, 2, 3, 4]  # still evaluated


def test_flagged_weight_between_0_and_1_down_weights_the_flagged_site():
    strategy, start = strategy_with_flags(0.25)
    updates = {node: perturbed(start, seed=node) for node in (1, 4)}
    replies = [reply(node, updates[node], 10, config={"site-name": f"site-{node}"}) for node in (1, 4)]
    arrays, _ = strategy.aggregate_train(3, replies)
    key = next(k for k, v in start.items() if v.is_floating_point())
    expected = (10 * updates[1][key] + 2.5 * updates[4][key]) / 12.5
    assert torch.allclose(torch.from_numpy(arrays[key].numpy()), expected, atol=1e-6)
    with pytest.raises(ValueError, match="flagged_weight"):
        NnUNetFedAvg(tiny_network(), flagged_weight=1.5)


def test_update_cosines_are_measured_for_the_history_but_flag_nobody():
    network = tiny_network()
    start = canonical(network)
    heads = [k for k in start if is_segmentation_head(k)]
    assert heads and len(heads) < len(start)
    updates = []
    for node in range(1, 5):
        sign = -1.0 if node == 4 else 1.0  # site 4 pulls the heads the other way
        updates.append({k: v + (sign if k in heads else 1.0) * 0.01 * node for k, v in start.items()})
    diagnostics = SiteDiagnostics(patience=1)
    accepted = [
        AcceptedReply(reply(n, u, 10, config={"site-name": f"site-{n}"}), u, {}, 10.0)
        for n, u in zip(range(1, 5), updates)
    ]
    diagnostics.note_train(1, accepted, start)
    measured = diagnostics.report(1)["sites"]
    assert measured["site-4"]["head-cosine"] < 0
    assert all(measured[f"site-{n}"]["head-cosine"] > 0 for n in (1, 2, 3))
    assert not diagnostics.flags


def test_the_label_volume_check_flags_a_site_before_round_1(flwr_log):
    diagnostics = SiteDiagnostics()
    diagnostics.flag_before_training(7, "site-3", "site-3: labels 'organ' (1) and 'lesion' (2) look swapped")
    assert diagnostics.is_flagged(7) and diagnostics.name(7) == "site-3"
    lines = [r.getMessage() for r in flwr_log if "disagrees with the federation" in r.getMessage()]
    assert lines == [
        (
            "flwr-nnunet: site site-3 (node 7) disagrees with the federation before training: "
            "site-3: labels 'organ' (1) and 'lesion' (2) look swapped"
        )
    ]


def test_excluded_sites_do_not_count_towards_min_train_nodes():
    strategy, start = strategy_with_flags(0.0)
    strategy.min_train_nodes = 4
    grid = LoopbackGrid([1, 2, 3, 4], lambda node, message: RecordDict())
    sent = strategy.configure_train(3, None, ConfigRecord(), grid)
    assert strategy.excluded == {4} and strategy.min_train_replies == 3
    replies = [reply(m.metadata.dst_node_id, perturbed(start, seed=1), 10) for m in sent]
    arrays, _ = strategy.aggregate_train(3, replies)
    assert arrays is not None  # three replies meet min_train_nodes=4 less the one site excluded


def test_flags_survive_a_resume_through_the_checkpoint_state(tmp_path):
    strategy, _ = strategy_with_flags(0.0)
    adam = strategy_from_name("fedadam", network=tiny_network(), flagged_weight=0.0)
    adam.diagnostics.flags = dict(strategy.diagnostics.flags)
    adam.diagnostics.names = dict(strategy.diagnostics.names)
    for saved, fresh in (
        (strategy, NnUNetFedAvg(tiny_network())),
        (adam, strategy_from_name("fedadam", network=tiny_network())),
    ):
        torch.save(saved.strategy_state(), tmp_path / "state.pth")
        fresh.load_strategy_state(load_checkpoint(tmp_path / "state.pth"))  # what a resumed run reads, safely
        assert fresh.diagnostics.is_flagged(4) and not fresh.diagnostics.is_flagged(1)
        assert fresh.diagnostics.name(4) == "site-4"
        assert fresh.diagnostics.flags[4] == saved.diagnostics.flags[4]


def test_a_model_that_fits_nobody_yet_decides_nothing():
    weak = [[9000, 300, 300], [500, 150, 150], [120, 60, 60]]  # a round-1 model: half its voxels wrong everywhere
    weak_swapped = [weak[0], weak[2], weak[1]]
    assert best_label_matching(np.array(weak)).dice_matched < 0.5
    diagnostics = SiteDiagnostics(patience=2)
    for server_round in range(1, 6):
        evaluation_round(diagnostics, server_round, {1: weak, 2: weak, 3: weak_swapped})
    assert not diagnostics.flags
    assert diagnostics.report(5)["sites"]["site-3"]["labels"]["gain-over-convention"] is None
