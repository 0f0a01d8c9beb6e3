"""A site's stdout: nnU-Net's plans printout stays in the trainer's log file (issue 22, item 6)."""

from __future__ import annotations

import pytest
from test_site import demo, initial_weights, options, spec_for  # noqa: F401 - demo is a module fixture

from flwr_nnunet.site.site import Site

PLANS_HEADINGS = ("This is the configuration used by this training", "These are the global plan.json settings")


@pytest.mark.slow
def test_training_keeps_the_plans_off_stdout_and_in_the_training_log(demo, tmp_path, capsys):  # noqa: F811
    spec = spec_for(demo, tmp_path / "results")
    Site(spec).train(initial_weights(demo), options(1, iterations=1))

    stdout = capsys.readouterr().out
    for heading in PLANS_HEADINGS:
        assert heading not in stdout
    assert "'plans_name': 'nnUNetPlans'" not in stdout
    assert "Epoch 0" in stdout and "train_loss" in stdout  # nnU-Net's other lines still reach stdout
    (training_log,) = spec.output_folder.glob("training_log_*.txt")
    text = training_log.read_text()
    for heading in PLANS_HEADINGS:
        assert heading in text
    assert "'plans_name': 'nnUNetPlans'" in text
