"""Transport benchmark: real bytes between one SuperNode and the SuperLink on loopback, stock vs canonical records.

A SuperLink and one SuperNode run on 127.0.0.1 (``tests/deployment_support.py``, insecure); the SuperNode reaches the
SuperLink through a TCP forwarder in this script that counts the bytes in each direction (gRPC and HTTP/2
framing, heartbeats and all). One round of Flower's own ``FedAvg`` runs through ``flwr run`` on the 3d_fullres
PlainConvUNet, once with stock records (``ArrayRecord(state_dict)``, every key: 292 arrays) and once with
canonical ones (``to_array_record``, one per alias group: 108 arrays), both ways (instruction and reply).
Prints a markdown table. Run: ``python bench/transport.py`` (about 2 minutes).
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
    "wire_server.py": """from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from wire_common import network, record

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    strategy = FedAvg(fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1)
    strategy.start(grid, initial_arrays=record(network(), str(context.run_config["variant"])), num_rounds=1)
""",
    "wire_client.py": """from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from wire_common import load, network, record

app = ClientApp()


@app.train()
def train(message: Message, context: Context) -> Message:
    net = network()
    load(net, message.content["arrays"])
    arrays = record(net, str(context.run_config["variant"]), scale=1.001)
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 4})}), reply_to=message)
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


def one_round(variant: str, root: Path, app: Path) -> dict:
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
        submitted = deployment.flwr(
            "run", str(app), CONNECTION, "--run-config", f"variant='{variant}'", "--format=json", timeout=300
        )
        if submitted.returncode:
            raise RuntimeError(f"flwr run failed:\n{submitted.stdout}\n{submitted.stderr}")
        run_id = json.loads(submitted.stdout)["run-id"]
        status, deadline = "", time.monotonic() + 600
        while not status.startswith("finished") and time.monotonic() < deadline:
            time.sleep(2)
            listed = deployment.flwr("ls", CONNECTION, "--format=json", "--run-id", str(run_id))
            try:
                status = json.loads(listed.stdout)["runs"][0]["status"]
            except (ValueError, KeyError, IndexError):
                status = ""
        time.sleep(1.5)
        after = json.loads(counts.read_text())
        return {"status": status, **{key: after[key] - before[key] for key in after}}
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
    from flwr_nnunet.nnunet.networks import STOCK_ARCHITECTURES, build_network

    net = build_network(STOCK_ARCHITECTURES["3d_fullres PlainConvUNet"])
    amap = AliasMap.from_module(net)
    held = {
        "stock": sum(len(a.data) for a in ArrayRecord(net.state_dict()).values()),
        "canonical": sum(len(a.data) for a in to_array_record(amap.collapse(net.state_dict())).values()),
    }
    mb = 1e6
    with tempfile.TemporaryDirectory() as tmp:
        app = Path(tmp) / "app"
        app.mkdir()
        for name, text in APP_FILES.items():
            (app / name).write_text(text)
        rows = {variant: one_round(variant, Path(tmp) / variant, app) for variant in ("stock", "canonical")}
    print("3d_fullres PlainConvUNet, one round, one SuperNode, loopback\n")
    print(
        "| records | bytes a record holds | SuperLink -> SuperNode (instruction) | SuperNode -> SuperLink (reply) | run |"
    )
    print("|---|---|---|---|---|")
    for variant, row in rows.items():
        label = "stock `ArrayRecord(state_dict)`" if variant == "stock" else "canonical `to_array_record`"
        print(
            f"| {label} | {held[variant] / mb:.1f} MB | {row['to_supernode'] / mb:.1f} MB | "
            f"{row['to_superlink'] / mb:.1f} MB | {row['status']} |"
        )


if __name__ == "__main__":
    main()
