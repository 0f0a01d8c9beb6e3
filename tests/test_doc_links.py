"""Every relative link and ``#anchor`` of every page (README.md, documentation/*.md) resolves, as GitHub renders it."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from doc_pages import DOCS, PAGES, README, REPO, headings, links, name

EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # https:, mailto:, ...


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text (code spans' backticks dropped), lowercase, punctuation dropped
    (letters, digits, ``_``, ``-`` and blanks stay), each blank turned into ``-``."""
    text = heading.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a page's headings; a repeated slug gets ``-1``, ``-2``... as on GitHub."""
    seen: Counter[str] = Counter()
    found = set()
    for heading in headings(text):
        base = slug(heading)
        found.add(f"{base}-{seen[base]}" if seen[base] else base)
        seen[base] += 1
    return found


def broken_links(page: Path, text: str) -> list[str]:
    """The links of ``page`` (its ``text``) whose file does not exist or whose anchor is no heading there."""
    broken = []
    for target in links(text):
        if EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and (file.suffix != ".md" or anchor not in anchors(file.read_text())):
            broken.append(f"{target}: no heading with anchor #{anchor} in {file.relative_to(REPO)}")
    return broken


REAL_HEADINGS = (
    (README, "What the main job prints", "what-the-main-job-prints"),
    (
        DOCS / "your-own-datasets.md",
        "Your own nnU-Net datasets and federated planning",
        "your-own-nnu-net-datasets-and-federated-planning",
    ),
    (
        DOCS / "hospitals-that-differ.md",
        "Hospitals that differ: a site that hurts the federation, and a model for each hospital",
        "hospitals-that-differ-a-site-that-hurts-the-federation-and-a-model-for-each-hospital",
    ),
    (DOCS / "deployment.md", "The SuperNode's node config", "the-supernodes-node-config"),
    (
        DOCS / "strategies.md",
        "The strategy: `NnUNetFedAvg`, the alias-aware family and custom strategies",
        "the-strategy-nnunetfedavg-the-alias-aware-family-and-custom-strategies",
    ),
    (
        DOCS / "checkpoints.md",
        "Inspect and repair nnU-Net checkpoints: `flwr-nnunet`",
        "inspect-and-repair-nnu-net-checkpoints-flwr-nnunet",
    ),
    (
        DOCS / "run-config.md",
        'Run config (`[tool.flwr.app.config]`; override with `flwr run . -c "key=value ..."` or `--run-config file.toml`)',
        "run-config-toolflwrappconfig-override-with-flwr-run---c-keyvalue--or---run-config-filetoml",
    ),
)
"""(page, one of its headings, the anchor GitHub gives it)."""


@pytest.mark.parametrize(("page", "heading", "anchor"), REAL_HEADINGS, ids=[a for _, _, a in REAL_HEADINGS])
def test_slug_is_github_s_anchor_of_the_project_s_headings(page, heading, anchor):
    assert heading in headings(page.read_text())
    assert slug(heading) == anchor


def test_a_repeated_heading_gets_a_numbered_anchor_and_code_is_no_heading():
    text = "# Title\n\n## Notes\n\n```bash\n# runs: a comment, no heading\n```\n\n## Notes\n"
    assert anchors(text) == {"title", "notes", "notes-1"}


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_every_relative_link_and_anchor_resolves(page):
    assert broken_links(page, page.read_text()) == []


def test_the_pages_link_to_each_other():
    """Guard against a vacuous pass: the pages hold relative links with anchors, and each guide is reached."""
    targets = [(page, target) for page in PAGES for target in links(page.read_text()) if not EXTERNAL.match(target)]
    assert sum("#" in target for _, target in targets) >= 5
    assert {(page.parent / target.partition("#")[0]).resolve() for page, target in targets} >= set(PAGES[1:])


def test_a_broken_link_or_anchor_is_reported():
    page = DOCS / "getting-started.md"
    text = (
        "See [a](your-own-datasets.md), [b](missing.md), [c](deployment.md#no-such-heading), "
        "[d](#the-3d-demo), [e](#nowhere), ![f](assets/flwr_progress_2d.png), [g](https://flower.ai), `[h](x.md)`."
    )
    assert broken_links(page, text) == [
        f"missing.md: no file {DOCS / 'missing.md'}",
        "deployment.md#no-such-heading: no heading with anchor #no-such-heading in documentation/deployment.md",
        "#nowhere: no heading with anchor #nowhere in documentation/getting-started.md",
    ]
