"""Federated five-fold cross-validation of one configuration: `flwr run .` per fold, then the merged summaries.

Steps (everything lands under ``--workdir``, default ``crossval_data/``, which git ignores):

1. the data: the 2D demo's raw data under ``<workdir>/data`` with nnU-Net's five-fold split at every site
   (``flwr_nnunet.demo.crossval_splits``), or your sites' data with ``--data-root`` (``make-demo=false``; each site's
   own ``splits_final.json``, nnU-Net's five-fold split where federated planning writes it);
2. per fold k in ``--folds`` (default 0 1 2 3 4), in turn: ``flwr run .`` with ``fold=k crossval=true resume=true``
   on this run's own local SuperLink (stopped by its PID afterwards): the rounds, then every site validates the
   fold's global model on its own validation cases and sends per-case counts only; the server writes
   ``fold_k/checkpoint_final.pth`` and ``fold_k/validation/summary.json``. A fold whose counts are written already
   is skipped, so a killed pipeline started again continues with the fold it was in (resumed from its checkpoint);
3. after the last fold the server has merged the folds into ``crossval_results_folds_0_1_2_3_4/`` (summaries pooled
   and per site, ``postprocessing.pkl`` / ``postprocessing.json``); the script prints them and the commands that
   predict with the five fold models and apply the postprocessing.

Usage: ``python scripts/run_crossval.py [--rounds 8] [--local-epochs 1] [--iterations 40] [--val-iterations 5]
[--sites 3] [--seed 0] [--folds 0 1 2 3 4] [--workdir crossval_data] [--data-root DIR] [--config "key=value ..."]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_demo import free_port, stream_flwr_run, superlink_pids


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "crossval_data", help="where everything is written")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="folds to train, in turn")
    parser.add_argument("--rounds", type=int, default=8, help="federated rounds per fold")
    parser.add_argument("--local-epochs", type=int, default=1, help="nnU-Net epochs per round")
    parser.add_argument("--iterations", type=int, default=40, help="training batches per epoch")
    parser.add_argument("--val-iterations", type=int, default=5, help="pseudo-Dice batches per epoch")
    parser.add_argument("--sites", type=int, default=3, help="demo sites (2 or 3); with --data-root: site-K folders")
    parser.add_argument("--seed", type=int, default=0, help="seed of the demo data, the initial model, the rounds")
    parser.add_argument("--data-root", type=Path, help="your sites' data (site-K/nnUNet_raw/...): no demo is made")
    parser.add_argument("--config", default="", help="more run config, 'key=value ...' (e.g. dataset, configuration)")
    return parser.parse_args(argv)


def run_overrides(args: argparse.Namespace, data_root: Path) -> dict:
    """The run config every fold shares (the fold's own keys are added per fold)."""
    from flwr.common.config import parse_config_args

    overrides = {
        "data-root": str(data_root),
        "num-server-rounds": args.rounds,
        "local-epochs": args.local_epochs,
        "iterations-per-epoch": args.iterations,
        "val-iterations-per-epoch": args.val_iterations,
        "seed": args.seed,
        "crossval": True,
        "resume": True,
    }
    if args.data_root is None:
        overrides.update({"make-demo": True, "demo-sites": args.sites, "demo-3d": False, "configuration": "2d"})
    else:
        overrides["make-demo"] = False
    overrides.update(parse_config_args([args.config]) if args.config.strip() else {})
    return overrides


def model_folder(overrides: dict) -> Path:
    """The global model folder the runs write (from the project's run config with these overrides)."""
    from flwr.common.config import get_fused_config_from_dir
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

    from flwr_nnunet.apps.run_config import RunSettings

    settings = RunSettings.from_run_config(get_fused_config_from_dir(REPO, overrides))
    model = convert_trainer_plans_config_to_identifier(settings.trainer, settings.plans, settings.configuration)
    return settings.results_dir / settings.dataset / model


def run_fold(fold: int, overrides: dict, num_sites: int, flwr_home: Path) -> str:
    """`flwr run .` of one fold on its own local SuperLink (stopped by PID afterwards); the run's final status."""
    ports = (free_port(), free_port())
    while ports[1] == ports[0]:
        ports = (ports[0], free_port())
    config = {**overrides, "fold": str(fold)}
    run_config = " ".join(f"{key}={json.dumps(value)}" for key, value in config.items())
    return stream_flwr_run(run_config, num_sites, flwr_home, ports)


def report(model: Path, folds: list[int]) -> None:
    """The merged summaries and the postprocessing decision, and how to predict and postprocess."""
    from flwr_nnunet.apps.crossval_results import MERGE_FILE, merged_folder

    merged = merged_folder(model, folds)
    about = json.loads((merged / MERGE_FILE).read_text())
    print(f"\nfederated cross-validation, folds {folds}: {merged}")
    print(f"  pooled over the sites: foreground Dice {about['foreground_dice']:.4f}")
    for site, entry in sorted(about["sites"].items()):
        dice = json.loads((merged / entry["summary"]).read_text())["foreground_mean"]["Dice"]
        print(f"  {site:<12} {entry['cases']:>3} case(s)  foreground Dice {dice:.4f}")
    steps = (about["postprocessing"] or {}).get("postprocessing_kwargs")
    print(f"  postprocessing (keep the largest component of): {steps if steps is not None else 'not decided'}")
    dataset = model.parent.name
    trainer, plans, configuration = model.name.split("__")
    print(
        "\npredict with the five fold models, then postprocess:\n"
        f"  nnUNet_results={model.parents[1]} nnUNetv2_predict -i IN -o OUT -d {dataset[7:10]} -c {configuration} "
        f"-p {plans} -tr {trainer} -f {' '.join(map(str, folds))} -chk checkpoint_final.pth -device cpu\n"
        f"  nnUNetv2_apply_postprocessing -i OUT -o OUT_PP -pp_pkl_file {merged / 'postprocessing.pkl'} "
        f"-plans_json {merged / 'plans.json'}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    workdir = args.workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    flwr_home = workdir / "flwr-home"
    running = superlink_pids(flwr_home)
    if running:
        pids = " ".join(map(str, running))
        print(
            f"run_crossval.py: a SuperLink of {flwr_home} is still running (PID {pids}): `kill {pids}`", file=sys.stderr
        )
        return 2
    if args.data_root is None:
        from flwr_nnunet.demo.crossval_splits import write_five_fold_splits
        from flwr_nnunet.demo.data import make_demo_dataset

        data_root = workdir / "data"
        demo = make_demo_dataset(data_root, num_sites=args.sites, seed=args.seed, planned=False)
        write_five_fold_splits(demo)
        num_sites = len(demo.sites)
    else:
        data_root = args.data_root.absolute()
        num_sites = len(list(data_root.glob("site-*")))
    overrides = run_overrides(args, data_root)
    model = model_folder(overrides)

    from flwr_nnunet.apps.crossval_results import counts_file, merge_folds, merged_folder

    for fold in args.folds:
        if counts_file(model, fold).is_file():
            print(f"fold {fold}: validated already ({counts_file(model, fold)}): skipped", flush=True)
            continue
        status = run_fold(fold, overrides, num_sites, flwr_home)
        if status != "finished:completed" or not counts_file(model, fold).is_file():
            print(
                f"run_crossval.py: fold {fold} did not complete (status {status}); see its log above", file=sys.stderr
            )
            return 1
        print(f"fold {fold} done ({time.monotonic() - started:.0f} s)", flush=True)
    merged = merged_folder(model, args.folds)
    if not (merged / "summary.json").is_file():  # the last fold's run merges; a pipeline killed just before did not
        merge_folds(
            model,
            json.loads((model / "plans.json").read_text()),
            json.loads((model / "dataset.json").read_text()),
            args.folds,
        )
    report(model, args.folds)
    print(f"\ntotal wall time: {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
