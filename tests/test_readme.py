"""The README's core example runs as written on a real nnU-Net network."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from strategy_support import tiny_network

from flwr_nnunet import AliasMap, to_array_record

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block_after(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_core_example_aggregates_in_place_and_keeps_aliases_shared():
    network = tiny_network(norm="batch")
    base = {k: v.clone() for k, v in network.state_dict().items()}
    clients = [{k: v + i if v.is_floating_point() else v for k, v in base.items()} for i in (1, 3)]
    canonical_keys = AliasMap.from_module(network).canonical_keys
    received = [to_array_record({k: c[k] for k in canonical_keys}) for c in clients]
    namespace = {"network": network, "received": received, "weights": [1, 3]}

    exec(python_block_after("## The core"), namespace)  # noqa: S102 - the README's own code

    after = network.state_dict()
    key = next(k for k in after if after[k].is_floating_point())
    assert torch.allclose(after[key], base[key] + 2.5)
    full, amap = namespace["full"], namespace["amap"]
    assert all(full[k] is full[group[0]] for group in amap.groups.values() for k in group)
