"""The README stays a landing page, and every relative link in it and in docs/ leads somewhere:
to an existing file and, for `#anchor`, to a heading of that file (GitHub's slug rule)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import REPO

README_MAX_LINES = 160
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.S | re.M)


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation other than '-' and '_' dropped,
    spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a markdown file's headings (outside code blocks); a repeated heading
    gets -1, -2, ... as on GitHub."""
    found: set[str] = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            name, n = base, 0
            while name in found:
                n += 1
                name = f"{base}-{n}"
            found.add(name)
    return found


def relative_links(page: Path) -> list[str]:
    """Markdown link targets outside code blocks, except web and mail addresses."""
    targets = LINK.findall(FENCE.sub("", page.read_text()))
    return [t for t in targets if not re.match(r"(https?|mailto):", t)]


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with that anchor in {resolved.name}")
    return broken


def test_readme_is_a_landing_page():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/ (at most {README_MAX_LINES})"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in relative_links(REPO / "README.md") if t.partition("#")[0]}
    unlinked = [str(p.relative_to(REPO)) for p in sorted((REPO / "docs").glob("*.md")) if p.resolve() not in linked]
    assert unlinked == []


def test_the_link_check_sees_broken_links(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## What `--overwrite` may delete\n")
    page.write_text(
        "# Page\n\n[ok](other.md#what---overwrite-may-delete) [self](#page) [web](https://example.org)\n"
        "[missing](nowhere.md) [bad anchor](other.md#what-overwrite-may-delete)\n"
        "```\n[in code](not-checked.md)\n```\n"
    )
    assert [b.split(":")[0] for b in broken_links(page)] == ["nowhere.md", "other.md#what-overwrite-may-delete"]


def test_readme_command_table_lists_every_alum_command():
    """The landing page's table names exactly the subcommands `alum --help` offers."""
    import subprocess
    import sys

    help_text = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--help"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    offered = set(re.search(r"\{([a-z,]+)\}", help_text).group(1).split(","))
    tabled = set(re.findall(r"^\| `alum ([a-z]+)` \|", (REPO / "README.md").read_text(), flags=re.M))
    assert tabled == offered
