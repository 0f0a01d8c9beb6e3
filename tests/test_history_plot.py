"""The progress plot: a title naming dataset, configuration, strategy and sites; legends outside the curves;
the loss explained; each site's number of validation cases in the legend."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from flwr_nnunet.apps.history import RunHistory, class_names


def _reply(site: str, **metrics) -> RecordDict:
    return RecordDict({"metrics": MetricRecord(metrics), "config": ConfigRecord({"site-name": site})})


def _history(tmp_path) -> RunHistory:
    history = RunHistory(tmp_path, dataset="Dataset987_FedDemo", configuration="3d_fullres", strategy="fedadam")
    cases = {"site-0": 2, "site-1": 1, "site-2": 3}
    for server_round in (1, 2, 3):
        history.train_metrics(
            [
                _reply(s, **{"num-examples": 6, "train-loss": 0.3 - 0.4 * server_round, "pseudo-dice": 0.2})
                for s in cases
            ],
            "num-examples",
        )
        history.evaluate_metrics(
            [_reply(s, **{"num-examples": n, "dice": 0.2 * server_round}) for s, n in cases.items()], "num-examples"
        )
        history.end_round(server_round)
    return history


def test_title_legend_loss_and_validation_cases(tmp_path):
    history = _history(tmp_path)
    assert history.plot_file.is_file()
    figure = history.figure()
    try:
        title = figure._suptitle.get_text()
        for part in ("Dataset987_FedDemo", "3d_fullres", "fedadam", "3 site(s): site-0, site-1, site-2"):
            assert part in title, title
        dice_axis, loss_axis = figure.axes
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        for axis in (dice_axis, loss_axis):
            legend = axis.get_legend()
            assert legend is not None
            # the legend lies right of the axes, so it never covers a curve
            assert legend.get_window_extent(renderer).x0 >= axis.get_window_extent(renderer).x1
        labels = [text.get_text() for text in dice_axis.get_legend().get_texts()]
        assert "site-0 Dice (2 validation cases)" in labels
        assert "site-1 Dice (1 validation case)" in labels
        assert "aggregated Dice (6 validation cases)" in labels
        loss_label = loss_axis.get_ylabel()
        assert "Dice + CE" in loss_label and "below 0" in loss_label
    finally:
        plt.close(figure)


def test_title_without_metadata_still_names_the_sites(tmp_path):
    history = RunHistory(tmp_path)
    assert history.title().endswith("0 site(s): none yet")
    history.plot()  # an empty history plots too
    assert history.plot_file.is_file()


def test_dice_per_class_is_named_and_plotted_per_label_or_region(tmp_path):
    """flwr_history.json names each ``dice-per-class`` entry; the plot draws the aggregated one per name."""
    regions = {"labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}}
    assert class_names({**regions, "regions_class_order": [1, 2, 3]}) == ["whole", "core", "enhancing"]
    assert class_names({"labels": {"background": 0, "lesion": 2, "organ": 1}}) == ["organ", "lesion"]  # by value
    (tmp_path / "dataset.json").write_text(json.dumps({**regions, "regions_class_order": [1, 2, 3]}))
    history = RunHistory(tmp_path)
    for server_round in (1, 2):
        per_class = [0.1 * server_round, 0.2 * server_round, 0.3 * server_round]
        history.evaluate_metrics(
            [_reply(s, **{"num-examples": 1, "dice": 0.2 * server_round, "dice-per-class": per_class}) for s in "ab"],
            "num-examples",
        )
        history.end_round(server_round)
    assert json.loads(history.json_file.read_text())["class-names"] == ["whole", "core", "enhancing"]
    lines = history.aggregated_per_class()
    assert list(lines) == ["whole", "core", "enhancing"]
    assert lines["core"][0] == [1, 2] and lines["core"][1] == [0.2, 0.4]
    figure = history.figure()
    try:
        labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
        assert {"aggregated Dice of whole", "aggregated Dice of core", "aggregated Dice of enhancing"} <= set(labels)
    finally:
        plt.close(figure)


def test_personal_models_are_drawn_beside_the_global_one_and_fine_tuning_is_filed(tmp_path):
    history = RunHistory(tmp_path, dataset="Dataset987_FedDemo", configuration="2d", strategy="fedavg")
    for server_round in (1, 2):
        history.evaluate_metrics(
            [_reply(s, **{"num-examples": 2, "dice": 0.5, "personal-dice": 0.6}) for s in ("site-0", "site-1")],
            "num-examples",
        )
        history.end_round(server_round, diagnostics={"sites": {}, "flagged": {"site-1": 0}})
    history.note_fine_tune([_reply("site-0", **{"num-examples": 2, "dice": 0.5, "fine-tune-kept": 1})], "num-examples")
    figure = history.figure()
    try:
        labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    finally:
        plt.close(figure)
    assert {"site-0 personal model Dice", "site-1 personal model Dice", "aggregated personal model Dice"} <= set(labels)
    written = json.loads(history.json_file.read_text())
    assert written["rounds"]["2"]["diagnostics"]["flagged"] == {"site-1": 0}
    assert written["fine-tune"]["sites"]["site-0"]["fine-tune-kept"] == 1
    reloaded = RunHistory(tmp_path)
    reloaded.load()
    assert reloaded.fine_tune == written["fine-tune"] and set(reloaded.rounds) == {1, 2}
