"""`flwr-nnunet inspect / repair / demo` on real nnU-Net checkpoints trained on the demo dataset."""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from flwr_nnunet import AliasMap
from flwr_nnunet.cli import EXIT_ERROR, EXIT_OK, EXIT_REFUSED, main
from flwr_nnunet.demo.data import load_demo_dataset
from flwr_nnunet.nnunet.checkpoint_io import CheckpointError, atomic_save, load_checkpoint
from flwr_nnunet.nnunet.networks import build_network

BIN = Path(sys.executable).parent
CPU_ENV = {"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "nnUNet_compile": "false"}


def _train_one_short_epoch(site, configuration: str, seed: int) -> Path:
    """Train nnU-Net's own nnUNetTrainer for one 2-iteration epoch; returns its checkpoint_final.pth."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**site.environ(), **CPU_ENV}.items():
            patch.setenv(name, value)
        plans = load_json(site.preprocessed_dataset_folder / "nnUNetPlans.json")
        plans["continue_training"] = False
        dataset_json = load_json(site.preprocessed_dataset_folder / "dataset.json")
        torch.manual_seed(seed)
        trainer = nnUNetTrainer(plans, configuration, 0, dataset_json, torch.device("cpu"))
        trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch, trainer.num_epochs = 2, 1, 1
        trainer.run_training()
    return Path(trainer.output_folder) / "checkpoint_final.pth"


def _naive_average(first: Path, second: Path, out: Path) -> None:
    """What users do: average every key on its own, keep the rest of the first checkpoint."""
    a, b = load_checkpoint(first), load_checkpoint(second)
    a["network_weights"] = {k: (v + b["network_weights"][k]) / 2 for k, v in a["network_weights"].items()}
    torch.save(a, out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> argparse.Namespace:
    """The demo dataset (made by `flwr-nnunet demo`), two sites trained, site 0's checkpoint bloated."""
    root = tmp_path_factory.mktemp("cli") / "demo"
    assert main(["demo", str(root), "--sites", "2"]) == EXIT_OK
    demo = load_demo_dataset(root)
    final, second = (_train_one_short_epoch(site, demo.configuration, seed) for seed, site in enumerate(demo.sites))
    bloated = final.parent / "bloated.pth"
    _naive_average(final, second, bloated)
    return argparse.Namespace(demo=demo, site=demo.sites[0], final=final, bloated=bloated, model=final.parent.parent)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _inspect_json(capsys, *argv) -> dict:
    code, out, err = _run(capsys, "inspect", *argv, "--json")
    assert code == EXIT_OK, err
    return json.loads(out)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _storage_bytes_in_file(path: Path) -> int:
    """Bytes of the tensor storages a torch.save zip archive holds."""
    with zipfile.ZipFile(path) as archive:
        return sum(i.file_size for i in archive.infolist() if "/data/" in i.filename)


def _one_diverged(bloated: Path, out: Path) -> tuple[str, str]:
    """A copy of ``bloated`` where the last alias of one encoder group drifted; returns (canonical, drifted) keys."""
    checkpoint = load_checkpoint(bloated)
    weights = checkpoint["network_weights"]
    group = next(g for g in AliasMap.from_module(_network(checkpoint)).groups.values() if len(g) == 4)
    weights[group[-1]] = weights[group[-1]] + 0.25
    torch.save(checkpoint, out)
    return group[0], group[-1]


def _network(checkpoint: dict) -> torch.nn.Module:
    """The network nnU-Net builds for a demo checkpoint (one input channel; background, organ, lesion)."""
    configuration = checkpoint["init_args"]["configuration"]
    architecture = checkpoint["init_args"]["plans"]["configurations"][configuration]["architecture"]
    return build_network(architecture, 1, 3, deep_supervision=False)


def _start_nnunet_predict(trained: argparse.Namespace, checkpoint_name: str, out: Path) -> subprocess.Popen:
    """``nnUNetv2_predict`` of site 0's test images with the model folder's ``fold_0/checkpoint_name``."""
    out.mkdir()
    options = f"-f 0 -chk {checkpoint_name} -device cpu --disable_tta -npp 1 -nps 1 --save_probabilities".split()
    command = [BIN / "nnUNetv2_predict", "-i", trained.site.images_ts, "-o", out, "-d", str(trained.demo.dataset_id)]
    with open(out / "stderr.txt", "wb") as stderr:
        return subprocess.Popen(
            [*command, "-c", trained.demo.configuration, *options],
            env={**os.environ, **trained.site.environ(), **CPU_ENV},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


@pytest.mark.slow
def test_inspect_reports_the_bloat_and_every_lost_group(trained, capsys):
    amap = AliasMap.from_module(_network(load_checkpoint(trained.final)))
    aliased = [g for g in amap.groups.values() if len(g) > 1]
    bloated = _inspect_json(capsys, trained.bloated)
    intact = _inspect_json(capsys, trained.final)

    assert bloated["kind"] == "nnU-Net checkpoint" and bloated["trainer_name"] == "nnUNetTrainer"
    assert "the plans architecture" in bloated["groups_from"]
    assert bloated["keys"] == intact["keys"] == len(amap.keys)
    assert bloated["groups"] == intact["groups"] == len(amap) and bloated["alias_groups"] == len(aliased)
    assert bloated["unique_bytes"] == intact["unique_bytes"] == intact["stored_bytes"]
    assert 2.7 < bloated["bloat_factor"] < 2.9
    assert bloated["bloat_factor"] == pytest.approx(bloated["stored_bytes"] / bloated["unique_bytes"], abs=1e-4)
    assert bloated["lost_groups"] == [list(g) for g in aliased] and intact["lost_groups"] == []
    assert bloated["diverged_groups"] == [] and intact["bloat_factor"] == 1.0
    assert bloated["file_bytes"] == trained.bloated.stat().st_size
    assert "optimizer_state" in bloated["other_entries"] and "init_args" in bloated["other_entries"]

    code, text, _ = _run(capsys, "inspect", trained.bloated)
    assert code == EXIT_OK
    assert f"({bloated['bloat_factor']:.2f}x the unique bytes)" in text
    assert f"lost sharing        {len(aliased)} of {len(aliased)} alias groups" in text
    assert f"... and {len(aliased) - 10} more" in text


@pytest.mark.slow
def test_repair_shrinks_to_unique_bytes_keeps_every_entry_and_predicts_identically(trained, capsys, tmp_path):
    repaired = trained.final.parent / "repaired.pth"
    before = _sha256(trained.bloated)
    code, out, err = _run(capsys, "repair", trained.bloated, repaired)
    assert code == EXIT_OK, err
    assert f"{_inspect_json(capsys, trained.bloated)['alias_groups']} groups share storage again" in out
    assert _sha256(trained.bloated) == before

    report = _inspect_json(capsys, repaired)
    assert report["stored_bytes"] == report["unique_bytes"] and report["lost_groups"] == []
    # exactly the tensor bytes of the checkpoint nnU-Net wrote with its sharing intact, and no bigger a file
    # (smaller by the pickled per-key tensor headers: aliases are now one tensor object)
    assert _storage_bytes_in_file(repaired) == _storage_bytes_in_file(trained.final)
    assert repaired.stat().st_size <= trained.final.stat().st_size
    assert trained.bloated.stat().st_size - repaired.stat().st_size > 1.7 * report["unique_bytes"]

    original, fixed = load_checkpoint(trained.bloated), load_checkpoint(repaired)
    assert list(fixed["network_weights"]) == list(original["network_weights"])
    for key in original:
        if key != "network_weights":
            assert repr(fixed[key]) == repr(original[key]), key
    assert type(fixed["_best_ema"]) is np.float32

    site = trained.site
    runs = {name: _start_nnunet_predict(trained, f"{name}.pth", tmp_path / name) for name in ("bloated", "repaired")}
    try:
        for name, run in runs.items():
            assert run.wait(timeout=300) == 0, (tmp_path / name / "stderr.txt").read_text()[-2000:]
    finally:
        for run in runs.values():
            if run.poll() is None:
                run.kill()
                run.wait()
    cases = sorted(p.name for p in (tmp_path / "bloated").glob("*.npz"))
    assert len(cases) == len(site.test_cases) > 0
    for case in cases:
        expected = np.load(tmp_path / "bloated" / case)["probabilities"]
        assert np.array_equal(np.load(tmp_path / "repaired" / case)["probabilities"], expected), case


@pytest.mark.slow
def test_a_diverged_alias_is_refused_by_name_unless_a_winner_is_picked(trained, capsys, tmp_path):
    drifted_file = tmp_path / "drifted.pth"
    canonical, drifted = _one_diverged(trained.bloated, drifted_file)
    out = tmp_path / "out.pth"

    report = _inspect_json(capsys, drifted_file)
    assert report["diverged_groups"][0]["disagreeing"] == [drifted]
    assert report["diverged_groups"][0]["max_abs_diff"] == pytest.approx(0.25)

    code, stdout, err = _run(capsys, "repair", drifted_file, out)
    assert code == EXIT_REFUSED and stdout == ""
    assert err.count("\n") == 1 and canonical in err and drifted in err and "--prefer" in err
    assert not out.exists() and not list(tmp_path.glob(".out.pth.*"))

    assert _run(capsys, "repair", drifted_file, out, "--atol", "0.3")[0] == EXIT_OK
    assert torch.equal(
        load_checkpoint(out)["network_weights"][drifted], load_checkpoint(trained.bloated)["network_weights"][canonical]
    )

    # `last` keeps what nnU-Net's load_state_dict ends up with when it loads the drifted file
    assert _run(capsys, "repair", drifted_file, out, "--prefer", "last", "--force")[0] == EXIT_OK
    as_nnunet_loads, as_repaired = (_network(load_checkpoint(drifted_file)) for _ in range(2))
    as_nnunet_loads.load_state_dict(load_checkpoint(drifted_file)["network_weights"])
    as_repaired.load_state_dict(load_checkpoint(out)["network_weights"])
    for (name, a), b in zip(as_nnunet_loads.state_dict().items(), as_repaired.state_dict().values()):
        assert torch.equal(a, b), name

    code, stdout, _ = _run(capsys, "repair", drifted_file, out, "--prefer", "encoder.*", "--force", "--json")
    assert code == EXIT_OK
    assert json.loads(stdout)["resolved"][0]["winner"] == canonical


@pytest.mark.slow
def test_unreadable_and_foreign_files_get_one_line_errors(trained, capsys, tmp_path):
    data = trained.final.read_bytes()
    files = {
        "truncated": data[: len(data) // 2],
        "random": np.random.default_rng(0).bytes(4096),
        "empty": b"",
        "text": b"not a checkpoint\n",
    }
    for name, content in files.items():
        (tmp_path / f"{name}.pth").write_bytes(content)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    torch.save({"epoch": 3, "model": torch.zeros(2)}, tmp_path / "foreign.pth")
    torch.save({"config": argparse.Namespace(lr=1.0)}, tmp_path / "unsafe.pth")
    expected = {
        "truncated": "truncated or corrupt",
        "random": "not a PyTorch checkpoint",
        "empty": "is empty",
        "text": "not a PyTorch checkpoint",
        "list": "not an nnU-Net checkpoint or state_dict: it holds a list",
        "foreign": "entry 'epoch' is not a tensor",
        "unsafe": "not allowed to be unpickled",
        "missing": "No such file",
    }
    for name, phrase in expected.items():
        path = tmp_path / f"{name}.pth"
        for argv in (("inspect", path), ("repair", path, tmp_path / "out.pth")):
            code, out, err = _run(capsys, *argv)
            assert code == EXIT_ERROR, (name, err)
            assert out == "" and err.count("\n") == 1 and phrase in err and str(path) in err, (name, err)
            assert "Traceback" not in err
    assert not (tmp_path / "out.pth").exists()


@pytest.mark.slow
def test_repair_never_writes_over_its_input_or_an_existing_file(trained, capsys, tmp_path):
    before = _sha256(trained.bloated)
    code, _, err = _run(capsys, "repair", trained.bloated, trained.bloated, "--force")
    assert code == EXIT_ERROR and "IN is never modified" in err
    existing = tmp_path / "existing.pth"
    existing.write_bytes(b"keep me")
    code, _, err = _run(capsys, "repair", trained.bloated, existing)
    assert code == EXIT_ERROR and "--force" in err and existing.read_bytes() == b"keep me"
    assert _sha256(trained.bloated) == before


@pytest.mark.slow
def test_plain_and_compiled_state_dicts_need_the_plans_from_the_command_line(trained, capsys, tmp_path):
    weights = load_checkpoint(trained.bloated)["network_weights"]
    plain = tmp_path / "compiled_state_dict.pth"
    torch.save({f"_orig_mod.{k}": v for k, v in weights.items()}, plain)
    plans_options = ("--plans", trained.model / "plans.json", "--dataset-json", trained.model / "dataset.json")

    blind = _inspect_json(capsys, plain)
    assert blind["kind"] == "state_dict" and blind["groups_from"] == "storage sharing in the file"
    assert blind["alias_groups"] == 0 and "pass --plans" in blind["notes"][0]
    code, _, err = _run(capsys, "repair", plain, tmp_path / "out.pth")
    assert code == EXIT_REFUSED and "--plans" in err

    seen = _inspect_json(capsys, plain, *plans_options)
    assert seen["alias_groups"] == len(seen["lost_groups"]) == _inspect_json(capsys, trained.bloated)["alias_groups"]
    assert _run(capsys, "repair", plain, tmp_path / "out.pth", *plans_options)[0] == EXIT_OK
    repaired = load_checkpoint(tmp_path / "out.pth")
    assert list(repaired) == [f"_orig_mod.{k}" for k in weights]
    assert (
        repaired["_orig_mod.encoder.stages.0.0.convs.0.conv.weight"]
        is repaired["_orig_mod.decoder.encoder.stages.0.0.convs.0.all_modules.0.weight"]
    )

    wrong = _inspect_json(capsys, plain, *plans_options, "--configuration", "3d_nope")
    assert wrong["alias_groups"] == 0 and "configuration '3d_nope' is not in the plans" in wrong["notes"][0]


def _small_3d_plans(features: list[int], convs: int) -> tuple[dict, dict, dict]:
    """(architecture, plans, dataset_json) of a 3d_fullres PlainConvUNet with these stage widths."""
    from flwr_nnunet.nnunet.networks import STOCK_ARCHITECTURES

    architecture = copy.deepcopy(STOCK_ARCHITECTURES["3d_fullres PlainConvUNet"])
    kwargs, n = architecture["arch_kwargs"], len(features)
    kwargs.update(
        n_stages=n,
        features_per_stage=features,
        kernel_sizes=kwargs["kernel_sizes"][:n],
        strides=kwargs["strides"][:n],
        n_conv_per_stage=[convs] * n,
        n_conv_per_stage_decoder=[convs] * (n - 1),
    )
    plans = {
        "dataset_name": "Dataset001_X",
        "plans_name": "nnUNetPlans",
        "label_manager": "LabelManager",
        "configurations": {"3d_fullres": {"architecture": architecture, "batch_size": 2, "patch_size": [32] * 3}},
    }
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz"}
    return architecture, plans, dataset_json


@pytest.mark.slow
def test_a_global_checkpoint_finds_its_plans_in_the_model_folder_and_shrinks_to_its_unique_bytes(capsys, tmp_path):
    architecture, plans, dataset_json = _small_3d_plans([32, 64, 128, 256], convs=2)
    model = tmp_path / "Dataset001_X" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (model / "fold_all").mkdir(parents=True)
    (model / "plans.json").write_text(json.dumps(plans))
    (model / "dataset.json").write_text(json.dumps(dataset_json))
    a, b = (build_network(architecture, 1, 2).state_dict() for _ in range(2))
    checkpoint = {
        "network_weights": {k: (a[k] + b[k]) / 2 for k in a},
        "trainer_name": "nnUNetTrainer",
        "init_args": {"configuration": "3d_fullres"},
    }
    torch.save(checkpoint, model / "fold_all" / "checkpoint_final.pth")

    report = _inspect_json(capsys, model / "fold_all" / "checkpoint_final.pth")
    assert str(model / "plans.json") in report["groups_from"] and len(report["lost_groups"]) == report["alias_groups"]
    unique = sum(a[k].nbytes for k in AliasMap.from_state_dict(a).canonical_keys)
    assert report["unique_bytes"] == unique
    assert report["bloat_factor"] == pytest.approx(sum(v.nbytes for v in a.values()) / unique, abs=1e-4)
    code, _, err = _run(capsys, "repair", model / "fold_all" / "checkpoint_final.pth", tmp_path / "repaired.pth")
    assert code == EXIT_OK, err
    assert abs((tmp_path / "repaired.pth").stat().st_size / report["unique_bytes"] - 1) < 0.01
    assert list(load_checkpoint(tmp_path / "repaired.pth")) == ["network_weights", "trainer_name", "init_args"]


@pytest.mark.slow
def test_a_trainer_variant_network_is_rebuilt_and_its_integer_counters_restored(capsys, tmp_path):
    """nnUNetTrainerBN swaps in BatchNorm; per-key arithmetic turned its int64 counters into floats."""
    from flwr_nnunet.nnunet.networks import STOCK_ARCHITECTURES

    architecture, plans, dataset_json = _small_3d_plans([4, 8, 8], convs=1)
    batchnorm = STOCK_ARCHITECTURES["3d_fullres PlainConvUNet BatchNorm"]["arch_kwargs"]["norm_op"]
    network = build_network(
        {**architecture, "arch_kwargs": {**architecture["arch_kwargs"], "norm_op": batchnorm}}, 1, 2
    )
    counter = "encoder.stages.0.0.convs.0.norm.num_batches_tracked"
    checkpoint = {
        "network_weights": {k: v * 1.0 for k, v in network.state_dict().items()},
        "trainer_name": "nnUNetTrainerBN",
        "init_args": {"plans": plans, "configuration": "3d_fullres", "dataset_json": dataset_json},
    }
    assert checkpoint["network_weights"][counter].dtype == torch.float32
    torch.save(checkpoint, tmp_path / "bn.pth")

    code, out, err = _run(capsys, "repair", tmp_path / "bn.pth", tmp_path / "out.pth", "--json")
    assert code == EXIT_OK, err
    assert counter in json.loads(out)["restored_dtypes"]
    repaired = load_checkpoint(tmp_path / "out.pth")["network_weights"]
    assert repaired["decoder.encoder.stages.0.0.convs.0.all_modules.1.num_batches_tracked"].dtype == torch.int64
    assert AliasMap.from_state_dict(repaired) == AliasMap.from_module(network)
    network.load_state_dict(repaired)

    checkpoint["trainer_name"] = "nnUNetTrainerNotInstalledHere"
    torch.save(checkpoint, tmp_path / "unknown_trainer.pth")
    report = _inspect_json(capsys, tmp_path / "unknown_trainer.pth")
    assert report["groups_from"] == "storage sharing in the file"
    assert "nnUNetTrainerNotInstalledHere is not installed here" in report["notes"][0]


def test_nan_in_every_alias_agrees_but_nan_in_one_alias_is_refused(capsys, tmp_path):
    architecture, plans, dataset_json = _small_3d_plans([4, 8], convs=1)
    (tmp_path / "plans.json").write_text(json.dumps(plans))
    (tmp_path / "dataset.json").write_text(json.dumps(dataset_json))
    hints = ("--plans", tmp_path / "plans.json", "--dataset-json", tmp_path / "dataset.json")
    weights = {k: v.clone() for k, v in build_network(architecture, 1, 2).state_dict().items()}
    group = AliasMap.from_state_dict(build_network(architecture, 1, 2).state_dict()).groups[
        "encoder.stages.0.0.convs.0.conv.weight"
    ]
    for key in group:
        weights[key].view(-1)[0] = float("nan")
    torch.save(weights, tmp_path / "all_nan.pth")
    weights[group[-1]].view(-1)[1] = float("nan")
    torch.save(weights, tmp_path / "one_nan.pth")

    assert _inspect_json(capsys, tmp_path / "all_nan.pth", *hints)["diverged_groups"] == []
    diverged = _inspect_json(capsys, tmp_path / "one_nan.pth", *hints)["diverged_groups"]
    assert diverged == [{"keys": list(group), "disagreeing": [group[-1]], "max_abs_diff": "inf"}]
    code, _, err = _run(capsys, "repair", tmp_path / "one_nan.pth", tmp_path / "out.pth", *hints)
    assert code == EXIT_REFUSED and "NaN differs" in err and group[-1] in err


def test_atomic_save_leaves_the_old_file_when_the_check_fails(tmp_path):
    target = tmp_path / "model.pth"
    atomic_save({"w": torch.ones(3)}, target)

    def reject(temp: Path) -> None:
        assert torch.equal(load_checkpoint(temp)["w"], torch.zeros(3))
        raise CheckpointError("rejected")

    with pytest.raises(CheckpointError, match="rejected"):
        atomic_save({"w": torch.zeros(3)}, target, check=reject)
    assert torch.equal(load_checkpoint(target)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_console_script_has_help_for_every_subcommand(capsys):
    result = subprocess.run([BIN / "flwr-nnunet", "--help"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("usage: flwr-nnunet") and "inspect" in result.stdout and "repair" in result.stdout
    for command in ("inspect", "repair", "demo"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: flwr-nnunet {command}")
