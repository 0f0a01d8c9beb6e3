"""Leave one site out on the demo: each site's held-out Dice in the federation and as a hospital it never saw.

Steps (everything lands under ``--workdir``, default ``loso_data/``, which git ignores):

1. the demo's raw data under ``<workdir>/data`` (2D, or ``--3d``), nothing planned;
2. ``flwr run .`` of the whole federation (planning from every site, then the rounds) on this run's own local
   SuperLink (stopped by its PID afterwards);
3. for each site held out (``--hold-out``, default every site in turn): ``flwr run .`` of the federation of the
   other sites (``flwr_nnunet.apps.leave_one_site_out.federation_without``: their raw data linked into
   ``<workdir>/without-site-K``), which plans, preprocesses and trains without it;
4. every held-out site's test cases predicted with ``nnUNetv2_predict``: by the whole federation's model and by the
   model of the federation it was left out of; Dice per site.

Usage: ``python scripts/run_leave_one_site_out.py [--3d] [--sites 3] [--hold-out site-0 ...] [--rounds 8]
[--local-epochs 1] [--iterations 40] [--val-iterations 5] [--seed 0] [--workdir loso_data]`` (with ``--3d`` the
budget defaults come from ``configs/demo-3d.toml``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_demo import budget_config, demo_data_config, flwr_run_with, preflight, script_parser, with_budget_defaults


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; budget options left out take the 2D demo's defaults, or configs/demo-3d.toml's with --3d."""
    parser = script_parser(__doc__.splitlines()[0], "loso_data")
    parser.add_argument("--sites", type=int, default=3, help="demo sites (3: each federation left has 2)")
    parser.add_argument("--hold-out", nargs="+", help="the sites to hold out, one run each (default: every site)")
    return with_budget_defaults(parser.parse_args(argv))


def federated_run(args: argparse.Namespace, demo, data_root: Path, num_sites: int) -> str:
    """`flwr run .` of the sites under ``data_root`` on its own local SuperLink; the run's final status."""
    config = {
        "data-root": str(data_root),
        **demo_data_config(demo, num_sites),
        "configuration": demo.configuration,
        **budget_config(args),
    }
    return flwr_run_with(config, num_sites, args.workdir / "flwr-home")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    args.workdir = args.workdir.absolute()
    problems = preflight(args.workdir, args)
    if problems:
        for problem in problems:
            print(f"run_leave_one_site_out.py: {problem}", file=sys.stderr)
        return 2
    import torch

    from flwr_nnunet.apps.leave_one_site_out import federation_without
    from flwr_nnunet.demo.data import make_demo_dataset
    from flwr_nnunet.demo.heldout import predict_test_cases

    demo = make_demo_dataset(
        args.workdir / "data", num_sites=args.sites, dims=args.dims, seed=args.seed, overwrite=True, planned=False
    )
    held_out = args.hold_out or [site.name for site in demo.sites]
    federations = {"all": (demo.root, len(demo.sites))}
    for name in held_out:
        target = args.workdir / f"without-{name}"
        federations[name] = (target, len(federation_without(demo.root, name, target)))
    for name, (root, num_sites) in federations.items():
        status = federated_run(args, demo, root, num_sites)
        if status != "finished:completed":
            print(f"run_leave_one_site_out.py: the run without {name} ended {status}; see its log", file=sys.stderr)
            return 1
        print(
            f"federation {'of every site' if name == 'all' else f'without {name}'} done ({time.monotonic() - started:.0f} s)"
        )
    torch.set_num_threads(1)
    predictions = args.workdir / "predictions"
    print(
        f"\nDice on held-out test cases ({len(demo.sites[0].test_cases)} per site; {args.rounds} rounds x "
        f"{args.iterations} iterations)\n{'':<8}{'in the federation':>24}{'left out of it':>24}\n"
        f"{'site':<8}" + "   organ  lesion    mean" * 2
    )
    for site in demo.sites:
        if site.name not in held_out:
            continue
        cells = []
        for name in ("all", site.name):
            results = federations[name][0] / "server" / "nnUNet_results"
            scores = predict_test_cases(demo, site, results, predictions / name / site.name)
            cells += [scores["organ"], scores["lesion"], scores["mean"]]
        print(f"{site.name:<8}" + "".join(f"{value:>8.3f}" for value in cells))
    print(f"\ntotal wall time: {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
