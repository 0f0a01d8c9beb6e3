"""Model quality with compressed updates: held-out Dice per site and validation Dice per round, per mode and seed.

Every run is the project's whole ServerApp on the demo (federated planning, rounds, evaluation) with each message
delivered in-process to ``client_app.py`` (:func:`site_quality.run`: no Ray, no SuperLink, one torch thread), with
the demo's own network and budget (as ``scripts/run_demo.py``; ``--3d``: ``configs/demo-3d.toml``'s) and run-config
``compression`` set per mode; held-out test cases are predicted with ``nnUNetv2_predict`` and scored per site
(:func:`site_quality.held_out`).
Prints, per seed and mode, the held-out mean Dice of each site and their mean, then the aggregated validation Dice
of every round (``flwr_history.json``), so a reader sees how many rounds each mode takes to reach the same Dice.

Usage: ``python bench/compression_quality.py --modes none int8-block int4-block --seeds 0 1 [--3d]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from site_quality import held_out, run

DEMO_NETWORK = {"plans-max-features": 0, "plans-width-divisor": 1}
"""The demo's own network (pyproject.toml's defaults), not site_quality's narrower one."""


def print_against_none(rows: list[tuple]) -> None:
    """Each mode's held-out Dice minus ``none``'s on the same seed, per site and over the sites: the mean over the
    seeds and its range."""
    base = {seed: scores for seed, mode, scores, _ in rows if mode == "none"}
    paired: dict[str, list[list[float]]] = {}
    for seed, mode, scores, _ in rows:
        if mode != "none" and seed in base:
            diffs = [scores[f"site-{k}"]["mean"] - base[seed][f"site-{k}"]["mean"] for k in range(3)]
            paired.setdefault(mode, []).append([*diffs, sum(diffs) / 3])
    if not paired:
        return
    print("\nheld-out Dice minus none's on the same seed: the mean over the seeds [lowest, highest]")
    columns = [f"site-{k}" for k in range(3)] + ["mean over the sites"]
    print(f"{'compression':<13}{'seeds':>6}" + "".join(f"{c:>29}" for c in columns))
    for mode, per_seed in paired.items():
        cells = []
        for k in range(len(columns)):
            values = [diffs[k] for diffs in per_seed]
            cells.append(f"{sum(values) / len(values):+.4f} [{min(values):+.4f}, {max(values):+.4f}]")
        print(f"{mode:<13}{len(per_seed):>6}" + "".join(f"{c:>29}" for c in cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", default=["none", "int8-block", "int4-block"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, help="server rounds (default: the demo's, 8 in 2D, 6 in 3D)")
    parser.add_argument("--3d", dest="dims", action="store_const", const=3, default=2, help="the 3D demo")
    parser.add_argument("--workdir", type=Path, default=Path("compression_quality"))
    args = parser.parse_args(argv)
    from flwr_nnunet.demo.data import make_demo_dataset
    from scripts.run_demo import budget_config, budget_defaults

    work = args.workdir.absolute()
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # as each simulated site trains
    budget = {**budget_defaults(args.dims), **({"rounds": args.rounds} if args.rounds else {})}
    args.rounds = budget["rounds"]
    started, rows = time.monotonic(), []
    for seed in args.seeds:
        demo = make_demo_dataset(
            work / f"demo-{args.dims}d-{seed}", num_sites=3, dims=args.dims, seed=seed, planned=False, overwrite=True
        )
        for mode in args.modes:
            name = f"{args.dims}d-{mode}-{seed}"
            overrides = {**DEMO_NETWORK, **budget_config(argparse.Namespace(**budget, seed=seed)), "compression": mode}
            done = run(demo, name, work, **overrides)
            scores = held_out(demo, done["results"], work / "pred" / f"{args.dims}d-{seed}" / mode)
            rounds = [done["history"][str(r)]["evaluate"]["aggregated"]["dice"] for r in range(1, args.rounds + 1)]
            rows.append((seed, mode, scores, rounds))
            cells = " ".join(f"{site} {s['mean']:.4f}" for site, s in scores.items())
            rounds_text = " ".join(f"{d:.3f}" for d in rounds)
            print(f"seed {seed} {mode}: held-out {cells}; per round {rounds_text}; {done['seconds']:.0f} s", flush=True)
    print(f"\n{args.dims}D demo, {args.rounds} rounds: held-out mean Dice per site (organ and lesion averaged)")
    print(f"{'seed':<6}{'compression':<13}{'site-0':>8}{'site-1':>8}{'site-2':>8}{'mean':>8}")
    for seed, mode, scores, _ in rows:
        cells = [scores[f"site-{k}"]["mean"] for k in range(3)]
        print(f"{seed:<6}{mode:<13}" + "".join(f"{c:>8.4f}" for c in cells) + f"{sum(cells) / 3:>8.4f}")
    print("\naggregated validation Dice per round (flwr_history.json)")
    print(f"{'seed':<6}{'compression':<13}" + "".join(f"{r:>7}" for r in range(1, args.rounds + 1)))
    for seed, mode, _, rounds in rows:
        print(f"{seed:<6}{mode:<13}" + "".join(f"{d:>7.3f}" for d in rounds))
    print_against_none(rows)
    print(f"total wall time: {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
