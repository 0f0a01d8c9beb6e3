"""Model quality of federations whose hospitals differ: a hospital with another label convention, and personal models.

Every run is the project's whole ServerApp (federated planning, rounds, evaluation) with each message delivered
in-process to ``client_app.py`` (tests/federation_support.py: no Ray, no SuperLink, one torch thread); held-out
test cases are predicted with ``nnUNetv2_predict`` and scored per site.

``--plan outlier``
    The demo's kind of data at 4 sites, site-3's training labels corrupted (labels 1 and 2 swapped, then half of
    label 1 dropped: :func:`flwr_nnunet.demo.corruption.corrupt_site_labels`). Per seed: a federation of the 3 clean
    sites alone, FedAvg with the corrupted site, FedAvg with run-config ``flagged-weight=0``. Prints the clean sites'
    held-out Dice of each and which site the run flagged in which round.
``--plan honest``
    The 2D demo (3 sites) per seed: the sites flagged (none expected) and the largest label-matching gain and
    smallest update cosine any site showed.
``--plan personal``
    The 2D demo: held-out Dice per site of the global model, each site's local-only model (the demo's baseline)
    and its personal model (``fine-tune-epochs``, and MR-MTL with ``personal-mu``).
``--plan partial``
    The 2D demo with site-2 annotating the organ only: held-out lesion and organ Dice at every site when every site
    annotates both labels, when site-2's missing lesions are taken as background (naive), and with the marginal
    loss (run-config ``labels`` declares the federation's set, site-2's dataset.json its own). ``--lesion-drawn-as
    organ``: site-2 drew its lesions as organ (and declares so with ``unannotated_drawn_as``); ``--variants`` picks
    the trainings.

Usage: ``python bench/site_quality.py --plan outlier --seeds 0 1 2 --workdir /tmp/site-quality``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

BUDGET = {"iterations-per-epoch": 40, "val-iterations-per-epoch": 5, "local-epochs": 1}
PARTIAL_VARIANTS = ("all annotate both", "naive", "marginal loss")
DEMO_PLANS = {"plans-max-features": 32, "plans-width-divisor": 4}


def _fresh_sites(demo) -> None:
    """Forget every site's trainer state of an earlier run (its results folder and the live Site objects)."""
    from flwr_nnunet.apps import client

    client._LIVE.clear()
    for site in demo.sites:
        if site.nnunet_results.exists():
            shutil.rmtree(site.nnunet_results)
        site.nnunet_results.mkdir(parents=True)


def run(demo, name: str, workdir: Path, node_configs=None, **overrides) -> dict:
    """One federated run on ``demo``'s sites (``node_configs``: site K's node-config entries);
    ``{"history", "model", "results", "seconds"}``."""
    from federation_support import run_config, run_federation

    _fresh_sites(demo)
    results = workdir / "results" / name
    if results.exists():
        shutil.rmtree(results)
    config = run_config(
        demo.root,
        demo.dataset_name,
        demo.configuration,
        len(demo.sites),
        **{**DEMO_PLANS, **BUDGET, "results-dir": str(results), **overrides},
    )
    started = time.monotonic()
    with open(workdir / f"{name}.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        done = run_federation(config, len(demo.sites), flagged=None, node_configs=node_configs)
    return {**done, "results": results, "seconds": time.monotonic() - started}


def held_out(demo, results: Path, output: Path, sites=None, **predict_options) -> dict[str, dict[str, float]]:
    """Dice per site of the model under ``results`` on each site's held-out cases."""
    from flwr_nnunet.demo.heldout import dice_scores, gather_test_images, predict

    images = gather_test_images(demo, output.parent / "test_images")
    predict(demo, results, images, output, **predict_options)
    return {
        site.name: dice_scores(output, site.labels_ts, site.test_cases, demo.file_ending)
        for site in (sites or demo.sites)
    }


def flags(history: dict) -> dict[str, int]:
    """Each site flagged in the run and the round that completed its evidence (0: before training)."""
    last = history[max(history, key=int)] if history else {}
    return dict(last.get("diagnostics", {}).get("flagged", {}))


def extremes(history: dict) -> tuple[float, float]:
    """The largest gain any site's own label matching had over the federation's convention in a round that had
    one (flagged at >= 0.1 two rounds running), and the smallest segmentation-head cosine any site showed."""
    gains, cosines = [0.0], [1.0]
    for entry in history.values():
        for measured in entry.get("diagnostics", {}).get("sites", {}).values():
            gain = measured.get("labels", {}).get("gain-over-convention")
            if gain is not None:
                gains.append(gain)
            if "head-cosine" in measured:
                cosines.append(measured["head-cosine"])
    return max(gains), min(cosines)


def plan_outlier(args) -> None:
    from flwr_nnunet.demo.corruption import corrupt_site_labels
    from flwr_nnunet.demo.data import make_demo_dataset

    work = args.workdir
    clean = make_demo_dataset(work / "clean", num_sites=3, planned=False, overwrite=True)
    mixed = make_demo_dataset(work / "mixed", num_sites=4, planned=False, overwrite=True)
    corrupt_site_labels(mixed.sites[3], mixed.file_ending)
    rows = []
    for seed in args.seeds:
        budget = {"num-server-rounds": args.rounds, "seed": seed}
        alone = run(clean, f"clean-{seed}", work, **budget)
        fedavg = run(mixed, f"fedavg-{seed}", work, **budget)
        excluded = run(mixed, f"excluded-{seed}", work, **budget, **{"flagged-weight": 0.0})
        # the plans of the runs before, no planning phase: only the evidence training gives
        fixed = {"flagged-weight": 0.0, "planning": "fixed"}
        training = run(mixed, f"excluded-in-training-{seed}", work, **budget, **fixed)
        clean_sites = mixed.sites[:3]
        scores = {
            "clean sites alone": held_out(clean, alone["results"], work / "pred" / f"clean-{seed}"),
            "FedAvg with site-3": held_out(mixed, fedavg["results"], work / "pred" / f"fedavg-{seed}", clean_sites),
            "flagged-weight=0": held_out(mixed, excluded["results"], work / "pred" / f"excluded-{seed}", clean_sites),
            "... planning fixed": held_out(mixed, training["results"], work / "pred" / f"training-{seed}", clean_sites),
        }
        for label, per_site in scores.items():
            mean = sum(d["mean"] for d in per_site.values()) / len(per_site)
            rows.append((seed, label, per_site, mean))
        runs = {"clean": alone, "FedAvg": fedavg, "flagged-weight=0": excluded, "... planning fixed": training}
        print(
            f"seed {seed}: sites flagged (first round; 0: before training): "
            + ", ".join(f"{label} {flags(done['history'])}" for label, done in runs.items())
            + "; wall "
            + " / ".join(f"{done['seconds']:.0f}" for done in runs.values())
            + " s",
            flush=True,
        )
    print(
        f"\nHeld-out mean Dice of the clean sites ({args.rounds} rounds x 1 epoch x {BUDGET['iterations-per-epoch']} iterations)"
    )
    print(f"{'seed':<6}{'training':<22}{'site-0':>8}{'site-1':>8}{'site-2':>8}{'mean':>8}")
    for seed, label, per_site, mean in rows:
        cells = "".join(f"{per_site[f'site-{k}']['mean']:>8.3f}" for k in range(3))
        print(f"{seed:<6}{label:<22}{cells}{mean:>8.3f}")


def plan_honest(args) -> None:
    from flwr_nnunet.demo.data import make_demo_dataset

    demo = make_demo_dataset(
        args.workdir / f"demo-{args.dims}d", num_sites=3, dims=args.dims, planned=False, overwrite=True
    )
    budget = {} if args.dims == 2 else {"iterations-per-epoch": 30, "val-iterations-per-epoch": 2}
    print(f"{'seed':<6}{'flagged':<20}{'largest gain over convention':>30}{'smallest head cosine':>22}")
    for seed in args.seeds:
        done = run(
            demo,
            f"honest-{args.dims}d-{seed}",
            args.workdir,
            **budget,
            **{"num-server-rounds": args.rounds, "seed": seed},
        )
        gain, cosine = extremes(done["history"])
        print(f"{seed:<6}{json.dumps(flags(done['history'])):<20}{gain:>30.3f}{cosine:>22.3f}", flush=True)


def personal_models(demo, work: Path, label: str) -> dict[str, dict[str, float]]:
    """Held-out Dice of each site's personal model (``checkpoint_personal.pth`` in its own results folder)."""
    scores = {}
    for site in demo.sites:
        output = work / "pred" / f"{label}-{site.name}"
        options = {"fold": "0", "checkpoint": "checkpoint_personal.pth"}
        scores.update(held_out(demo, site.nnunet_results, output, [site], **options))
    return scores


def local_only_models(demo, work: Path, args) -> dict[str, dict[str, float]]:
    """Held-out Dice of each site's model trained alone for as many epochs (the demo's baseline)."""
    from flwr_nnunet.demo.heldout import train_local_only

    scores = {}
    for site in demo.sites:
        local = work / "local" / site.name
        if local.exists():
            shutil.rmtree(local)
        budget = {"iterations_per_epoch": BUDGET["iterations-per-epoch"]}
        budget["val_iterations_per_epoch"] = BUDGET["val-iterations-per-epoch"]
        with open(work / f"local-{site.name}.log", "w") as log, contextlib.redirect_stdout(log):
            train_local_only(demo, site, local, epochs=args.rounds, seed=args.seeds[0], **budget)
        scores.update(held_out(demo, local, work / "pred" / f"local-{site.name}", [site], fold="0"))
    return scores


def plan_personal(args) -> None:
    from flwr_nnunet.demo.data import make_demo_dataset

    work = args.workdir
    demo = make_demo_dataset(work / "demo", num_sites=3, planned=False, overwrite=True)
    budget = {"num-server-rounds": args.rounds, "seed": args.seeds[0]}
    tuned = run(demo, "fine-tune", work, **budget, **{"fine-tune-epochs": args.fine_tune_epochs})
    scores = {"global": held_out(demo, tuned["results"], work / "pred" / "global")}
    scores["fine-tuned"] = personal_models(demo, work, "fine-tuned")
    fine_tune = json.loads((tuned["model"] / "flwr_history.json").read_text()).get("fine-tune", {})
    kept = {name: metrics.get("fine-tune-kept") for name, metrics in fine_tune.get("sites", {}).items()}
    mtl = run(demo, "mr-mtl", work, **budget, **{"personalization": "mr-mtl", "personal-mu": args.personal_mu})
    scores["mr-mtl global"] = held_out(demo, mtl["results"], work / "pred" / "mtl-global")
    scores["mr-mtl personal"] = personal_models(demo, work, "mr-mtl")
    scores["local-only"] = local_only_models(demo, work, args)
    print(
        f"\nHeld-out mean Dice per site ({args.rounds} rounds; fine-tuning {args.fine_tune_epochs} epochs; "
        f"MR-MTL mu {args.personal_mu}); fine-tuned model kept: {kept}"
    )
    print(f"{'site':<8}" + "".join(f"{label:>17}" for label in scores))
    for site in demo.sites:
        print(f"{site.name:<8}" + "".join(f"{scores[label][site.name]['mean']:>17.3f}" for label in scores))


def plan_partial(args) -> None:
    from flwr_nnunet.demo.corruption import annotate_only
    from flwr_nnunet.demo.data import make_demo_dataset

    work, rows = args.workdir, []
    organ_only = {"background": 0, "organ": 1}
    drawn_as = {"lesion": args.lesion_drawn_as} if args.lesion_drawn_as != "background" else None
    declared = {"labels": "background=0 organ=1 lesion=2"}
    for variant in args.variants:
        name = variant.replace(" ", "-")
        demo = make_demo_dataset(work / name, num_sites=3, planned=False, overwrite=True)
        if variant != "all annotate both":
            marginal = variant == "marginal loss"
            annotate_only(demo.sites[2], demo.file_ending, organ_only, declare=marginal, drawn_as=drawn_as)
        for seed in args.seeds:
            budget = {
                "num-server-rounds": args.rounds,
                "seed": seed,
                **(declared if variant == "marginal loss" else {}),
            }
            done = run(demo, f"{name}-{seed}", work, **budget)
            rows.append((seed, variant, held_out(demo, done["results"], work / "pred" / f"{name}-{seed}")))
            print(f"{variant}, seed {seed}: {done['seconds']:.0f} s", flush=True)
    print(
        f"\nHeld-out Dice per site, lesion / organ ({args.rounds} rounds; site-2 annotated the organ only, its "
        f"lesions drawn as {args.lesion_drawn_as})"
    )
    print(f"{'seed':<6}{'training':<20}" + "".join(f"{f'site-{k}':>16}" for k in range(3)))
    for seed, variant, scores in rows:
        cells = "".join(f"{scores[f'site-{k}']['lesion']:>8.3f}{scores[f'site-{k}']['organ']:>8.3f}" for k in range(3))
        print(f"{seed:<6}{variant:<20}{cells}")
    print("mean over seeds")
    for variant in dict.fromkeys(v for _, v, _ in rows):
        runs = [scores for _, v, scores in rows if v == variant]
        means = [
            sum(scores[f"site-{k}"][label] for scores in runs) / len(runs)
            for k in range(3)
            for label in ("lesion", "organ")
        ]
        print(f"{'':<6}{variant:<20}" + "".join(f"{value:>8.3f}" for value in means))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", choices=("outlier", "honest", "personal", "partial"), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--fine-tune-epochs", type=int, default=4)
    parser.add_argument("--personal-mu", type=float, default=0.1)
    parser.add_argument(
        "--lesion-drawn-as",
        choices=("background", "organ"),
        default="background",
        help="partial: what site-2's labels hold where its lesions are (it did not annotate them)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=PARTIAL_VARIANTS,
        default=PARTIAL_VARIANTS,
        help="partial: the trainings to run",
    )
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2, help="honest: the 2D or the 3D demo")
    parser.add_argument("--workdir", type=Path, default=Path("site_quality"))
    args = parser.parse_args(argv)
    args.workdir = args.workdir.absolute()
    torch.set_num_threads(
        1
    )  # as each simulated site trains: two threads on a busy 2-core machine are many times slower
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    plans = {"outlier": plan_outlier, "honest": plan_honest, "personal": plan_personal, "partial": plan_partial}
    plans[args.plan](args)
    print(f"total wall time: {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
