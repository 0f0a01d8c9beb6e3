"""The README's main job: synthetic multi-site data, `flwr run .`, then per-site Dice federated vs local-only.

Steps (everything lands under ``--workdir``, default ``demo_data/``, which git ignores):

1. make the synthetic multi-site dataset (``<workdir>/data``), planned once for all sites;
2. ``flwr run .`` (simulation, one SuperNode per site; runtime dependency installation disabled,
   ``FLWR_HOME=<workdir>/flwr-home``), then stop the local SuperLink it started, by its PID;
3. train each site alone for the same number of epochs (``<workdir>/data/site-K/nnUNet_results_local``);
4. predict every site's held-out cases with ``nnUNetv2_predict`` on the global model and on every site's
   own model, and print per site: Dice of the federated model and of the site's local-only model on the
   site's test cases, and of the local-only model on the other sites' test cases.

Usage: ``python scripts/run_demo.py [--rounds 8] [--local-epochs 1] [--iterations 40] [--sites 3] [--3d]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

from flwr_nnunet.demo.data import DemoDataset, DemoSite, make_demo_dataset
from flwr_nnunet.demo.heldout import dice_scores, gather_test_images, predict, train_local_only

REPO = Path(__file__).resolve().parents[1]
LOCAL_SUPERLINK_PORT = 39091


def _port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of the local SuperLink that `flwr run` started for this ``FLWR_HOME`` (found by its own arguments)."""
    marker = str(flwr_home / "local-superlink") + os.sep
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    pids = []
    for line in listing.splitlines():
        pid, _, arguments = line.strip().partition(" ")
        if "flower-superlink" in arguments and marker in arguments:
            pids.append(int(pid))
    return pids


def stop_superlink(flwr_home: Path, timeout: float = 15.0) -> list[int]:
    """Stop (SIGTERM, then SIGKILL) the local SuperLink started for ``flwr_home``; return the PIDs stopped."""
    pids = superlink_pids(flwr_home)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid in superlink_pids(flwr_home) for pid in pids):
        time.sleep(0.2)
    for pid in superlink_pids(flwr_home):
        os.kill(pid, signal.SIGKILL)
    return pids


def run_federation(demo: DemoDataset, workdir: Path, args: argparse.Namespace) -> None:
    """`flwr run .` on the demo; the local SuperLink is stopped afterwards whatever happens."""
    if _port_in_use(LOCAL_SUPERLINK_PORT):
        raise SystemExit(
            f"a SuperLink already listens on 127.0.0.1:{LOCAL_SUPERLINK_PORT}; `flwr run .` would submit the demo to "
            "it. Stop it first (it was not started by this script)."
        )
    flwr_home = workdir / "flwr-home"
    bin_dir = str(Path(sys.executable).parent)
    environment = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }
    run_config = " ".join(
        [
            f"data-root='{demo.root}'",
            f"num-server-rounds={args.rounds}",
            f"local-epochs={args.local_epochs}",
            f"iterations-per-epoch={args.iterations}",
            f"val-iterations-per-epoch={args.val_iterations}",
            f"demo-sites={len(demo.sites)}",
            f"demo-3d={'true' if demo.configuration != '2d' else 'false'}",
            f"configuration='{demo.configuration}'",
            f"seed={args.seed}",
        ]
    )
    command = [
        shutil.which("flwr", path=environment["PATH"]) or "flwr",
        "run",
        str(REPO),
        "--stream",
        "--run-config",
        run_config,
        "--federation-config",
        f"num-supernodes={len(demo.sites)} client-resources-num-cpus=1",
    ]
    print("$", " ".join(command), flush=True)
    try:
        subprocess.run(command, env=environment, check=True)
    finally:
        stopped = stop_superlink(flwr_home)
        print(f"stopped the local SuperLink (PID {', '.join(map(str, stopped)) or 'none found'})", flush=True)


def _row(name: str, own: dict[str, float], local: dict[str, float], others: float) -> str:
    cells = [own[k] for k in ("organ", "lesion", "mean")] + [local[k] for k in ("organ", "lesion", "mean")]
    return f"{name:<8}" + "".join(f"{value:>8.3f}" for value in cells) + f"{others:>14.3f}"


def main() -> None:
    """Run the demo end to end and print per-site Dice, federated vs local-only."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "demo_data", help="where everything is written")
    parser.add_argument("--rounds", type=int, default=8, help="federated rounds")
    parser.add_argument("--local-epochs", type=int, default=1, help="nnU-Net epochs per round")
    parser.add_argument("--iterations", type=int, default=40, help="training batches per epoch")
    parser.add_argument("--val-iterations", type=int, default=5, help="pseudo-Dice batches per epoch")
    parser.add_argument("--sites", type=int, default=3, help="number of sites (2 or 3)")
    parser.add_argument("--3d", dest="dims", action="store_const", const=3, default=2, help="small 3D volumes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the initial model and the rounds")
    args = parser.parse_args()
    started = time.monotonic()
    workdir = args.workdir.absolute()
    results = workdir / "data" / "server" / "nnUNet_results"
    for stale in (results, workdir / "predictions"):
        if stale.exists():
            shutil.rmtree(stale)  # a fresh global model and fresh predictions each time (the data are reused)
    demo = make_demo_dataset(workdir / "data", num_sites=args.sites, dims=args.dims, seed=args.seed, overwrite=True)
    print(f"demo data: {demo.root} ({time.monotonic() - started:.0f} s)", flush=True)

    run_federation(demo, workdir, args)
    print(f"federated run done ({time.monotonic() - started:.0f} s)", flush=True)

    epochs = args.rounds * args.local_epochs
    images = gather_test_images(demo, workdir / "predictions" / "test_images")
    federated = predict(demo, results, images, workdir / "predictions" / "federated", fold="all")
    local = {}
    for site in demo.sites:
        local_results = site.nnunet_results.parent / "nnUNet_results_local"
        if local_results.exists():
            shutil.rmtree(local_results)
        with open(workdir / f"local_only_{site.name}.log", "w") as log, contextlib.redirect_stdout(log):
            train_local_only(
                demo,
                site,
                local_results,
                epochs=epochs,
                iterations_per_epoch=args.iterations,
                val_iterations_per_epoch=args.val_iterations,
                seed=args.seed,
            )
        local[site.name] = predict(
            demo, local_results, images, workdir / "predictions" / f"local_{site.name}", fold="0"
        )

    def dice(predictions: Path, site: DemoSite) -> dict[str, float]:
        return dice_scores(predictions, site.labels_ts, site.test_cases, demo.file_ending)

    print(
        f"\nDice on held-out test cases ({len(demo.sites[0].test_cases)} per site; {epochs} epochs x "
        f"{args.iterations} iterations for every model)"
    )
    print(f"{'':8}{'federated model':>24}{'local-only model':>24}{'local-only on':>14}")
    print(f"{'site':<8}" + f"{'organ':>8}{'lesion':>8}{'mean':>8}" * 2 + f"{'other sites':>14}")
    for site in demo.sites:
        others = [dice(local[site.name], other)["mean"] for other in demo.sites if other is not site]
        print(_row(site.name, dice(federated, site), dice(local[site.name], site), sum(others) / len(others)))
    model = (
        results
        / demo.dataset_name
        / convert_trainer_plans_config_to_identifier("nnUNetTrainer", demo.plans_name, demo.configuration)
    )
    print(f"\nglobal model: {model}\ntotal wall time: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
