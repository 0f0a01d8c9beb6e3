"""The federated nnU-Net pipeline: five-fold cross-validation per configuration, model selection, held-out Dice.

Steps (everything lands under ``--workdir``, default ``crossval_data/``, which git ignores):

1. the data: the demo's raw data under ``<workdir>/data`` (2D, or with ``--3d`` the 3D demo) with nnU-Net's
   five-fold split at every site (``flwr_nnunet.demo.crossval_splits``), or your sites' data with ``--data-root``
   (``make-demo=false``; each site's own ``splits_final.json``, nnU-Net's five-fold split where federated planning
   writes it);
2. per configuration (``--configurations``; the 2D demo: 2d, the 3D demo: 2d 3d_fullres) and per fold k in
   ``--folds`` (default 0 1 2 3 4), in turn: ``flwr run .`` with ``configuration=c fold=k crossval=true
   resume=true`` on this run's own local SuperLink (stopped by its PID afterwards): the rounds, then every site
   validates the fold's global model on its own validation cases and sends per-case counts only. A fold whose
   counts are written already is skipped, so a killed pipeline started again continues with the fold it was in;
   the last fold's run merges the folds into ``crossval_results_folds_0_1_2_3_4/`` (summaries pooled and per site,
   ``postprocessing.pkl`` / ``.json``);
3. one ``flwr run .`` with ``find-best-configuration`` (folds 0-4 only): every site ensembles each pair of
   configurations on its own cases (counts only), the server picks nnU-Net's best configuration or ensemble and
   its postprocessing and writes ``inference_instructions.txt``;
4. the demo only (unless ``--no-fold-all``): one ``flwr run .`` trains the single fold-``all`` model of the first
   selected configuration with the same budget, and every site's held-out cases are predicted with nnU-Net's own
   commands: the selection's five folds (ensembled where an ensemble won) and its postprocessing, against the
   fold-``all`` model; Dice per site.

Usage: ``python scripts/run_crossval.py [--3d] [--configurations 2d 3d_fullres] [--rounds 8] [--local-epochs 1]
[--iterations 40] [--val-iterations 5] [--sites 3] [--seed 0] [--folds 0 1 2 3 4] [--workdir crossval_data]
[--data-root DIR] [--config "key=value ..."] [--no-fold-all]`` (with ``--3d`` the budget defaults come from
``configs/demo-3d.toml``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_demo import budget_config, demo_data_config, flwr_run_with, preflight, script_parser, with_budget_defaults


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; budget options left out take the 2D demo's defaults, or configs/demo-3d.toml's with --3d."""
    parser = script_parser(__doc__.splitlines()[0], "crossval_data", per=" per fold")
    parser.add_argument(
        "--configurations", nargs="+", help="configurations to cross-validate (2D: 2d; 3D: 2d 3d_fullres)"
    )
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="folds to train, in turn")
    parser.add_argument("--sites", type=int, default=3, help="demo sites (2 or 3); with --data-root: site-K folders")
    parser.add_argument("--data-root", type=Path, help="your sites' data (site-K/nnUNet_raw/...): no demo is made")
    parser.add_argument("--config", default="", help="more run config, 'key=value ...' (e.g. dataset)")
    parser.add_argument("--no-fold-all", action="store_true", help="skip the demo's fold-all model and held-out Dice")
    args = with_budget_defaults(parser.parse_args(argv))
    if args.configurations is None:
        args.configurations = ["2d", "3d_fullres"] if args.dims == 3 else ["2d"]
    return args


def run_overrides(args: argparse.Namespace, data_root: Path, demo=None) -> dict:
    """The run config every run shares (the configuration and fold are added per run); ``demo``: the demo data the
    script made (every configuration planned, so not ``make-demo=true``, which plans the demo's only)."""
    from flwr.common.config import parse_config_args

    overrides = {"data-root": str(data_root), **budget_config(args), "crossval": True, "resume": True}
    overrides.update(demo_data_config(demo, len(demo.sites)) if demo is not None else {"make-demo": False})
    overrides.update(parse_config_args([args.config]) if args.config.strip() else {})
    return overrides


def settings_of(overrides: dict):
    """The project's run settings with these overrides."""
    from flwr.common.config import get_fused_config_from_dir

    from flwr_nnunet.apps.run_config import RunSettings

    return RunSettings.from_run_config(get_fused_config_from_dir(REPO, overrides))


def model_folder(overrides: dict) -> Path:
    """The global model folder the runs with these overrides write."""
    from flwr_nnunet.nnunet.model_selection import model_identifier

    settings = settings_of(overrides)
    model = model_identifier(settings.trainer, settings.plans, settings.configuration)
    return settings.results_dir / settings.dataset / model


def cross_validate(overrides: dict, folds: list[int], num_sites: int, flwr_home: Path, started: float) -> Path:
    """Every fold of one configuration, in turn (a fold validated already is skipped), merged; the model folder.

    Raises
    ------
    RuntimeError
        If a fold's run does not complete.
    """
    from flwr_nnunet.apps.crossval_results import counts_file, merge_folds, merged_folder

    model = model_folder(overrides)
    for fold in folds:
        if counts_file(model, fold).is_file():
            print(f"{model.name} fold {fold}: validated already ({counts_file(model, fold)}): skipped", flush=True)
            continue
        status = flwr_run_with({**overrides, "fold": str(fold)}, num_sites, flwr_home)
        if status != "finished:completed" or not counts_file(model, fold).is_file():
            raise RuntimeError(f"{model.name} fold {fold} did not complete (status {status}); see its log above")
        print(f"{model.name} fold {fold} done ({time.monotonic() - started:.0f} s)", flush=True)
    if not (merged_folder(model, folds) / "summary.json").is_file():  # a pipeline killed before the merge
        plans, dataset_json = (json.loads((model / name).read_text()) for name in ("plans.json", "dataset.json"))
        merge_folds(model, plans, dataset_json, folds)
    return model


def report_crossval(model: Path, folds: list[int]) -> None:
    """One configuration's merged cross-validation: pooled and per site, and its postprocessing decision."""
    from flwr_nnunet.apps.crossval_results import MERGE_FILE, merged_folder

    merged = merged_folder(model, folds)
    about = json.loads((merged / MERGE_FILE).read_text())
    print(f"\n{model.name}: federated cross-validation, folds {folds} ({merged})")
    print(f"  pooled over the sites: foreground Dice {about['foreground_dice']:.4f}")
    for site, entry in sorted(about["sites"].items()):
        dice = json.loads((merged / entry["summary"]).read_text())["foreground_mean"]["Dice"]
        print(f"  {site:<12} {entry['cases']:>3} case(s)  foreground Dice {dice:.4f}")
    steps = (about["postprocessing"] or {}).get("postprocessing_kwargs")
    print(f"  postprocessing (keep the largest component of): {steps if steps is not None else 'not decided'}")


def report_selection(information: dict, results: Path) -> None:
    """The candidates' scores, the best and its postprocessing, and where nnU-Net's instructions are."""
    best = information["best_model_or_ensemble"]
    print("\nmodel selection (nnUNetv2_find_best_configuration over the sites; foreground Dice, pooled):")
    for name, score in information["all_results"].items():
        print(f"  {score:.4f}  {name}")
    chosen = " + ".join(m["configuration"] for m in best["selected_model_or_models"])
    print(
        f"  best: {chosen} ({best['result_on_crossval_pre_pp']:.4f}, "
        f"{best['result_on_crossval_post_pp']:.4f} after postprocessing: {best['postprocessing_file']})"
    )
    print(f"  how to predict with it: {results / information['dataset_name_or_id'] / 'inference_instructions.txt'}")


def compare_with_fold_all(args, overrides: dict, information: dict, demo, flwr_home: Path) -> None:
    """Train the fold-all model; predict every site's held-out cases with the selection and with it; print Dice."""
    import torch

    from flwr_nnunet.demo.heldout import dice_scores, gather_test_images, predict, predict_as_instructed

    configuration = information["best_model_or_ensemble"]["selected_model_or_models"][0]["configuration"]
    fold_all = {**overrides, "configuration": configuration, "crossval": False, "fold": "all"}
    status = flwr_run_with(fold_all, len(demo.sites), flwr_home)
    if status != "finished:completed":
        raise RuntimeError(f"the fold-all run did not complete (status {status}); see its log above")
    torch.set_num_threads(1)
    results = settings_of(fold_all).results_dir
    images = gather_test_images(demo, args.workdir / "predictions" / "test_images")
    selected = predict_as_instructed(demo, information, results, images, args.workdir / "predictions" / "selection")
    single = predict(
        demo, results, images, args.workdir / "predictions" / "fold_all", fold="all", configuration=configuration
    )
    chosen = " + ".join(m["configuration"] for m in information["best_model_or_ensemble"]["selected_model_or_models"])
    print(
        f"\nDice on held-out test cases ({len(demo.sites[0].test_cases)} per site; {args.rounds} rounds x "
        f"{args.iterations} iterations for every model)"
    )
    print(f"{'':<8}{f'5 folds {chosen} + pp':>24}{f'fold all {configuration}':>24}")
    print(f"{'site':<8}" + "   organ  lesion    mean" * 2)
    for site in demo.sites:
        cells = []
        for folder in (selected, single):
            scores = dice_scores(folder, site.labels_ts, site.test_cases, demo.file_ending)
            cells += [scores["organ"], scores["lesion"], scores["mean"]]
        print(f"{site.name:<8}" + "".join(f"{value:>8.3f}" for value in cells))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    args.workdir = args.workdir.absolute()
    flwr_home = args.workdir / "flwr-home"
    problems = preflight(args.workdir, args)
    if problems:
        for problem in problems:
            print(f"run_crossval.py: {problem}", file=sys.stderr)
        return 2
    if args.data_root is None:
        from flwr_nnunet.demo.crossval_splits import write_five_fold_splits
        from flwr_nnunet.demo.data import make_demo_dataset

        data_root = args.workdir / "data"
        demo = make_demo_dataset(data_root, num_sites=args.sites, dims=args.dims, seed=args.seed, planned=False)
        write_five_fold_splits(demo)
        num_sites = len(demo.sites)
    else:
        demo, data_root = None, args.data_root.absolute()
        num_sites = len(list(data_root.glob("site-*")))
    overrides = run_overrides(args, data_root, demo)
    try:
        for configuration in args.configurations:
            model = cross_validate(
                {**overrides, "configuration": configuration}, args.folds, num_sites, flwr_home, started
            )
            report_crossval(model, args.folds)
        if sorted(args.folds) != [0, 1, 2, 3, 4]:
            print(f"\ntotal wall time: {time.monotonic() - started:.0f} s (model selection needs folds 0-4)")
            return 0
        selection = {**overrides, "configuration": args.configurations[0]}
        status = flwr_run_with(
            {**selection, "find-best-configuration": " ".join(args.configurations)}, num_sites, flwr_home
        )
        results = settings_of(selection).results_dir
        information_file = results / settings_of(selection).dataset / "inference_information.json"
        if status != "finished:completed" or not information_file.is_file():
            raise RuntimeError(f"the model selection run did not complete (status {status}); see its log above")
        information = json.loads(information_file.read_text())
        report_selection(information, results)
        if demo is not None and not args.no_fold_all:
            compare_with_fold_all(args, overrides, information, demo, flwr_home)
    except RuntimeError as error:
        print(f"run_crossval.py: {error}", file=sys.stderr)
        return 1
    print(f"\ntotal wall time: {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
