"""Streaming-round benchmark: one training round through ``start()`` for Flower stock, the batch path, streaming.

Each row is one round of N simulated sites, run in its own process:

- stock: ``flwr.serverapp.strategy.FedAvg.start`` on full-key replies (``ArrayRecord(state_dict)``, what a plain
  Flower ClientApp sends), all N held by the grid's ``send_and_receive``; the round's checkpoint is written
  by ``evaluate_fn`` (``torch.save`` of the result, fsync, rename), since stock Flower writes none;
- batch: ``NnUNetFedAvg.start`` (today's path): ``send_and_receive`` returns the N canonical replies, then
  ``aggregate_train`` reduces them into the network in place and ``checkpoint_latest.pth`` is written;
- stream: ``NnUNetFedAvg.start(..., streaming=True)``: the grid makes each reply only when it is pulled (one per
  pull, as replies trickle in), so the benchmark itself never holds more than the reply in flight;
- stream-fixed: the same in a process whose glibc mmap threshold is fixed (``MALLOC_MMAP_THRESHOLD_``);
- dp-batch, dp-stream (``--plan dp``): batch and streaming rounds of ``NnUNetDPServerSideFixedClipping``.

Peak extra memory is VmHWM during ``start()`` (reset with ``/proc/self/clear_refs``) minus the RSS before it
(the network and the record sent this round are already there), in units of the model's unique bytes. Each
process first runs the same round on a 31 KB network (features / 64): the first round of a process pays a
one-time ~6 MB, whatever the model (torch's first kernels and intra-op threads, the fold's thread pool, lazily
imported ``torch.save`` code); that warm-up round's own peak extra memory is reported as the one-time overhead.
Round-end latency runs from the last reply's arrival (``send_and_receive`` returning; the last pull) to
``checkpoint_latest.pth`` written (``post_round_fn``; stock: the end of ``evaluate_fn``'s write).

Run: ``python bench/streaming.py`` (about 10 minutes, up to ~7 GB in one process at a time);
``--plan quick`` for a small look; ``--plan dp`` (about a minute) for server-side fixed-clipping DP.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict

import torch
from aggregate import peak_rss_bytes, reset_peak_rss, rss_bytes
from flwr.app import ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from flwr_nnunet import AliasMap, NnUNetFedAvg, NnUNetModelFolder
from flwr_nnunet.core.codec import encode_tensor
from flwr_nnunet.nnunet.networks import STOCK_ARCHITECTURES, build_network
from flwr_nnunet.strategy.privacy import NnUNetDPServerSideFixedClipping

BASE = "3d_fullres PlainConvUNet"
NETWORKS = {"full": (BASE, 1), "quarter": (BASE, 4), "warm-up": (BASE, 64)}
"""name -> (stock architecture, divisor of its features_per_stage)."""
NETWORK_LABELS = {"full": "3d_fullres PlainConvUNet", "quarter": "3d PlainConvUNet, features / 4"}
WARM_UP_SITES = 2
PLANS = {
    "full": [("stock", 8), ("batch", 8), ("batch", 32)] + [("stream", n) for n in (8, 32, 128)] + [("stream-fixed", 8)],
    "quarter": [(v, n) for n in (8, 32, 128) for v in ("stock", "batch", "stream")] + [("stream-fixed", 128)],
}
QUICK = {"quarter": [("stock", 8), ("batch", 8), ("stream", 8), ("stream", 32), ("stream-fixed", 32)]}
DP = {"quarter": [(v, n) for n in (8, 32, 128) for v in ("dp-batch", "dp-stream")]}
STREAMING = ("stream", "stream-fixed", "dp-stream")
DP_OPTIONS = {"noise_multiplier": 0.1, "clipping_norm": 1.0}
"""Server-side fixed clipping of the dp rows (the replies' updates, 0.001 * node * the model, are clipped)."""
VARIANT_LABELS = {
    "stock": "Flower FedAvg.start, stock replies",
    "batch": "NnUNetFedAvg.start, batch",
    "stream": "NnUNetFedAvg.start, streaming",
    "stream-fixed": "NnUNetFedAvg.start, streaming, MALLOC_MMAP_THRESHOLD_=131072",
    "dp-batch": "NnUNetDPServerSideFixedClipping.start, batch",
    "dp-stream": "NnUNetDPServerSideFixedClipping.start, streaming",
}
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}
"""glibc's mmap threshold held at its 128 KiB default: freed replies go back to the system at once (without it
glibc raises the threshold after the first large free and keeps later replies' freed bytes in its heap)."""


def architecture(name: str) -> dict:
    stock, divisor = NETWORKS[name]
    arch = copy.deepcopy(STOCK_ARCHITECTURES[stock])
    kwargs = arch["arch_kwargs"]
    kwargs["features_per_stage"] = [f // divisor for f in kwargs["features_per_stage"]]
    return arch


def bench_plans(arch: dict) -> dict:
    """Just enough nnU-Net plans for a model folder of this network."""
    return {
        "dataset_name": "Dataset999_Bench",
        "plans_name": "nnUNetPlans",
        "configurations": {"3d_fullres": {"architecture": arch}},
    }


DATASET_JSON = {
    "channel_names": {"0": "CT"},
    "labels": {"background": 0, "organ": 1},
    "numTraining": 1,
    "file_ending": ".nii.gz",
}


class BenchGrid(Grid):
    """N nodes; a reply is the received model scaled by a per-node factor, made when it is delivered.

    ``send_and_receive`` makes all N (the batch paths); ``pull_messages`` makes one per call (streaming).
    ``last_arrival`` is when the last training reply was handed over.
    """

    pull_interval = 0.0

    def __init__(self, clients: int, *, stock: bool, alias_map: AliasMap) -> None:
        self.nodes = list(range(1, clients + 1))
        self.stock = stock
        self.alias_map = alias_map
        self.waiting: OrderedDict[str, Message] = OrderedDict()
        self.pushed = 0
        self.last_arrival = 0.0

    def set_run(self, run) -> None:
        """Unused."""

    @property
    def run(self):
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id)

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            self.pushed += 1
            message_id = f"ins-{self.pushed}"
            message.metadata.__dict__["_message_id"] = message_id
            if message.metadata.message_type == MessageType.TRAIN:
                self.waiting[message_id] = message
            ids.append(message_id)
        return ids

    def _reply(self, message_id: str, instruction: Message) -> Message:
        node = instruction.metadata.dst_node_id
        scale = 1.0 + 0.001 * node
        arrays = OrderedDict()
        received = instruction.content["arrays"]
        groups = self.alias_map.groups
        for key in received:  # group by group: making a reply holds one group besides the reply
            value = torch.from_numpy(received[key].numpy())
            value = value * scale if value.is_floating_point() else value + node
            # stock: every key of the group, each copied separately (what ArrayRecord(state_dict) sends)
            for name in groups.get(key, (key,)) if self.stock else (key,):
                arrays[name] = encode_tensor(value)
            del value
        record = ArrayRecord(arrays)
        metadata = Metadata(
            run_id=1,
            message_id=f"reply-{message_id}",
            src_node_id=node,
            dst_node_id=0,
            reply_to_message_id=message_id,
            group_id=instruction.metadata.group_id,
            created_at=time.time(),
            ttl=3600.0,
            message_type=MessageType.TRAIN,
        )
        content = RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 10 + node})})
        return make_message(metadata, content=content)

    def pull_messages(self, message_ids):
        wanted = set(message_ids)
        for message_id in list(self.waiting):
            if message_id in wanted:
                reply = self._reply(message_id, self.waiting.pop(message_id))
                if not self.waiting:
                    self.last_arrival = time.perf_counter()
                return [reply]
        return []

    def send_and_receive(self, messages, *, timeout=None):
        ids = self.push_messages(messages)
        replies = [self._reply(i, self.waiting.pop(i)) for i in ids if i in self.waiting]
        if replies:
            self.last_arrival = time.perf_counter()
        return replies


def atomic_save(state_dict: dict, path: str) -> None:
    """torch.save to a temp file, fsync, rename: what a stock ServerApp would do for a checkpoint."""
    partial = path + ".partial"
    with open(partial, "wb") as handle:
        torch.save(state_dict, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def worker(variant: str, network_name: str, clients: int, threads: int) -> dict:
    """The round of ``network_name`` after a warm-up round of the same variant on the 31 KB network."""
    torch.set_num_threads(threads)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    warm_up = one_round(variant, "warm-up", WARM_UP_SITES)
    return {**one_round(variant, network_name, clients), "one_time": warm_up["extra"]}


def one_round(variant: str, network_name: str, clients: int) -> dict:
    torch.manual_seed(0)
    arch = architecture(network_name)
    network = build_network(arch)
    amap = AliasMap.from_module(network)
    unique = sum(t.numel() * t.element_size() for t in amap.collapse(network.state_dict()).values())
    grid = BenchGrid(clients, stock=variant == "stock", alias_map=amap)
    done: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        common = {"fraction_evaluate": 0.0, "min_available_nodes": clients, "min_train_nodes": clients}
        if variant == "stock":
            strategy = FedAvg(**common)
            initial = ArrayRecord(network.state_dict())
            checkpoint = os.path.join(tmp, "checkpoint_latest.pth")

            def evaluate_fn(server_round: int, arrays: ArrayRecord):
                if server_round:
                    atomic_save(arrays.to_torch_state_dict(), checkpoint)
                    done["ready"] = time.perf_counter()

            options = {"initial_arrays": initial, "evaluate_fn": evaluate_fn}
        else:
            folder = NnUNetModelFolder(tmp, bench_plans(arch), DATASET_JSON, None, "3d_fullres")

            def post_round(server_round: int, strategy: NnUNetFedAvg) -> None:
                done["ready"] = time.perf_counter()

            strategy = NnUNetFedAvg(network, model_folder=folder, post_round_fn=post_round, **common)
            strategy.model.record()  # the record sent this round: there before the round starts
            if variant.startswith("dp-"):
                strategy = NnUNetDPServerSideFixedClipping(strategy, num_sampled_clients=clients, **DP_OPTIONS)
            options = {"streaming": variant in STREAMING, "poll_interval": 0.0}
        before = rss_bytes()
        reset_peak_rss()
        started = time.perf_counter()
        strategy.start(grid, num_rounds=1, timeout=3600, **options)
        total = time.perf_counter() - started
        extra = peak_rss_bytes() - before
    return {
        "extra": extra,
        "unique": unique,
        "latency": done["ready"] - grid.last_arrival,
        "round": total,
    }


def measure(variant: str, network: str, clients: int, threads: int) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--network", network, "--clients", str(clients)]
    command += ["--threads", str(threads)]
    env = {**os.environ, **(FIXED_MMAP_THRESHOLD if variant == "stream-fixed" else {})}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise RuntimeError(f"{variant} {network} N={clients} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", choices=["full", "quick", "dp"], default="full")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--worker", choices=list(VARIANT_LABELS), help=argparse.SUPPRESS)
    parser.add_argument("--network", choices=list(NETWORKS), help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.network, args.clients, args.threads)))
        return
    plan = {"full": PLANS, "quick": QUICK, "dp": DP}[args.plan]
    mb = 1e6
    print(f"One training round through start(), {args.threads} torch thread(s); peak extra memory of the process")
    print(f"(load average before the run: {' '.join(f'{x:.1f}' for x in os.getloadavg())})\n")
    print(
        "| network (unique MB) | sites N | round | peak extra memory | / unique model bytes | round-end latency "
        "| one-time first-round overhead |"
    )
    print("|---|---|---|---|---|---|---|")
    for network, rows in plan.items():
        for variant, clients in rows:
            row = measure(variant, network, clients, args.threads)
            print(
                f"| {NETWORK_LABELS[network]} ({row['unique'] / mb:.1f}) | {clients} | {VARIANT_LABELS[variant]} | "
                f"{row['extra'] / mb:.0f} MB | {row['extra'] / row['unique']:.2f}x | {row['latency']:.2f} s | "
                f"{row['one_time'] / mb:.1f} MB |",
                flush=True,
            )


if __name__ == "__main__":
    main()
