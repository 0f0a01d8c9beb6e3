"""The README's main job: synthetic multi-site data, `flwr run .`, then per-site Dice federated vs local-only.

Steps (everything lands under ``--workdir``, default ``demo_data/``, which git ignores):

0. check what the run needs before anything is deleted: the work folder is writable, ``flwr`` and
   ``nnUNetv2_predict`` are installed, no SuperLink started for this work folder is still running,
   and two free local ports for this run's own SuperLink;
1. make the synthetic multi-site dataset (``<workdir>/data``): each site's raw data and split, nothing planned;
2. ``flwr run .`` (simulation, one SuperNode per site; runtime dependency installation disabled,
   ``FLWR_HOME=<workdir>/flwr-home``, the local SuperLink on this run's own ports): its planning phase
   plans from the sites' statistics and every site preprocesses, then the rounds; read the run's
   status from the SuperLink (``flwr ls --format=json``), then stop that SuperLink by its PID; a run
   that did not finish ``completed`` ends the script with exit status 1;
3. train each site alone for the same number of epochs on the plans and preprocessed cases the run left
   (``<workdir>/data/site-K/nnUNet_results_local``);
4. predict every site's held-out cases with ``nnUNetv2_predict`` on the global model and on every site's
   own model, and print per site: Dice of the federated model and of the site's local-only model on the
   site's test cases, and of the local-only model on the other sites' test cases.

Usage: ``python scripts/run_demo.py [--rounds 8] [--local-epochs 1] [--iterations 40] [--val-iterations 5]
[--sites 3] [--3d] [--seed 0] [--workdir demo_data]`` (with ``--3d`` the budget defaults come from
``configs/demo-3d.toml``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: Flower's own dependency
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DEMO_3D_CONFIG = REPO / "configs" / "demo-3d.toml"
BUDGET_2D = {"rounds": 8, "local_epochs": 1, "iterations": 40, "val_iterations": 5}
_BUDGET_KEYS = {
    "rounds": "num-server-rounds",
    "local_epochs": "local-epochs",
    "iterations": "iterations-per-epoch",
    "val_iterations": "val-iterations-per-epoch",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def local_superlink_environment(flwr_home: Path, http_port: int, control_port: int) -> dict[str, str]:
    """The environment of `flwr` commands that use this run's own local SuperLink (and no installs)."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }


def superlink_pids(flwr_home: Path, port: int | None = None) -> list[int]:
    """PIDs of the local SuperLinks `flwr run` started for ``flwr_home`` (and ``--port port`` when given).

    They are found by their own arguments (``--log-file <flwr_home>/local-superlink/...``), never by
    a broad pattern, and only among this user's processes.
    """
    marker = str(flwr_home / "local-superlink") + os.sep
    listing = subprocess.run(  # -ww: never cut the arguments at the terminal's (or $COLUMNS') width
        ["ps", "-ww", "-o", "pid=,args=", "-u", str(os.getuid())], capture_output=True, text=True, check=True
    ).stdout
    pids = []
    for line in listing.splitlines():
        pid, _, arguments = line.strip().partition(" ")
        if "flower-superlink" not in arguments or marker not in arguments:
            continue
        if port is not None and f" --port {port} " not in f" {arguments} ":
            continue
        pids.append(int(pid))
    return pids


def stop_superlink(flwr_home: Path, port: int, timeout: float = 15.0) -> list[int]:
    """Stop (SIGTERM, then SIGKILL) the local SuperLink of ``flwr_home`` on ``port``; return the PIDs stopped."""
    pids = superlink_pids(flwr_home, port)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and set(pids) & set(superlink_pids(flwr_home, port)):
        time.sleep(0.2)
    for pid in set(pids) & set(superlink_pids(flwr_home, port)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def run_status(environment: dict[str, str], run_id: str) -> str:
    """The run's status as the SuperLink reports it (``finished:completed``, ``finished:failed``, ...)."""
    flwr = shutil.which("flwr", path=environment["PATH"]) or "flwr"
    done = subprocess.run(
        [flwr, "ls", "--run-id", run_id, "--format=json"], env=environment, capture_output=True, text=True, check=False
    )
    try:
        runs = json.loads(done.stdout)["runs"]
    except (json.JSONDecodeError, KeyError):
        return f"unknown (`flwr ls` answered: {(done.stdout + done.stderr).strip()[-300:]})"
    return next((run["status"] for run in runs if run["run-id"] == run_id), "unknown (run not listed)")


def budget_defaults(dims: int) -> dict[str, int]:
    """The demo's default budget: the 2D one, or for ``--3d`` what ``configs/demo-3d.toml`` sets."""
    if dims == 2:
        return dict(BUDGET_2D)
    config = tomllib.loads(DEMO_3D_CONFIG.read_text())
    return {name: int(config.get(key, BUDGET_2D[name])) for name, key in _BUDGET_KEYS.items()}


def preflight(workdir: Path, args: argparse.Namespace) -> list[str]:
    """Everything the demo needs, checked before anything is deleted; one problem (and its fix) per line."""
    problems = []
    if not 2 <= args.sites <= 3:
        problems.append(f"--sites must be 2 or 3, got {args.sites}")
    for name in ("rounds", "local_epochs", "iterations", "val_iterations"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir):
            pass
    except OSError as error:
        problems.append(f"cannot write into --workdir {workdir} ({error.strerror}): pick a writable folder")
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    for command in ("flwr", "flower-superlink", "nnUNetv2_predict"):
        if shutil.which(command, path=path) is None:
            problems.append(f"`{command}` not found: install the project (pip install -c constraints.txt -e .)")
    if workdir.is_relative_to(REPO) and not _git_ignored(workdir):
        problems.append(
            f"--workdir {workdir} is inside the app and not git-ignored: `flwr run` would package it with the app; "
            "use a folder outside the repository, or one .gitignore lists (demo_data/, crossval_data/, loso_data/)"
        )
    flwr_home = workdir / "flwr-home"
    running = superlink_pids(flwr_home)
    if running:
        pids = " ".join(map(str, running))
        problems.append(
            f"a SuperLink started for {flwr_home} is still running (PID {pids}), probably left by an earlier "
            f"demo that was interrupted; stop it with `kill {pids}` (or use another --workdir)"
        )
    return problems


def _git_ignored(path: Path) -> bool:
    """Whether git ignores ``path`` in this repository (True where git cannot tell: no git, no repository)."""
    try:
        done = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", str(path)], check=False)
    except OSError:
        return True
    return done.returncode != 1


def run_federation(demo, workdir: Path, args: argparse.Namespace, ports: tuple[int, int]) -> str:
    """`flwr run .` on the demo on this run's own local SuperLink; return the run's final status."""
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
    return stream_flwr_run(run_config, len(demo.sites), workdir / "flwr-home", ports)


def stream_flwr_run(run_config: str, num_sites: int, flwr_home: Path, ports: tuple[int, int]) -> str:
    """`flwr run .` with ``run_config`` on a local SuperLink of its own (``flwr_home``, ``ports``), its log streamed;
    return the run's final status. The SuperLink is stopped by its PID afterwards whatever happens."""
    environment = local_superlink_environment(flwr_home, *ports)
    command = [
        shutil.which("flwr", path=environment["PATH"]) or "flwr",
        "run",
        str(REPO),
        "--stream",
        "--run-config",
        run_config,
        "--federation-config",
        f"num-supernodes={num_sites} client-resources-num-cpus=1",
    ]
    print(f"$ FLWR_HOME={flwr_home} FLWR_LOCAL_SUPERLINK_HTTP_API_PORT={ports[0]} ...", " ".join(command), flush=True)
    run_id = None
    try:
        with subprocess.Popen(
            command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as process:
            for line in process.stdout:
                print(line, end="", flush=True)
                started = re.search(r"Successfully started run (\d+)", line)
                run_id = run_id or (started.group(1) if started else None)
        if run_id is None:
            return f"not started (`flwr run` exited with status {process.returncode})"
        return run_status(environment, run_id)
    finally:
        stopped = stop_superlink(flwr_home, ports[0])
        print(f"stopped the local SuperLink (PID {', '.join(map(str, stopped)) or 'none found'})", flush=True)


def _row(name: str, own: dict[str, float], local: dict[str, float], others: float) -> str:
    cells = [own[k] for k in ("organ", "lesion", "mean")] + [local[k] for k in ("organ", "lesion", "mean")]
    return f"{name:<8}" + "".join(f"{value:>8.3f}" for value in cells) + f"{others:>14.3f}"


def flwr_run_with(config: dict, num_sites: int, flwr_home: Path) -> str:
    """`flwr run .` with ``config`` (run-config keys and values) on a local SuperLink of its own (two free ports,
    stopped by its PID afterwards); the run's final status."""
    ports = (free_port(), free_port())
    while ports[1] == ports[0]:
        ports = (ports[0], free_port())
    run_config = " ".join(f"{key}={json.dumps(value)}" for key, value in config.items())
    return stream_flwr_run(run_config, num_sites, flwr_home, ports)


def budget_config(args: argparse.Namespace) -> dict:
    """The budget options and the seed as run-config keys."""
    names = {**_BUDGET_KEYS, "seed": "seed"}
    return {key: getattr(args, name) for name, key in names.items()}


def script_parser(description: str, workdir: str, *, per: str = "") -> argparse.ArgumentParser:
    """A demo script's command line: ``--workdir`` (default ``<repo>/<workdir>``), ``--3d``, ``--seed`` and the
    budget options (:func:`add_budget_arguments`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workdir", type=Path, default=REPO / workdir, help="where everything is written")
    parser.add_argument("--3d", dest="dims", action="store_const", const=3, default=2, help="the 3D demo")
    parser.add_argument("--seed", type=int, default=0, help="seed of the demo data, the initial model, the rounds")
    add_budget_arguments(parser, per)
    return parser


def demo_data_config(demo, num_sites: int) -> dict:
    """Run config for a run on demo data a script made (``make-demo=false``): the demo's dataset, every site
    required, and the demo's network widths (what ``make-demo=true`` plans with), every configuration planned."""
    from flwr_nnunet.demo.data import DEMO_PLANNING

    return {
        "make-demo": False,
        "dataset": demo.dataset_name,
        "min-available-nodes": num_sites,
        "min-train-nodes": num_sites,
        "min-evaluate-nodes": num_sites,
        "plans-max-features": DEMO_PLANNING.max_features,
        "plans-width-divisor": DEMO_PLANNING.width_divisor,
    }


def add_budget_arguments(parser: argparse.ArgumentParser, per: str = "") -> None:
    """``--rounds --local-epochs --iterations --val-iterations`` (``per``: e.g. ``" per fold"``), None when left out."""
    parser.add_argument("--rounds", type=int, help=f"federated rounds{per} (2D: 8)")
    parser.add_argument("--local-epochs", type=int, help="nnU-Net epochs per round (2D: 1)")
    parser.add_argument("--iterations", type=int, help="training batches per epoch (2D: 40)")
    parser.add_argument("--val-iterations", type=int, help="pseudo-Dice batches per epoch (2D: 5)")


def with_budget_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the budget options left out set to the 2D defaults, or configs/demo-3d.toml's with ``--3d``."""
    for name, value in budget_defaults(args.dims).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; budget options left out take the 2D defaults, or configs/demo-3d.toml's with --3d."""
    parser = script_parser(__doc__.splitlines()[0], "demo_data")
    parser.add_argument("--sites", type=int, default=3, help="number of sites (2 or 3)")
    return with_budget_defaults(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """Run the demo end to end and print per-site Dice, federated vs local-only; return the exit status."""
    args = parse_args(argv)
    started = time.monotonic()
    workdir = args.workdir.absolute()
    problems = preflight(workdir, args)
    if problems:
        for problem in problems:
            print(f"run_demo.py: {problem}", file=sys.stderr)
        return 2
    ports = (free_port(), free_port())
    while ports[1] == ports[0]:
        ports = (ports[0], free_port())

    import torch
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

    from flwr_nnunet.demo.data import DemoSite, make_demo_dataset
    from flwr_nnunet.demo.heldout import dice_scores, gather_test_images, predict, train_local_only

    results = workdir / "data" / "server" / "nnUNet_results"
    for stale in (results, workdir / "predictions"):
        if stale.exists():
            shutil.rmtree(stale)  # a fresh global model and fresh predictions each time (the data are reused)
    demo = make_demo_dataset(
        workdir / "data", num_sites=args.sites, dims=args.dims, seed=args.seed, overwrite=True, planned=False
    )
    print(f"demo raw data: {demo.root} ({time.monotonic() - started:.0f} s)", flush=True)

    status = run_federation(demo, workdir, args, ports)
    if status != "finished:completed":
        print(f"run_demo.py: the federated run did not complete (status {status}); see its log above", file=sys.stderr)
        return 1
    print(f"federated run done, planning included ({time.monotonic() - started:.0f} s)", flush=True)

    epochs = args.rounds * args.local_epochs
    # one thread, as each simulated site trains (Ray gives it one CPU): on a busy 2-core machine two threads
    # made a 3D local-only epoch 25x slower (142 s against 5.5 s)
    torch.set_num_threads(1)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
