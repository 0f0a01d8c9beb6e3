"""Every page's commands (README.md and documentation/*.md) and the documented examples run as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from doc_pages import DOCS, PAGES, REPO, name
from strategy_support import tiny_network

from flwr_nnunet import AliasMap, to_array_record

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def python_block_after(heading: str, page: Path = DOCS / "architecture.md") -> str:
    """The first ```python block after ``heading`` on ``page``."""
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

    exec(python_block_after("## The core"), namespace)  # noqa: S102 - the documentation's own code

    after = network.state_dict()
    key = next(k for k in after if after[k].is_floating_point())
    assert torch.allclose(after[key], base[key] + 2.5)
    full, amap = namespace["full"], namespace["amap"]
    assert all(full[k] is full[group[0]] for group in amap.groups.values() for k in group)


def test_the_custom_strategy_example_is_the_one_tests_test_strategy_runs():
    """documentation/strategies.md's example, less its import line, is tests/test_strategy.py's code verbatim."""
    example = python_block_after("## Custom strategies and the hooks", DOCS / "strategies.md")
    imports, body = example.split("\n", 1)
    assert imports == "from flwr_nnunet import NnUNetFedAvg, median_"
    assert body.strip() and body in (REPO / "tests" / "test_strategy.py").read_text()


# ---------------------------------------------------------------------------------------------------------------
# Every command in every page's ```bash blocks is either run here (tiny budgets) or on the documented-only list.

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
    (".venv/bin/python scripts/run_crossval.py", "pipeline guide: test_crossval_pipeline.py runs the folds in-process"),
    ("nnUNet_results=$CV nnUNetv2_predict ", "pipeline guide: test_crossval_pipeline.py predicts with -f 0 1 2 3 4"),
    ("nnUNetv2_apply_postprocessing ", "pipeline guide: test_crossval_pipeline.py applies its postprocessing.pkl"),
    (
        'flwr run . --stream --run-config "find-best-configuration=',
        "pipeline guide: test_model_selection.py runs the selection run (the same ServerApp, in-process)",
    ),
    (
        'flwr run . --stream --run-config "cross-site-evaluation=',
        "pipeline guide: test_cross_site.py runs the federation with cross-site-evaluation='local-models'",
    ),
    (
        ".venv/bin/python scripts/run_leave_one_site_out.py",
        "pipeline guide: test_leave_one_site_out.py trains a federation without a site and scores it there",
    ),
)
"""Commands (prefixes) the pages show but this test does not run, and why."""

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


def bash_blocks(text: str) -> list[list[str]]:
    """A page's ```bash blocks, each as its commands (continuations joined, comments and blanks dropped)."""
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
        config = {**tomllib.loads((REPO / toml.group(1)).read_text()), **RUN_BUDGET}
        budgeted = tmp_path / f"budget-{Path(toml.group(1)).name}"
        budgeted.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
        return command.replace(toml.group(0), f"--run-config {budgeted}")
    return None


def page_texts() -> dict[str, str]:
    """Every page's text by its name, in reading order (:data:`doc_pages.PAGES`)."""
    return {name(page): page.read_text() for page in PAGES}


def plan(tmp_path: Path, texts: dict[str, str] | None = None) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """Per ```bash block of every page, in page order: (page, the commands to run with budgets); and the
    commands no rule covers (``page: command``)."""
    runs, uncovered = [], []
    for page, text in (page_texts() if texts is None else texts).items():
        for block in bash_blocks(text):
            script = []
            for command in block:
                for part in command.split(" && "):
                    if _documented(part):
                        continue
                    runnable = _with_budget(part, tmp_path)
                    if runnable is None:
                        uncovered.append(f"{page}: {part}")
                    else:
                        script.append(runnable)
            runs.append((page, script))
    return runs, uncovered


def test_every_bash_command_of_the_pages_is_run_here_or_documented_only(tmp_path):
    runs, uncovered = plan(tmp_path)
    assert not uncovered, (
        "commands of the documentation that tests/test_docs.py neither runs nor lists as documented-only "
        f"(add a rule, or fix the page): {uncovered}"
    )
    flat = [command for _, script in runs for command in script]
    assert any("run_demo.py" in c for c in flat)
    assert sum(c.startswith("flwr run . --stream") for c in flat) >= 4
    assert any("nnUNetv2_predict" in c for c in flat)
    pages = {page for page, _ in runs}
    assert {"README.md", "documentation/getting-started.md", "documentation/deployment.md"} <= pages


def test_a_command_no_rule_covers_is_reported_with_its_page(tmp_path):
    texts = page_texts()
    page = "documentation/getting-started.md"
    assert "checkpoint_final.pth -device cpu\n" in texts[page]
    broken = texts[page].replace("checkpoint_final.pth -device cpu\n", "checkpoint_final.pth\n")  # nnU-Net's cuda
    uncovered = plan(tmp_path, {**texts, page: broken})[1]
    assert len(uncovered) == 1 and uncovered[0].startswith(f"{page}: nnUNet_results=") and "-device" not in uncovered[0]


def test_every_guide_is_linked_from_the_readme():
    assert sorted(PAGES[1:]) == sorted(DOCS.glob("*.md"))


@pytest.mark.slow
def test_the_pages_bash_blocks_run_verbatim_on_a_cpu(tmp_path):
    """Each runnable block as one bash script, pages in reading order, in a temp FLWR_HOME on this test's own ports."""
    from flwr_local import LocalFlower

    runs, uncovered = plan(tmp_path)
    assert not uncovered
    home = tmp_path / "flwr-home"
    with LocalFlower(home, {"CUDA_VISIBLE_DEVICES": ""}) as flower:
        expected = 0
        for page, script in runs:
            if not script:
                continue
            done = flower.run("set -euo pipefail\n" + "\n".join(script), timeout=900)
            assert done.returncode == 0, f"a block of {page} failed:\n{script}\n{done.stdout[-4000:]}"
            expected += sum(c.startswith("flwr run . --stream") for c in script)
        statuses = [run["status"] for run in flower.runs()]
    assert statuses == ["finished:completed"] * expected, statuses
    assert superlink_left(home) == []


def superlink_left(home: Path) -> list[int]:
    from flwr_local import run_demo

    return run_demo.superlink_pids(home)
