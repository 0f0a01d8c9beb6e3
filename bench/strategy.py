"""Strategy-level benchmark: NnUNetFedAvg.aggregate_train vs Flower's FedAvg.aggregate_train.

Both strategies get N reply ``Message``s built as the SuperLink delivers them,
for the 3d_fullres PlainConvUNet nnU-Net plans:

- flower: stock replies, ``ArrayRecord(state_dict)`` with every key (what a
  plain Flower ClientApp sends), aggregated by ``flwr.serverapp.strategy.FedAvg``;
- nnunet: canonical replies (``to_array_record``), aggregated by
  ``NnUNetFedAvg`` (validation included) into the network's parameters in place;
- floor: the same canonical replies decoded and every byte read once (a sum):
  the memory-bandwidth floor of any aggregation of them.

Each variant runs in its own process; its peak extra memory is VmHWM during
``aggregate_train`` (reset with ``/proc/self/clear_refs``) minus the RSS before it.
Prints a markdown table. Run: ``python bench/strategy.py`` (about 1 minute, ~6 GB).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from aggregate import client_update, peak_rss_bytes, read_once, reset_peak_rss, rss_bytes
from flwr.app import ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.serverapp.strategy import FedAvg

from flwr_nnunet import AliasMap, NnUNetFedAvg, to_array_record
from flwr_nnunet.nnunet.networks import STOCK_ARCHITECTURES, build_network

NETWORK = "3d_fullres PlainConvUNet"
VARIANTS = ("flower", "nnunet", "floor")


def reply(node: int, arrays: ArrayRecord, num_examples: int) -> Message:
    """A training reply as the ServerApp receives it from ``node``."""
    metadata = Metadata(
        run_id=1,
        message_id=f"reply-{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id=f"instruction-{node}",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=MessageType.TRAIN,
    )
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": num_examples})})
    return make_message(metadata, content=content)


def read_floor(server_round: int, replies: list[Message]) -> tuple[None, None]:
    """The floor: decode every canonical reply and read each byte once, nothing written."""
    read_once([message.content["arrays"] for message in replies])
    return None, None


def worker(variant: str, clients: int, repeats: int, threads: int, device: str) -> dict:
    """Build the replies, then time ``aggregate_train`` ``repeats`` times; memory of the first call."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    network = build_network(STOCK_ARCHITECTURES[NETWORK])
    amap = AliasMap.from_module(network)
    canonical = amap.collapse(network.state_dict())
    unique = sum(t.numel() * t.element_size() for t in canonical.values())
    replies = []
    for client in range(clients):
        update = client_update(canonical, client)
        if variant == "flower":
            arrays = ArrayRecord(amap.expand(update))  # stock: every key, copied separately
        else:
            arrays = to_array_record(update)
        replies.append(reply(client + 1, arrays, 10 + client))
    held = None  # the global record start() holds while it aggregates: the previous round's result
    if variant == "flower":
        aggregate = FedAvg().aggregate_train
    elif variant == "nnunet":
        strategy = NnUNetFedAvg(network.to(device))
        held = strategy.model.record()  # what configure_train sent in round 1
        aggregate = strategy.aggregate_train
    else:
        aggregate = read_floor
    payload = sum(len(a.data) for a in replies[0].content["arrays"].values())
    seconds = []
    for repeat in range(repeats):
        before = rss_bytes()
        reset_peak_rss()
        start = time.perf_counter()
        arrays, _ = aggregate(1, replies)
        seconds.append(time.perf_counter() - start)
        if repeat == 0:
            extra = peak_rss_bytes() - before
        held = arrays  # as start(): the result becomes the global record, the previous one is released
    del held
    return {"seconds": statistics.median(seconds), "extra": extra, "unique": unique, "payload": payload}


def measure(variant: str, clients: int, repeats: int, threads: int, device: str) -> dict:
    """Run :func:`worker` in a fresh interpreter and return its result."""
    command = [sys.executable, __file__, "--worker", variant, "--clients", str(clients)]
    command += ["--repeats", str(repeats), "--threads", str(threads), "--device", device]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{variant} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's own setting)"
    )
    parser.add_argument("--device", default="cpu", help="where NnUNetFedAvg's global network lives (cpu, cuda)")
    parser.add_argument("--worker", choices=["flower", "nnunet", "floor"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.clients, args.repeats, args.threads, args.device)))
        return
    flower, ours, floor = (measure(v, args.clients, args.repeats, args.threads, args.device) for v in VARIANTS)
    mb = 1e6
    print(
        f"{NETWORK}, N = {args.clients} reply Messages, {args.threads} torch thread(s), "
        f"NnUNetFedAvg's network on {args.device}, median of {args.repeats}\n"
    )
    print("| aggregate_train | payload per reply | wall time | speed-up | peak extra memory | / unique model bytes |")
    print("|---|---|---|---|---|---|")
    rows = (
        ("Flower FedAvg, stock full-key replies", flower),
        ("NnUNetFedAvg, canonical replies", ours),
        ("floor: decode + read every received byte once", floor),
    )
    for name, row in rows:
        print(
            f"| {name} | {row['payload'] / mb:.1f} MB | {row['seconds']:.3f} s | "
            f"{flower['seconds'] / row['seconds']:.1f}x | {row['extra'] / mb:.1f} MB | {row['extra'] / row['unique']:.2f}x |"
        )
    print(f"\nunique model bytes: {ours['unique'] / mb:.1f} MB")


if __name__ == "__main__":
    main()
