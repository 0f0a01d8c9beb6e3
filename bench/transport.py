"""Transport benchmark: real bytes between one SuperNode and the SuperLink on loopback, stock vs canonical records.

A SuperLink and one SuperNode run on 127.0.0.1 (``tests/deployment_support.py``, insecure); the SuperNode reaches the
SuperLink through a TCP forwarder in this script that counts the bytes in each direction (gRPC and HTTP/2
framing, heartbeats and all). One round of Flower's own ``FedAvg`` runs through ``flwr run`` on the 3d_fullres
PlainConvUNet, once with stock records (``ArrayRecord(state_dict)``, every key: 292 arrays) and once with
canonical ones (``to_array_record``, one per alias group: 108 arrays), both ways (instruction and reply).

Then, per run-config ``compression`` mode (``none`` included), two rounds of :class:`NnUNetFedAvg` (train and
evaluate, as a run does) with a client that keeps its held model and residual as a site does
(:mod:`flwr_nnunet.site.compressed_updates`) and replies its received model plus a small random update; the
bytes of round 2 (the steady state: round 1 sends every site the whole model) are read from the forwarder's
counts at each round's end. Last, the CPU time to compress an update at the site and to decompress it at the
server (in this process), and what zlib on top of the codes would save and cost.
Prints markdown tables. Run: ``python bench/transport.py [variant ...]`` (all seven: about 9 minutes on an idle
machine; e.g. ``none int3-block`` for two of them).
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

APP_FILES = {
    "pyproject.toml": """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "wireprobe"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "bench"

[tool.flwr.app.components]
serverapp = "wire_server:app"
clientapp = "wire_client:app"

[tool.flwr.app.config]
variant = "stock"
workdir = ""
""",
    "wire_common.py": '''"""The 3d_fullres PlainConvUNet as stock (every key) or canonical records."""
import torch
from flwr.app import ArrayRecord
from flwr_nnunet import AliasMap, from_array_record, to_array_record
from flwr_nnunet.nnunet.networks import STOCK_ARCHITECTURES, build_network


def network():
    torch.manual_seed(0)
    return build_network(STOCK_ARCHITECTURES["3d_fullres PlainConvUNet"])


def record(net, variant, scale=1.0):
    amap = AliasMap.from_module(net)
    canon = {k: (v * scale if v.is_floating_point() else v) for k, v in amap.collapse(net.state_dict()).items()}
    if variant == "stock":
        return ArrayRecord(dict(amap.expand(canon)))
    return to_array_record(canon)


def load(net, arrays):
    amap = AliasMap.from_module(net)
    tensors = from_array_record(arrays)
    if set(tensors) == set(amap.keys):
        tensors = amap.collapse(tensors)
    with torch.no_grad():
        for key, target in amap.collapse(net.state_dict()).items():
            target.copy_(tensors[key])
''',
    "wire_server.py": """import json
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from wire_common import network, record

from flwr_nnunet import NnUNetFedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    variant = str(context.run_config["variant"])
    if variant in ("stock", "canonical"):
        strategy = FedAvg(fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1)
        strategy.start(grid, initial_arrays=record(network(), variant), num_rounds=1)
        return
    workdir, rounds = Path(str(context.run_config["workdir"])), {}

    def counts_at_round_end(server_round, strategy):
        time.sleep(1.5)  # the forwarder writes its counts twice a second
        rounds[server_round] = json.loads((workdir / "counts.json").read_text())
        (workdir / "rounds.json").write_text(json.dumps(rounds))

    strategy = NnUNetFedAvg(
        network(),
        compression=variant,
        min_available_nodes=1,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        post_round_fn=counts_at_round_end,
    )
    strategy.start(grid, num_rounds=2)
""",
    "wire_client.py": """from collections import OrderedDict
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from wire_common import load, network, record

from flwr_nnunet import from_array_record, to_array_record
from flwr_nnunet.core.delta_codec import COMPRESSION_KEY
from flwr_nnunet.site.compressed_updates import compress_reply_content, received_model

app = ClientApp()


def answer(message, context, reply):
    config, folder = message.content["config"], Path(str(context.run_config["workdir"])) / "site"
    if COMPRESSION_KEY in config:
        received = received_model(folder, config, dict(message.content.items()))
    else:
        received = OrderedDict((k, v.clone()) for k, v in from_array_record(message.content["arrays"]).items())
    content = {"metrics": MetricRecord({"num-examples": 4}), "config": ConfigRecord()}
    if reply:
        generator = torch.Generator().manual_seed(int(config["server-round"]))
        content["arrays"] = to_array_record(
            OrderedDict(
                (k, v + 1e-3 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v)
                for k, v in received.items()
            )
        )
    if COMPRESSION_KEY in config:
        compress_reply_content(folder, int(config["server-round"]), content, received, config)
    return Message(RecordDict(content), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    variant = str(context.run_config["variant"])
    if variant not in ("stock", "canonical"):
        return answer(message, context, reply=True)
    net = network()
    load(net, message.content["arrays"])
    arrays = record(net, variant, scale=1.001)
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 4})}), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return answer(message, context, reply=False)
""",
}


def forward(listen: int, target: int, out: Path) -> None:
    """Forward 127.0.0.1:listen to 127.0.0.1:target, writing the byte counts to ``out`` twice a second."""
    counts = {"to_superlink": 0, "to_supernode": 0}

    async def pipe(reader, writer, key):
        try:
            while data := await reader.read(1 << 16):
                counts[key] += len(data)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(client_reader, client_writer):
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(
            pipe(client_reader, server_writer, "to_superlink"), pipe(server_reader, client_writer, "to_supernode")
        )

    async def dump():
        while True:
            out.write_text(json.dumps(counts))
            await asyncio.sleep(0.5)

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", listen)
        asyncio.get_running_loop().create_task(dump())
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def one_run(variant: str, root: Path, app: Path) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from deployment_support import BIN, CONNECTION, HOST, Deployment, free_port, wait_for_port

    root.mkdir(parents=True)
    deployment = Deployment(root)
    try:
        deployment.start_superlink()
        proxy_port, counts = free_port(), root / "counts.json"
        command = [sys.executable, __file__, "--forward", str(proxy_port), str(deployment.link_port), str(counts)]
        proxy = deployment.start("forwarder", command, deployment.environment(deployment.flwr_home))
        wait_for_port(proxy_port, proxy.process)
        node_port, node_home = free_port(), root / "flwr-home-node"
        node_home.mkdir()
        command = [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"{HOST}:{proxy_port}"]
        command += ["--host", HOST, "--port", str(node_port)]
        node = deployment.start("supernode", command, deployment.environment(node_home))
        wait_for_port(node_port, node.process)
        deployment.write_connection()
        time.sleep(3)
        before = json.loads(counts.read_text())
        config = f"variant='{variant}' workdir='{root}'"
        submitted = deployment.flwr("run", str(app), CONNECTION, "--run-config", config, "--format=json", timeout=300)
        if submitted.returncode:
            raise RuntimeError(f"flwr run failed:\n{submitted.stdout}\n{submitted.stderr}")
        run_id = json.loads(submitted.stdout)["run-id"]
        status, deadline = "", time.monotonic() + 1800
        while not status.startswith("finished") and time.monotonic() < deadline:
            time.sleep(2)
            listed = deployment.flwr("ls", CONNECTION, "--format=json", "--run-id", str(run_id))
            try:
                status = json.loads(listed.stdout)["runs"][0]["status"]
            except (ValueError, KeyError, IndexError):
                status = ""
        time.sleep(1.5)
        after = json.loads(counts.read_text())
        rounds = json.loads((root / "rounds.json").read_text()) if (root / "rounds.json").is_file() else {}
        if status != "finished:completed":
            print(deployment.logs(), file=sys.stderr)
        return {
            "status": status,
            "rounds": rounds,
            "before": before,
            **{key: after[key] - before[key] for key in after},
        }
    except BaseException:
        print(deployment.logs(), file=sys.stderr)
        raise
    finally:
        deployment.stop()


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--forward":
        forward(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
        return
    from flwr.app import ArrayRecord

    from flwr_nnunet import AliasMap, to_array_record
    from flwr_nnunet.core.quantize import SCHEMES
    from flwr_nnunet.nnunet.networks import STOCK_ARCHITECTURES, build_network

    net = build_network(STOCK_ARCHITECTURES["3d_fullres PlainConvUNet"])
    amap = AliasMap.from_module(net)
    held = {
        "stock": sum(len(a.data) for a in ArrayRecord(net.state_dict()).values()),
        "canonical": sum(len(a.data) for a in to_array_record(amap.collapse(net.state_dict())).values()),
    }
    variants = sys.argv[1:] or ["stock", "canonical", "none", *SCHEMES]
    with tempfile.TemporaryDirectory() as tmp:
        app = Path(tmp) / "app"
        app.mkdir()
        for name, text in APP_FILES.items():
            (app / name).write_text(text)
        rows = {variant: one_run(variant, Path(tmp) / variant, app) for variant in variants}
    if "stock" in rows and "canonical" in rows:
        print_records(rows, held)
    if "none" in rows:
        print_compressed(rows, net)


def print_records(rows: dict, held: dict) -> None:
    """The stock and canonical records' bytes, one round each way."""
    mb = 1e6
    print("3d_fullres PlainConvUNet, one round, one SuperNode, loopback\n")
    print(
        "| records | bytes a record holds | SuperLink -> SuperNode (instruction) | SuperNode -> SuperLink (reply) | run |"
    )
    print("|---|---|---|---|---|")
    for variant in ("stock", "canonical"):
        row = rows[variant]
        label = "stock `ArrayRecord(state_dict)`" if variant == "stock" else "canonical `to_array_record`"
        print(
            f"| {label} | {held[variant] / mb:.1f} MB | {row['to_supernode'] / mb:.1f} MB | "
            f"{row['to_superlink'] / mb:.1f} MB | {row['status']} |"
        )


def round_bytes(row: dict, server_round: int) -> dict[str, int]:
    """Bytes each way during ``server_round`` (from the counts at the end of the round before, or the start)."""
    end = row["rounds"][str(server_round)]
    start = row["rounds"][str(server_round - 1)] if server_round > 1 else row["before"]
    return {key: end[key] - start[key] for key in end}


def print_compressed(rows: dict, net) -> None:
    """Round 2's bytes per mode (train and evaluate), against ``none``'s."""
    mb, plain = 1e6, round_bytes(rows["none"], 2)
    print("\n3d_fullres PlainConvUNet, NnUNetFedAvg, round 2 of 2 (train and evaluate), one SuperNode, loopback\n")
    print(
        "| compression | SuperLink -> SuperNode | fewer bytes | SuperNode -> SuperLink | fewer bytes | round 1 down | run |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode in (m for m in rows if m not in ("stock", "canonical")):
        row = rows[mode]
        if "2" not in row["rounds"]:
            print(f"| `{mode}` | | | | | | {row['status']}, round 2 not counted |")
            continue
        second = round_bytes(row, 2)
        down, up = second["to_supernode"], second["to_superlink"]
        print(
            f"| `{mode}` | {down / mb:.1f} MB | {plain['to_supernode'] / down:.1f}x | {up / mb:.1f} MB | "
            f"{plain['to_superlink'] / up:.1f}x | {round_bytes(row, 1)['to_supernode'] / mb:.1f} MB | {row['status']} |"
        )
    print_cpu(net)


def print_cpu(net) -> None:
    """CPU time to compress an update (site) and decompress it (server), and zlib on top of the codes."""
    import zlib
    from collections import OrderedDict

    import torch

    from flwr_nnunet import AliasMap
    from flwr_nnunet.core.delta_codec import apply_delta, decode_delta, encode_delta
    from flwr_nnunet.core.quantize import SCHEMES

    torch.manual_seed(0)
    base = AliasMap.from_module(net).collapse(net.state_dict())
    trained = OrderedDict((k, v + 1e-3 * torch.randn_like(v) if v.is_floating_point() else v) for k, v in base.items())
    print("\nCPU seconds (one thread) per update of the 3d_fullres network; zlib level 1 on the codes and scales\n")
    print("| compression | compress (site) | decompress (server) | zlib size | zlib compress | zlib decompress |")
    print("|---|---|---|---|---|---|")
    torch.set_num_threads(1)
    for name, scheme in SCHEMES.items():
        _, residual = encode_delta(trained, base, scheme)  # the residual of a round before: error feedback
        start = time.process_time()
        (codes, scales), _ = encode_delta(trained, base, scheme, residual)
        encoded = time.process_time()
        apply_delta(base, decode_delta((codes, scales), base, scheme))
        decoded = time.process_time()
        payload = b"".join(bytes(a.data) for record in (codes, scales) for a in record.values())
        packed = zlib.compress(payload, 1)
        zipped = time.process_time()
        zlib.decompress(packed)
        unzipped = time.process_time()
        print(
            f"| `{name}` | {encoded - start:.2f} s | {decoded - encoded:.2f} s | {len(packed) / len(payload):.0%} of "
            f"{len(payload) / 1e6:.1f} MB | {zipped - decoded:.2f} s | {unzipped - zipped:.2f} s |"
        )


if __name__ == "__main__":
    main()
