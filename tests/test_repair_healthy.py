"""`flwr-nnunet repair` on a healthy checkpoint says there is nothing to repair and writes nothing (unless --force)."""

from __future__ import annotations

import copy
import json

import torch

from flwr_nnunet.cli import EXIT_OK, main
from flwr_nnunet.nnunet.networks import STOCK_ARCHITECTURES, build_network


def _model_folder(tmp_path, healthy: bool):
    architecture = copy.deepcopy(STOCK_ARCHITECTURES["3d_fullres PlainConvUNet"])
    kwargs, n = architecture["arch_kwargs"], 3
    kwargs.update(
        n_stages=n,
        features_per_stage=[4, 8, 16],
        kernel_sizes=kwargs["kernel_sizes"][:n],
        strides=kwargs["strides"][:n],
        n_conv_per_stage=[1] * n,
        n_conv_per_stage_decoder=[1] * (n - 1),
    )
    plans = {
        "dataset_name": "Dataset001_X",
        "plans_name": "nnUNetPlans",
        "label_manager": "LabelManager",
        "configurations": {"3d_fullres": {"architecture": architecture, "batch_size": 2, "patch_size": [16] * 3}},
    }
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz"}
    model = tmp_path / "Dataset001_X" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (model / "fold_all").mkdir(parents=True)
    (model / "plans.json").write_text(json.dumps(plans))
    (model / "dataset.json").write_text(json.dumps(dataset_json))
    weights = build_network(architecture, 1, 2).state_dict()  # aliases share storage, as nnU-Net saves them
    if not healthy:
        weights = {k: v.clone() for k, v in weights.items()}  # per-key copies: sharing lost
    path = model / "fold_all" / "checkpoint_final.pth"
    torch.save(
        {"network_weights": weights, "trainer_name": "nnUNetTrainer", "init_args": {"configuration": "3d_fullres"}},
        path,
    )
    return path


def test_a_healthy_checkpoint_is_left_alone_unless_forced(tmp_path, capsys):
    source = _model_folder(tmp_path, healthy=True)
    before = (source.stat().st_mtime_ns, source.read_bytes())
    out = tmp_path / "repaired.pth"
    assert main(["repair", str(source), str(out)]) == EXIT_OK
    printed = capsys.readouterr().out
    assert printed.startswith(f"nothing to repair: {source} already shares storage in all ")
    assert "not written (pass --force to write it anyway)" in printed and "\n" not in printed.strip()
    assert not out.exists()
    assert (source.stat().st_mtime_ns, source.read_bytes()) == before

    assert main(["repair", str(source), str(out), "--json"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["written"] is False and report["regrouped"] == 0 and not out.exists()

    assert main(["repair", str(source), str(out), "--force"]) == EXIT_OK
    assert capsys.readouterr().out.startswith(f"wrote {out}: ")
    assert out.is_file()


def test_a_bloated_checkpoint_is_still_repaired(tmp_path, capsys):
    source = _model_folder(tmp_path, healthy=False)
    out = tmp_path / "repaired.pth"
    assert main(["repair", str(source), str(out)]) == EXIT_OK
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out}: ") and "groups share storage again" in printed
    assert out.stat().st_size < source.stat().st_size
