"""The ``flwr-nnunet`` command: inspect and repair nnU-Net checkpoints, make the demo dataset, serve a warm site.

Exit status: 0 success; 1 a repair refused (aliases disagree, the network does
not match); 2 bad usage or an unreadable or non-nnU-Net file. Errors are one
line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flwr_nnunet.apps.clientapp_exec import DEFAULT_POLL_INTERVAL_S
from flwr_nnunet.apps.clientapp_exec import serve as serve_clientapps
from flwr_nnunet.nnunet.checkpoint_io import CheckpointError, RepairRefused
from flwr_nnunet.repair.inspection import InspectReport, inspect_checkpoint
from flwr_nnunet.repair.network_source import NetworkHints
from flwr_nnunet.repair.repair import RepairReport, repair_checkpoint
from flwr_nnunet.site.warm_worker import DEFAULT_IDLE_TIMEOUT_S

__all__ = ["main"]

EXIT_OK, EXIT_REFUSED, EXIT_ERROR = 0, 1, 2


def _add_checkpoint_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    group = parser.add_argument_group(
        "network", "where the alias groups come from (default: the checkpoint's init_args, else the model folder)"
    )
    group.add_argument("--plans", metavar="PLANS_JSON", help="nnU-Net plans file the checkpoint was trained with")
    group.add_argument("--dataset-json", metavar="DATASET_JSON", help="the dataset.json that goes with the plans")
    group.add_argument("--configuration", metavar="NAME", help="plans configuration, e.g. 2d or 3d_fullres")
    group.add_argument("--trainer", metavar="CLASS", help="nnU-Net trainer class that built the network")
    group.add_argument(
        "--atol",
        type=float,
        default=0.0,
        metavar="TOL",
        help="aliases within this absolute difference agree (default 0)",
    )


def _model_options(args: argparse.Namespace) -> dict:
    hints = NetworkHints(args.plans, args.dataset_json, args.configuration, args.trainer)
    return {"hints": hints, "atol": args.atol}


def _print_report(report: InspectReport | RepairReport, as_json: bool) -> None:
    print(json.dumps(report.to_dict(), indent=2) if as_json else report.format())


def run_inspect(args: argparse.Namespace) -> int:
    """``flwr-nnunet inspect CHECKPOINT``."""
    _print_report(inspect_checkpoint(args.checkpoint, **_model_options(args)), args.json)
    return EXIT_OK


def run_repair(args: argparse.Namespace) -> int:
    """``flwr-nnunet repair IN OUT``."""
    report = repair_checkpoint(
        args.source,
        args.destination,
        prefer=args.prefer,
        overwrite=args.force,
        write_healthy=args.force,
        **_model_options(args),
    )
    _print_report(report, args.json)
    return EXIT_OK


def run_demo(args: argparse.Namespace) -> int:
    """``flwr-nnunet demo ROOT``."""
    from flwr_nnunet.demo.data import make_demo_dataset

    demo = make_demo_dataset(args.root, num_sites=args.sites, dims=args.dims, seed=args.seed, overwrite=args.overwrite)
    print(f"{demo.dataset_name}, configuration {demo.configuration}, shared plans {demo.plans_file}")
    for site in (demo.server, *demo.sites):
        cases = (
            f"{len(site.training_cases)} training / {len(site.test_cases)} test cases"
            if site.training_cases
            else "plans"
        )
        print(f"{site.name} ({cases}): " + " ".join(f"{k}={v}" for k, v in site.environ().items()))
    return EXIT_OK


def run_warm_site(args: argparse.Namespace) -> int:
    """``flwr-nnunet warm-site --results DIR [--parent PID] [--idle-timeout S]``."""
    from flwr_nnunet.apps.client import answer_forwarded
    from flwr_nnunet.site.warm_worker import serve

    serve(args.results, args.parent, answer_forwarded, args.idle_timeout)
    return EXIT_OK


def run_clientapp_exec(args: argparse.Namespace) -> int:
    """``flwr-nnunet clientapp-exec [--runtime-api-address HOST:PORT] [--parent PID]``."""
    serve_clientapps(
        args.runtime_api_address, args.parent, root_certificates=args.root_certificates, poll_interval=args.poll
    )
    return EXIT_OK


def _command(commands: Any, handler: Callable[[argparse.Namespace], int], summary: str, description: str):
    """A subcommand named after its handler (``run_NAME``, ``_`` written ``-``)."""
    name = handler.__name__.removeprefix("run_").replace("_", "-")
    parser = commands.add_parser(name, help=summary, description=description)
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``flwr-nnunet`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="flwr-nnunet",
        description="Inspect and repair nnU-Net checkpoints bloated by per-key arithmetic; make the demo dataset.",
        epilog="exit status: 0 success, 1 repair refused (aliases disagree, network does not match), "
        "2 bad usage or an unreadable or non-nnU-Net file",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = _command(
        commands,
        run_inspect,
        "report alias groups, unique bytes, bloat and disagreeing aliases of a checkpoint",
        "Report keys, alias groups, unique tensors and bytes, file size, bloat factor, groups that lost their "
        "shared storage and groups whose aliases disagree. Works on nnU-Net trainer checkpoints, flwr-nnunet "
        "global checkpoints and plain state_dicts.",
    )
    inspect.add_argument("checkpoint", help="checkpoint_final.pth, checkpoint_best.pth or a state_dict file")
    _add_checkpoint_options(inspect)

    repair = _command(
        commands,
        run_repair,
        "write a copy whose aliases share storage again",
        "Rebuild the sharing of IN's alias groups from the network nnU-Net builds from its plans, check that "
        "every group's keys agree, and write OUT atomically with every key and every non-weight entry of IN. "
        "IN is never modified.",
    )
    repair.add_argument("source", metavar="IN", help="the checkpoint to repair")
    repair.add_argument("destination", metavar="OUT", help="where to write the repaired checkpoint")
    repair.add_argument(
        "--prefer",
        action="append",
        default=[],
        metavar="RULE",
        help="which key wins when a group's aliases disagree: 'first', 'last' (what nnU-Net's load_state_dict "
        "keeps) or a glob pattern such as 'encoder.*'; repeatable, tried in order",
    )
    repair.add_argument(
        "--force",
        action="store_true",
        help="replace OUT if it exists, and write OUT even when IN needs no repair (by default a healthy IN "
        "is reported as such and nothing is written)",
    )
    _add_checkpoint_options(repair)

    demo = _command(
        commands,
        run_demo,
        "make the synthetic multi-site nnU-Net dataset",
        "Write the synthetic multi-site segmentation dataset, plan it once for all sites and preprocess every "
        "site (a few seconds, no download).",
    )
    demo.add_argument("root", help="folder to write the demo into")
    demo.add_argument("--sites", type=int, default=3, help="number of sites, 2 or 3 (default 3)")
    demo.add_argument("--3d", dest="dims", action="store_const", const=3, default=2, help="small 3D volumes")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic images (default 0)")
    demo.add_argument("--overwrite", action="store_true", help="replace a demo made with other parameters")

    warm = _command(
        commands,
        run_warm_site,
        "keep a deployed site's trainer across a run's rounds (configs/deployment/supernode.sh starts it)",
        "Serve the ClientApps of the site whose results folder is DIR over a Unix socket there (mode 0600, with "
        "a 0600 token), keeping one nnU-Net trainer per run; exit when the SuperNode PID is gone or after S idle "
        "seconds.",
    )
    warm.add_argument("--results", type=Path, required=True, help="the site's node-config 'nnunet-results'")
    warm.add_argument("--parent", type=int, default=os.getppid(), help="exit when this process (the SuperNode) does")
    warm.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT_S, help="exit after S idle seconds")

    execs = _command(
        commands,
        run_clientapp_exec,
        "start a deployed site's ClientApps as forks of one process that imported Flower once "
        "(configs/deployment/supernode.sh starts it)",
        "Claim the SuperNode's ClientApp tasks on its Runtime API and run each in a child forked from this "
        "process, which has already imported Flower, instead of a fresh flwr-clientapp process; the SuperNode's "
        "own SuperExec runs any task not claimed here. Exit when the SuperNode PID is gone.",
    )
    execs.add_argument(
        "--runtime-api-address", default="127.0.0.1:9094", help="the SuperNode's Runtime API (its --host:--port)"
    )
    execs.add_argument("--root-certificates", help="CA certificate of a Runtime API served with TLS")
    execs.add_argument("--parent", type=int, default=os.getppid(), help="exit when this process (the SuperNode) does")
    execs.add_argument("--poll", type=float, default=DEFAULT_POLL_INTERVAL_S, help="seconds between two claims")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``flwr-nnunet``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except BrokenPipeError:  # the reader (e.g. `| head`) went away: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except RepairRefused as error:
        print(f"flwr-nnunet {args.command}: refused: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except (CheckpointError, OSError, ValueError) as error:
        print(f"flwr-nnunet {args.command}: error: {error}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
