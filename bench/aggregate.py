"""Aggregation benchmark: Flower's stock path vs flwr-nnunet's canonical in-place path.

Prints a markdown table. For each network and client count N, three variants run on
the same client updates, each in its own process so that its peak memory is its own:

(a) stock:  each client sends ``ArrayRecord(state_dict)`` (every key); the server runs
            Flower's ``aggregate_arrayrecords``.
(b) ours:   each client sends canonical tensors (``to_array_record``); the server decodes
            them zero-copy and runs ``weighted_mean_`` into the global network's parameters.
(c) floor:  one read pass (a sum) over the bytes (b) received, clients spread over as many
            single-threaded workers as torch has threads: the memory-bandwidth floor.

Times are the best of ``--repeats`` calls, as ``timeit`` reports them: on a shared machine
interference only ever adds time. Peak memory is the largest over the calls.

Run: ``python bench/aggregate.py`` (about 15 minutes and up to ~17 GB of RAM on 2 cores);
``--clients 2 8 --networks plain`` for a quick look.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from flwr_nnunet import AliasMap, from_array_record, to_array_record, weighted_mean_
from flwr_nnunet.nnunet.networks import STOCK_ARCHITECTURES, build_network

NETWORKS = {"plain": "3d_fullres PlainConvUNet", "resenc": "3d_fullres ResEnc M"}
MEMORY_GIB = 24


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Make VmHWM start again from the current RSS (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def read_once(records: list[ArrayRecord]) -> None:
    """Decode every record and read each byte once (a sum), records spread over single-threaded workers."""

    def read(record: ArrayRecord) -> None:
        for tensor in from_array_record(record).values():
            tensor.sum()

    workers = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(read, records))
    finally:
        torch.set_num_threads(workers)


def client_update(canonical: dict[str, torch.Tensor], client: int) -> dict[str, torch.Tensor]:
    """A deterministic, cheap-to-make update that differs per client."""
    scale = 1.0 + 0.001 * (client + 1)
    return {k: v * scale if v.is_floating_point() else v + client for k, v in canonical.items()}


def saved_bytes(state_dict: dict[str, torch.Tensor]) -> int:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.tell()


def checksum(tensors: dict[str, torch.Tensor], keys) -> float:
    return float(sum(tensors[k].double().sum().item() for k in keys))


def worker(variant: str, network: str, clients: int, repeats: int) -> dict:
    torch.manual_seed(0)
    net = build_network(STOCK_ARCHITECTURES[NETWORKS[network]])
    amap = AliasMap.from_module(net)
    targets = amap.collapse(net.state_dict())
    base = {k: v.clone() for k, v in targets.items()}
    weights = [10 + 3 * i for i in range(clients)]
    records = []
    for i in range(clients):
        update = client_update(base, i)
        arrays = ArrayRecord(dict(amap.expand(update))) if variant == "stock" else to_array_record(update)
        metrics = MetricRecord({"num-examples": weights[i]})
        records.append(RecordDict({"arrays": arrays, "metrics": metrics}))
        del update
    payload = sum(len(a.data) for a in records[0]["arrays"].values())
    del base

    def stock() -> ArrayRecord:
        return aggregate_arrayrecords(records, "num-examples")

    def ours() -> dict[str, torch.Tensor]:
        updates = [from_array_record(r["arrays"]) for r in records]
        weighted_mean_(targets, updates, [r["metrics"]["num-examples"] for r in records])
        return net.state_dict()

    def floor() -> None:
        read_once([r["arrays"] for r in records])

    run = {"stock": stock, "ours": ours, "floor": floor}[variant]
    times, peaks = [], []
    result = None
    for _ in range(repeats):
        result = None
        before = rss_bytes()
        reset_peak_rss()
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
        peaks.append(peak_rss_bytes() - before)
    report = {"seconds": min(times), "peak_extra": max(peaks), "payload": payload}
    if isinstance(result, ArrayRecord):
        result = result.to_torch_state_dict()
    if result is not None:
        report["checkpoint"] = saved_bytes(result)
        report["checksum"] = checksum(result, amap.canonical_keys)
    report["unique"] = sum(t.numel() * t.element_size() for t in targets.values())
    return report


def measure(variant: str, network: str, clients: int, repeats: int) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--networks", network, "--clients", str(clients)]
    command += ["--repeats", str(repeats)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} {network} N={clients} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def stock_fits(network: str, clients: int, unique: int) -> bool:
    """Whether N stock replies (every key) plus Flower's ~3x model working set fit in RAM."""
    bloat = {"plain": 2.84, "resenc": 3.75}[network]
    return unique * bloat * (clients + 3) < 0.8 * MEMORY_GIB * 2**30


def megabytes(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", choices=sorted(NETWORKS), default=["plain", "resenc"])
    parser.add_argument("--clients", nargs="+", type=int, default=[2, 8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", choices=["stock", "ours", "floor"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.networks[0], args.clients[0], args.repeats)))
        return

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, best of {args.repeats}\n"
    )
    print(
        "| network | N | (a) stock s | (b) ours s | (c) floor s | speed-up a/b | b/c "
        "| (a) peak extra MB | (b) peak extra MB | unique MB | (a) payload MB | (b) payload MB "
        "| naive ckpt MB | (b) ckpt MB | same result |"
    )
    print("|" + "---|" * 15)
    for network in args.networks:
        for clients in args.clients:
            ours = measure("ours", network, clients, args.repeats)
            floor = measure("floor", network, clients, args.repeats)
            unique = ours["unique"]
            if stock_fits(network, clients, unique):
                stock = measure("stock", network, clients, args.repeats)
                same = abs(stock["checksum"] - ours["checksum"]) <= 1e-5 * abs(ours["checksum"])
                cells = [
                    f"{stock['seconds']:.3f}",
                    f"{ours['seconds']:.3f}",
                    f"{floor['seconds']:.3f}",
                    f"{stock['seconds'] / ours['seconds']:.0f}x",
                    f"{ours['seconds'] / floor['seconds']:.2f}",
                    megabytes(stock["peak_extra"]),
                    megabytes(ours["peak_extra"]),
                    megabytes(unique),
                    megabytes(stock["payload"]),
                    megabytes(ours["payload"]),
                    megabytes(stock["checkpoint"]),
                    megabytes(ours["checkpoint"]),
                    "yes" if same else "NO",
                ]
            else:
                need = unique * {"plain": 2.84, "resenc": 3.75}[network] * clients
                cells = [
                    f"n/a ({need / 2**30:.0f} GiB of replies)",
                    f"{ours['seconds']:.3f}",
                    f"{floor['seconds']:.3f}",
                    "-",
                    f"{ours['seconds'] / floor['seconds']:.2f}",
                    "-",
                    megabytes(ours["peak_extra"]),
                    megabytes(unique),
                    "-",
                    megabytes(ours["payload"]),
                    "-",
                    megabytes(ours["checkpoint"]),
                    "-",
                ]
            print(f"| {NETWORKS[network]} | {clients} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
