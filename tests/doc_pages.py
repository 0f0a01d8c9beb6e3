"""The documentation's pages: README.md, then the guides under documentation/ in the order the README links them.

Test support for tests/test_docs.py (the pages' commands and examples) and tests/test_doc_links.py (their links).
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "documentation"

FENCED = re.compile(r"^```.*?^```[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^()\s]+)\)")
HEADING = re.compile(r"^(#{1,6}) +(.+?) *#*$", re.MULTILINE)


def prose(text: str) -> str:
    """``text`` without its fenced code blocks (a ``# comment`` in a block is no heading, ``a[i](x)`` no link)."""
    return FENCED.sub("", text)


def links(text: str) -> list[str]:
    """Every link and image target of the page's prose, as written (``path``, ``path#anchor``, ``#anchor``, URLs)."""
    return LINK.findall(INLINE_CODE.sub("", prose(text)))


def headings(text: str) -> list[str]:
    """The page's headings as written (``#`` marks and surrounding blanks dropped), in page order."""
    return [match.group(2) for match in HEADING.finditer(prose(text))]


def guides() -> list[Path]:
    """The pages under documentation/ in the order README.md first links them."""
    pages = []
    for target in links(README.read_text()):
        path = (REPO / target.partition("#")[0]).resolve()
        if path.parent == DOCS and path.suffix == ".md" and path not in pages:
            pages.append(path)
    return pages


PAGES = (README, *guides())
"""Every page whose commands run and whose links are checked, in reading order."""


def name(page: Path) -> str:
    """``page`` as the repository names it (``documentation/deployment.md``)."""
    return page.relative_to(REPO).as_posix()
