"""Personal models at a site: MR-MTL and fine-tuning on real nnU-Net trainers (the demo's data, a few iterations)."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_site import copies, demo, initial_weights, spec_for  # noqa: F401 - demo is a module fixture

from flwr_nnunet.core.aliasing import AliasMap
from flwr_nnunet.nnunet.checkpoint_io import load_checkpoint
from flwr_nnunet.nnunet.digests import plans_sha256
from flwr_nnunet.site import site as site_module
from flwr_nnunet.site.personal import PERSONAL_KEY, FineTuneSchedule, personal_model_file
from flwr_nnunet.site.site import Site
from flwr_nnunet.site.spec import InstructionError, TrainOptions


def options(server_round, **changes):
    values = {
        "local_epochs": 1,
        "num_epochs": 4,
        "iterations_per_epoch": 3,
        "val_iterations_per_epoch": 1,
        "seed": 7,
        "server_round": server_round,
    }
    return TrainOptions(**{**values, **changes})


def same(a, b):
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def distance(a, b):
    return sum(float(((a[k].float() - b[k].float()) ** 2).sum()) for k in a if a[k].is_floating_point())


@pytest.fixture(scope="module")
def rounds(demo, tmp_path_factory):  # noqa: F811 - the fixture imported from test_site
    """Three sites trained for two rounds from one global model; round 2 brings another global model."""
    root = tmp_path_factory.mktemp("personal")
    global_1, global_2 = initial_weights(demo), initial_weights(demo, seed=5)
    sites = {name: Site(spec_for(demo, root / name)) for name in ("mr-mtl-0", "local", "mr-mtl-strong")}
    plans = plans_sha256(sites["local"].check())
    out = {"global_1": global_1, "global_2": global_2, "sites": sites}
    for name, mu in (("mr-mtl-0", 0.0), ("mr-mtl-strong", 50.0)):
        first, _ = sites[name].train(global_1, options(1, mr_mtl_mu=mu), plans)
        out[f"{name} 1"] = copies(first)
        second, _ = sites[name].train(global_2, options(2, mr_mtl_mu=mu), plans)
        out[f"{name} 2"] = copies(second)
    first, _ = sites["local"].train(global_1, options(1), plans)
    out["local 1"] = copies(first)
    second, _ = sites["local"].train(copies(first), options(2), plans)  # what training alone does: its own weights
    out["local 2"] = copies(second)
    out["plans"] = plans
    return out


@pytest.mark.slow
def test_mr_mtl_at_mu_0_is_plain_local_training(rounds):
    assert same(rounds["mr-mtl-0 1"], rounds["local 1"])
    assert same(rounds["mr-mtl-0 2"], rounds["local 2"])  # round 2's global model was never loaded
    assert not same(rounds["mr-mtl-0 2"], rounds["global_2"])


@pytest.mark.slow
def test_mr_mtl_pulls_the_personal_model_towards_the_global_one(rounds):
    # the same data, augmentation and seeds at both sites: the penalty is the only difference (nnU-Net clips the
    # gradient norm to 12, which bounds how far one step pulls)
    free = distance(rounds["mr-mtl-0 2"], rounds["global_2"])
    pulled = distance(rounds["mr-mtl-strong 2"], rounds["global_2"])
    assert pulled < 0.98 * free


@pytest.mark.slow
def test_mr_mtl_evaluates_both_models_keeps_the_personal_one_and_writes_it(rounds):
    site = rounds["sites"]["mr-mtl-strong"]
    before = copies(site.canonical())
    metrics = site.evaluate(rounds["global_2"], options(2, mr_mtl_mu=50.0), rounds["plans"])
    assert same(copies(site.canonical()), before)  # the personal model stays live
    assert {"dice", "dice-per-class", "personal-dice", "personal-dice-per-class", "label-confusion"} <= set(metrics)
    assert len(metrics["label-confusion"]) == 9  # background, organ, lesion: reference x predicted
    assert sum(metrics["label-confusion"]) > 0
    checkpoint = load_checkpoint(personal_model_file(site.spec))
    assert checkpoint[PERSONAL_KEY]["kind"] == "mr-mtl"
    assert checkpoint[PERSONAL_KEY]["validation_dice"] == metrics["personal-dice"]
    weights = checkpoint["network_weights"]
    assert set(weights) == set(site.network.state_dict())  # every key, as nnUNetv2_predict loads it
    assert same(AliasMap.from_state_dict(weights).collapse(weights), before)
    assert AliasMap.from_state_dict(weights).groups == site.alias_map.groups  # the aliases share storage


def fine_tune_with(monkeypatch, site, received, plans, bonus):
    """Fine-tune with the fine-tuned model's validation Dice moved by ``bonus`` (the choice is under test)."""
    real = site_module.validation_dice

    def scored(spec, trainer, network, validation, model="global model"):
        metrics = real(spec, trainer, network, validation, model)
        if model == "fine-tuned model":
            metrics["dice"] = min(1.0, max(0.0, metrics["dice"] + bonus))
        return metrics

    monkeypatch.setattr(site_module, "validation_dice", scored)
    return site.evaluate(received, options(1, fine_tune_epochs=1), plans)


@pytest.mark.slow
@pytest.mark.parametrize("bonus", [-2.0, 2.0])
def test_fine_tuning_never_replaces_a_better_global_model(demo, tmp_path, monkeypatch, bonus):  # noqa: F811
    site = Site(spec_for(demo, tmp_path / "results"))
    plans = plans_sha256(site.check())
    trained, _ = site.train(initial_weights(demo), options(1), plans)
    final = copies(trained)
    state = site.spec.state_file.read_bytes()
    metrics = fine_tune_with(monkeypatch, site, final, plans, bonus)
    checkpoint = load_checkpoint(personal_model_file(site.spec))
    weights = AliasMap.from_state_dict(checkpoint["network_weights"]).collapse(checkpoint["network_weights"])
    about = checkpoint[PERSONAL_KEY]
    assert metrics["personal-dice"] >= metrics["dice"]
    if bonus < 0:  # the global model validates better: it stays the site's model, bit for bit
        assert metrics["fine-tune-kept"] == 0 and about["kind"] == "global"
        assert metrics["personal-dice"] == metrics["dice"] == about["validation_dice"]
        assert same(weights, final)
    else:
        assert metrics["fine-tune-kept"] == 1 and about["kind"] == "fine-tuned"
        assert not same(weights, final)
    assert about["global_validation_dice"] == metrics["dice"]
    assert site.spec.state_file.read_bytes() == state  # the round state is not touched
    assert site.trainer is None


def test_fine_tune_schedule_decays_from_the_initial_rate_over_its_epochs():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = FineTuneSchedule(optimizer, 0.01, start=8, epochs=4)
    rates = []
    for epoch in range(8, 12):
        schedule.step(epoch)
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[0] == 0.01 and all(a > b > 0 for a, b in itertools.pairwise(rates))
    assert rates[-1] == pytest.approx(0.01 * 0.25**0.9)
    with pytest.raises(ValueError, match="at least one epoch"):
        FineTuneSchedule(optimizer, 0.01, start=0, epochs=0)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"mr-mtl-mu": -1.0}, "'mr-mtl-mu' must be >= 0"),
        ({"mr-mtl-mu": "x"}, "'mr-mtl-mu' must be a finite number"),
        ({"fine-tune-epochs": -1}, "'fine-tune-epochs' must be at least 0"),
        ({"fine-tune-epochs": 500}, "exceeds this site's bound"),
    ],
)
def test_personalization_entries_of_an_instruction_are_checked(config, message):
    with pytest.raises(InstructionError, match=message):
        TrainOptions.from_config({"server-round": 1, **config})
    assert TrainOptions.from_config({"server-round": 1}).mr_mtl_mu is None
    assert TrainOptions.from_config({"server-round": 1, "mr-mtl-mu": 0.0}).mr_mtl_mu == 0.0
