"""The README's and documentation/'s commands and core example run as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from strategy_support import tiny_network

from flwr_nnunet import AliasMap, to_array_record

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

README = Path(__file__).resolve().parents[1] / "README.md"
DOCS = README.parent / "documentation"
PAGES = (
    README,
    *(
        DOCS / f"{name}.md"
        for name in (
            "getting-started",
            "your-own-datasets",
            "hospitals-that-differ",
            "deployment",
            "run-config",
            "strategies",
            "checkpoints",
            "benchmarks",
            "architecture",
        )
    ),
)
"""The pages whose commands run, in this order (the README's, then the guides')."""


def pages_text() -> str:
    return "\n".join(page.read_text() for page in PAGES)


def python_block_after(heading: str, page: Path = DOCS / "architecture.md") -> str:
    text = page.read_text()
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


# ---------------------------------------------------------------------------------------------------------------
# Every command in the README's ```bash blocks is either run here (tiny budgets) or on the documented-only list.

RUN_BUDGET = {"num-server-rounds": 1, "iterations-per-epoch": 1, "val-iterations-per-epoch": 1}
DEMO_BUDGET = "--rounds 1 --iterations 1 --val-iterations 1 --sites 2"

DOCUMENTED_ONLY: tuple[tuple[str, str], ...] = (
    ("python3 -m venv .venv", "makes the virtual environment this test runs in"),
    (".venv/bin/pip install -q -c constraints.txt -e .", "the install this test runs in"),
    ('.venv/bin/pip install -q -c constraints.txt -e ".[test]"', "the install this test runs in"),
    (".venv/bin/python -m pytest", "the test suite itself (CI runs it, .ci/run)"),
    ("ssh-keygen -t ecdsa -b 384 ", "deployment guide: scripts/make_test_certificates.sh makes node keys so"),
    ("CERTS=", "deployment guide: tests/test_deployment_secure.py runs configs/deployment/superlink.sh on 127.0.0.1"),
    ("configs/deployment/register_supernodes.sh ", "deployment guide: run by tests/test_deployment_secure.py"),
    ("SUPERLINK=", "deployment guide: tests/test_deployment_secure.py runs configs/deployment/supernode.sh"),
    ("flwr run . hospitals ", "deployment guide: the deployment tests run `flwr run <repo> <connection> --run-config`"),
    ("nnUNetv2_predict -i imagesTs ", "deployment guide: tests/test_deployment_secure.py predicts the run's model"),
)
"""Commands (prefixes) the README shows but this test does not run, and why."""

RUN_AS_IS = (
    re.compile(r"export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 PATH=\S+$"),
    re.compile(r"[A-Z]+=\S+$"),  # shell variables of a block (IN=..., OUT=...)
    re.compile(r"nnUNet_results=\S+ nnUNetv2_predict .*-device cpu\b.*"),
    re.compile(r'kill \$\(pgrep -u "\$\(id -u\)" -f -- .*local-superlink/superlink\.log"\)$'),
)
"""Commands run verbatim (no budget to set)."""


def _strip_comment(line: str) -> str:
    """``line`` without its shell comment (a ``#`` outside quotes, at the start or after a blank)."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip()
    return line.rstrip()


def bash_blocks(text: str | None = None) -> list[list[str]]:
    """The README's ```bash blocks, each as its commands (continuations joined, comments and blanks dropped)."""
    text = pages_text() if text is None else text
    blocks = []
    for body in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        commands, pending = [], ""
        for raw in body.splitlines():
            line = _strip_comment(raw)
            if line.endswith("\\"):
                pending += line[:-1].strip() + " "
                continue
            line = (pending + line.strip()).strip()
            pending = ""
            if line:
                commands.append(line)
        blocks.append(commands)
    return blocks


def _documented(command: str) -> str | None:
    return next(
        (why for prefix, why in DOCUMENTED_ONLY if command == prefix.strip() or command.startswith(prefix)), None
    )


def _with_budget(command: str, tmp_path: Path) -> str | None:
    """The command as this test runs it (a budget added), or None when no rule covers it."""
    if any(pattern.fullmatch(command) for pattern in RUN_AS_IS):
        return command
    if command == ".venv/bin/python scripts/run_demo.py":
        return f"{command} {DEMO_BUDGET} --workdir {tmp_path / 'run_demo'}"
    if command.startswith("flwr run . --stream"):
        toml = re.search(r"--run-config (configs/[\w.-]+\.toml)", command)
        if toml is None:
            pairs = " ".join(f"{k}={v}" for k, v in RUN_BUDGET.items())
            return f'{command} --run-config "{pairs}"'
        config = {**tomllib.loads((README.parent / toml.group(1)).read_text()), **RUN_BUDGET}
        budgeted = tmp_path / f"budget-{Path(toml.group(1)).name}"
        budgeted.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
        return command.replace(toml.group(0), f"--run-config {budgeted}")
    return None


def plan(tmp_path: Path, text: str | None = None) -> tuple[list[list[str]], list[str]]:
    """Per ```bash block the commands to run (with budgets), and the README commands no rule covers."""
    runs, uncovered = [], []
    for block in bash_blocks(text):
        script = []
        for command in block:
            parts = command.split(" && ")
            for part in parts:
                if _documented(part):
                    continue
                runnable = _with_budget(part, tmp_path)
                if runnable is None:
                    uncovered.append(part)
                else:
                    script.append(runnable)
        runs.append(script)
    return runs, uncovered


def test_every_readme_bash_command_is_run_here_or_documented_only(tmp_path):
    runs, uncovered = plan(tmp_path)
    assert not uncovered, (
        "README commands that tests/test_readme.py neither runs nor lists as documented-only "
        f"(add a rule, or fix the README): {uncovered}"
    )
    flat = [command for script in runs for command in script]
    assert any("run_demo.py" in c for c in flat)
    assert sum(c.startswith("flwr run . --stream") for c in flat) >= 4
    assert any("nnUNetv2_predict" in c for c in flat)


def test_a_readme_command_no_rule_covers_is_reported(tmp_path):
    text = pages_text()
    assert "checkpoint_final.pth -device cpu\n" in text
    broken = text.replace("checkpoint_final.pth -device cpu\n", "checkpoint_final.pth\n")  # nnU-Net's cuda default
    uncovered = plan(tmp_path, broken)[1]
    assert len(uncovered) == 1 and uncovered[0].startswith("nnUNet_results=") and "-device" not in uncovered[0]


@pytest.mark.slow
def test_readme_bash_blocks_run_verbatim_on_a_cpu(tmp_path):
    """Each runnable block as one bash script, in README order, in a temp FLWR_HOME on this test's own ports."""
    from flwr_local import LocalFlower

    runs, uncovered = plan(tmp_path)
    assert not uncovered
    home = tmp_path / "flwr-home"
    with LocalFlower(home, {"CUDA_VISIBLE_DEVICES": ""}) as flower:
        expected = 0
        for script in filter(None, runs):
            done = flower.run("set -euo pipefail\n" + "\n".join(script), timeout=900)
            assert done.returncode == 0, f"README block failed:\n{script}\n{done.stdout[-4000:]}"
            expected += sum(c.startswith("flwr run . --stream") for c in script)
        statuses = [run["status"] for run in flower.runs()]
    assert statuses == ["finished:completed"] * expected, statuses
    assert superlink_left(home) == []


def superlink_left(home: Path) -> list[int]:
    from flwr_local import run_demo

    return run_demo.superlink_pids(home)
