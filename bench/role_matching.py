"""Two hospitals with different plans (5 and 6 stages, 2D): their layers averaged by role, by name, or not at all.

``--plans-differ-by`` says why the plans differ:

- ``image-size`` (default): site A holds the demo's 64x64 images, site B 128x128 images (``--styles``: the demo's
  scanner style of each); each site's plans are nnU-Net's own for its data (the demo's planning,
  :func:`flwr_nnunet.demo.data.make_demo_dataset`): 5 stages at A, 6 at B. The organs are drawn as a fraction of the
  image edge, so a pixel at A covers twice the anatomy of one at B.
- ``gpu``: both sites hold 128x128 images: site A the two-site demo's ``styles[0]`` site, B its ``styles[1]`` site
  (with equal styles, that scanner's site of a second demo: other patients), each planned by its demo; site B
  trains those plans (6 stages), site A keeps its own plans for a smaller GPU (its demo's fingerprint planned by
  nnU-Net's planner for ``--small-gpu-gb``: a 96x96 patch, 5 stages), so a pixel means the same at both.

``--training-cases``: how many of its training cases each site trains on. ``--variants``: ``role`` and ``name`` drive
the sites' trainers in this process (below); ``serverapp`` is the project's whole ServerApp with run-config
``layer-matching = "role"`` (and ``local-norms`` with ``--local-norms``), every message delivered in-process to
``client_app.py`` (``bench/site_quality.py``'s :func:`run`; ``--plans-differ-by gpu`` with two scanners: the sites
of one demo), each site then predicting with the model it keeps: its personal model with local norms, else its
plans' global model. Each federated run drives the sites' own trainers (:class:`~flwr_nnunet.site.site.Site`, one torch thread) in
this process: every round each site receives its plans' global model, trains one epoch and replies; the server
averages each unit of matched layers by cases (:func:`~flwr_nnunet.strategy.role_aggregation.role_weighted_mean_`),
matched by role (:func:`~flwr_nnunet.nnunet.layer_roles.role_keys`) or by name and shape
(:func:`~flwr_nnunet.nnunet.layer_roles.name_keys`, FednnU-Net's asymmetric mode). Each plans' global model is
written as its own nnU-Net model folder and predicts its site's held-out cases with ``nnUNetv2_predict``; the
baseline is the same site trained alone for as many epochs from the same initial weights
(:func:`~flwr_nnunet.demo.heldout.train_local_only`). Not the ServerApp: Flower's messages are not used.

Usage: ``python bench/role_matching.py --rounds 8 --seeds 0 1 2 --training-cases 2 --workdir /tmp/role-matching``
(``--plans-differ-by gpu --styles 0 1 --local-norms --variants role name serverapp``: the sites that differ in their
GPU and scanner, through the ServerApp too).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

BUDGET = {"iterations_per_epoch": 40, "val_iterations_per_epoch": 5}
SITES = (("site-A", 64), ("site-B", 128))
"""(name, image edge)."""


@contextlib.contextmanager
def quiet(log: Path) -> Iterator[None]:
    """Everything printed inside goes to ``log``."""
    with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        yield


def _hospitals(workdir: Path, differ_by: str, styles: list[int], small_gpu_gb: float) -> dict:
    """Name -> (demo dataset, its site) for each of :data:`SITES` (``--plans-differ-by``, see the module)."""
    from flwr_nnunet.demo.data import make_demo_dataset

    if differ_by == "image-size":
        return {
            name: (demo, demo.sites[style])
            for (name, size), style in zip(SITES, styles)
            for demo in [make_demo_dataset(workdir / f"demo-{size}", num_sites=2, size=size, planned=True)]
        }
    demo = make_demo_dataset(workdir / "demo-128", num_sites=2, size=128, planned=True)
    other = demo  # one scanner: site B the same scanner's site of a second demo (other patients)
    if styles[0] == styles[1]:
        other = make_demo_dataset(workdir / "demo-128-b", num_sites=2, size=128, planned=True, seed=1)
    small = _plan_for_gpu(demo, demo.sites[styles[0]], small_gpu_gb)
    return {SITES[0][0]: (small, demo.sites[styles[0]]), SITES[1][0]: (other, other.sites[styles[1]])}


def _plan_for_gpu(demo, site, gpu_gb: float):
    """``demo`` with plans of its federation's fingerprint for a ``gpu_gb`` GPU (narrowed as the demo's), installed
    and preprocessed at ``site``."""
    from flwr_nnunet.demo.data import DEMO_PLANNING
    from flwr_nnunet.nnunet.planning import install_plans, plan_from_fingerprint, preprocess_site

    name = f"{demo.plans_name}_{gpu_gb:g}GB"
    folder = demo.server.preprocessed_dataset_folder
    shared = json.loads(demo.plans_file.read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    fingerprint = json.loads((folder / "dataset_fingerprint.json").read_text())
    plans = plan_from_fingerprint(
        fingerprint,
        dataset_json,
        demo.dataset_name,
        shared["image_reader_writer"],
        plans_name=name,
        gpu_memory_target_in_gb=gpu_gb,
    )
    plans = DEMO_PLANNING.narrowed(plans, demo.configuration)
    install_plans(plans, dataset_json, site.preprocessed_dataset_folder, fingerprint)
    (folder / f"{name}.json").write_text(json.dumps(plans, indent=4))  # the server holds every site's plans
    preprocess_site(site.raw_dataset_folder, site.preprocessed_dataset_folder, plans, demo.configuration)
    return dataclasses.replace(demo, plans_name=name)


def _train_on(hospitals: dict, training_cases: int | None) -> None:
    """Each site trains on its first ``training_cases`` training cases (None: all), its validation cases unchanged."""
    for _, site in hospitals.values():
        train = [case for case in site.training_cases if case not in site.validation_cases][:training_cases]
        splits = [{"train": train, "val": list(site.validation_cases)}]
        (site.preprocessed_dataset_folder / "splits_final.json").write_text(json.dumps(splits, indent=4))


def _site(name: str, demo, site, results: Path):
    from flwr_nnunet.site.site import Site
    from flwr_nnunet.site.spec import SiteSpec

    if results.exists():
        shutil.rmtree(results)
    spec = SiteSpec(
        name=name,
        dataset=demo.dataset_name,
        nnunet_preprocessed=site.nnunet_preprocessed,
        nnunet_results=results,
        configuration=demo.configuration,
        plans=demo.plans_name,
        device="cpu",
    )
    return Site(spec)


def federate(hospitals: dict, roles, rounds: int, seed: int, results: Path, local=None) -> dict:
    """Train the hospitals together for ``rounds`` rounds, the keys ``local`` names (None: none) kept at each site;
    return name -> (its shared keys, its local keys)."""
    from flwr_nnunet.core.aliasing import AliasMap
    from flwr_nnunet.nnunet.layer_roles import match_layers
    from flwr_nnunet.nnunet.model_folder import NnUNetModelFolder
    from flwr_nnunet.nnunet.networks import build_trainer_network
    from flwr_nnunet.site.spec import TrainOptions
    from flwr_nnunet.strategy.role_aggregation import align_matched_, role_weighted_mean_

    sites, networks, models, folders = {}, {}, {}, {}
    for name, (demo, site) in hospitals.items():
        sites[name] = _site(name, demo, site, results / "sites" / name)
        plans = sites[name].check()
        folder = site.preprocessed_dataset_folder
        dataset_json = json.loads((folder / "dataset.json").read_text())
        fingerprint = json.loads((folder / "dataset_fingerprint.json").read_text())
        torch.manual_seed(seed)  # the initial weights the site's local-only baseline starts from
        networks[name] = build_trainer_network(plans, dataset_json, demo.configuration)
        models[name] = AliasMap.from_module(networks[name]).collapse(networks[name].state_dict())
        folders[name] = NnUNetModelFolder.in_results(
            results / name, plans, dataset_json, fingerprint, demo.configuration
        )
    shapes = {name: {k: t.shape for k, t in model.items()} for name, model in models.items()}
    matching = match_layers(shapes, roles, local=local)
    align_matched_(models, matching)
    for server_round in range(1, rounds + 1):
        options = TrainOptions(local_epochs=1, num_epochs=rounds, seed=seed, server_round=server_round, **BUDGET)
        replies = []
        for name, site in sites.items():
            tensors, metrics = site.train(models[name], options)
            replies.append((name, tensors, float(metrics["num-examples"])))
        role_weighted_mean_(models, matching, replies)
    for name, folder in folders.items():
        folder.write_metadata()
        folder.save_checkpoint("final", networks[name].state_dict(), {"server_round": rounds})
    return {name: (matching.shared(name), matching.local(name)) for name in hospitals}


def through_serverapp(hospitals: dict, rounds: int, seed: int, local_norms: bool, work: Path) -> dict[str, float]:
    """Name -> held-out mean Dice after a run of the project's ServerApp with ``layer-matching = "role"`` on the
    sites of one demo, each site predicting with the model it keeps (see the module)."""
    from site_quality import run

    from flwr_nnunet.demo.heldout import dice_scores, predict

    if len({demo.root for demo, _ in hospitals.values()}) != 1:
        raise SystemExit("--variants serverapp: the sites of one demo (--plans-differ-by gpu --styles 0 1)")
    base = hospitals[SITES[1][0]][0]  # site-B trains its demo's plans, the run's
    own = {base.sites.index(site): {"plans": demo.plans_name} for demo, site in hospitals.values() if demo is not base}
    overrides = {
        "planning": "fixed",
        "layer-matching": "role",
        "local-norms": local_norms,
        "seed": seed,
        "num-server-rounds": rounds,
        "iterations-per-epoch": BUDGET["iterations_per_epoch"],
        "val-iterations-per-epoch": BUDGET["val_iterations_per_epoch"],
    }
    done = run(base, f"serverapp-{seed}", work, node_configs=own, **overrides)
    scores = {}
    for name, (demo, site) in hospitals.items():
        output = work / "pred" / f"serverapp-{seed}-{name}"
        if local_norms:  # the global model with the site's own norms
            (personal,) = site.nnunet_results.rglob(f"*__{demo.plans_name}__*/fold_*/checkpoint_personal.pth")
            fold = personal.parent.name.removeprefix("fold_")
            predict(demo, site.nnunet_results, site.images_ts, output, fold=fold, checkpoint=personal.name)
        else:
            predict(demo, done["results"], site.images_ts, output)
        scores[name] = dice_scores(output, site.labels_ts, site.test_cases, demo.file_ending)["mean"]
    return scores


def main(argv=None) -> int:
    from flwr_nnunet.demo.heldout import predict_test_cases, train_local_only
    from flwr_nnunet.nnunet.layer_roles import name_keys, role_keys
    from flwr_nnunet.nnunet.networks import is_normalization_key

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--plans-differ-by", choices=("image-size", "gpu"), default="image-size")
    parser.add_argument("--styles", type=int, nargs=2, choices=(0, 1), default=[0, 1], help="each site's scanner")
    parser.add_argument("--local-norms", action="store_true", help="each site keeps its normalization layers (FedBN)")
    parser.add_argument("--small-gpu-gb", type=float, default=0.05, help="site A's GPU with --plans-differ-by gpu")
    parser.add_argument("--training-cases", type=int, help="each site's training cases (default: all)")
    parser.add_argument("--variants", nargs="+", choices=("role", "name", "serverapp"), default=["role", "name"])
    parser.add_argument("--workdir", type=Path, default=Path("role_matching"))
    args = parser.parse_args(argv)
    work = args.workdir.absolute()
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # two threads on a busy 2-core machine are many times slower
    started = time.monotonic()
    with quiet(work / "setup.log"):
        hospitals = _hospitals(work, args.plans_differ_by, args.styles, args.small_gpu_gb)
        _train_on(hospitals, args.training_cases)
    kept = is_normalization_key if args.local_norms else None
    rows = []
    for seed in args.seeds:
        scores: dict[str, dict[str, float]] = {}
        if "serverapp" in args.variants:
            with quiet(work / f"serverapp-{seed}.log"):
                ran = through_serverapp(hospitals, args.rounds, seed, args.local_norms, work)
            for name, score in ran.items():
                scores.setdefault(name, {})["serverapp"] = score
            print(f"seed {seed}, ServerApp run: {ran}; {time.monotonic() - started:.0f} s", flush=True)
        for variant, roles in (("role", role_keys), ("name", name_keys)):
            if variant not in args.variants:
                continue
            results = work / f"{variant}-{seed}"
            with quiet(work / f"{variant}-{seed}.log"):
                matched = federate(hospitals, roles, args.rounds, seed, results, local=kept)
            for name, (demo, site) in hospitals.items():
                output = work / "pred" / f"{variant}-{seed}-{name}"
                scores.setdefault(name, {})[variant] = predict_test_cases(demo, site, results / name, output)["mean"]
                print(
                    f"seed {seed}, {variant} matching, {name}: {len(matched[name][0])} groups shared, "
                    f"{len(matched[name][1])} local; {time.monotonic() - started:.0f} s",
                    flush=True,
                )
        for name, (demo, site) in hospitals.items():
            local = work / f"alone-{seed}" / name
            if local.exists():
                shutil.rmtree(local)
            with quiet(work / f"alone-{seed}-{name}.log"):
                train_local_only(demo, site, local, epochs=args.rounds, seed=seed, device="cpu", **BUDGET)
            output = work / "pred" / f"alone-{seed}-{name}"
            scores[name]["alone"] = predict_test_cases(demo, site, local, output, fold="0")["mean"]
        rows += [(seed, name, scores[name]) for name in hospitals]
    cases = args.training_cases or "all"
    print(
        f"\nHeld-out mean Dice ({args.rounds} rounds x 1 epoch x {BUDGET['iterations_per_epoch']} iterations; "
        f"training cases per site: {cases}; scanner styles {args.styles}; plans differ by {args.plans_differ_by}"
        f"{'; normalization layers local' if args.local_norms else ''})"
    )
    columns = {"role": "by role", "name": "by name", "serverapp": "ServerApp", "alone": "alone"}
    shown = [key for key in columns if key in args.variants or key == "alone"]
    print(f"{'seed':<6}{'site':<8}" + "".join(f"{columns[key]:>11}" for key in shown))
    for seed, name, score in rows:
        print(f"{seed:<6}{name:<8}" + "".join(f"{score[key]:>11.3f}" for key in shown))
    print(f"total wall time: {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
    sys.exit(main())
