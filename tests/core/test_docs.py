"""The repository stands alone: nothing outside docs/ cites a document that is not in it, and every docs/ page a
file cites exists (and is listed in docs/README.md)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from tests.support import ROOT

DOCS = ROOT / "docs"

OUTSIDE = re.compile(r"DESIGN\.md|\.\./shared\b|/work/shared")
"""Mentions of design notes that live outside the repository."""

CITED_PAGE = re.compile(r"\bdocs/([\w.-]+\.md)\b")
LINKED_PAGE = re.compile(r"\]\(([\w.-]+\.md)\)")


_SKIP_DIRS = {
    ".git",
    ".venv",
    ".venv-triton36",
    ".hypothesis",
    ".pytest_cache",
    ".ruff_cache",
    "__pycache__",
    "build",
    "dist",
}


def tracked_files() -> list[Path]:
    """The repository's files: ``git ls-files`` in a checkout, else every file below the root (a source tree)."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        return [ROOT / name for name in out.decode().split("\0") if name and (ROOT / name).is_file()]
    return [
        p
        for p in ROOT.rglob("*")
        if p.is_file() and not (_SKIP_DIRS & set(p.relative_to(ROOT).parts)) and ".egg-info" not in str(p)
    ]


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary


def test_nothing_outside_docs_cites_notes_outside_the_repository():
    this = Path(__file__).resolve()
    offenders = []
    for path in tracked_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("docs/") or path.resolve() == this:
            continue
        text = _text(path)
        hits = [] if text is None else [f"{rel}:{text[: m.start()].count(chr(10)) + 1}" for m in OUTSIDE.finditer(text)]
        offenders += hits
    assert not offenders, f"cite the docs/ page that holds the fact instead: {offenders}"


def test_docs_contain_no_outside_references_either():
    offenders = [p.name for p in DOCS.glob("*.md") if OUTSIDE.search(p.read_text(encoding="utf-8"))]
    assert not offenders, offenders


def test_every_cited_docs_page_exists():
    missing = []
    for path in tracked_files():
        text = _text(path)
        if text is None:
            continue
        rel = path.relative_to(ROOT).as_posix()
        names = set(CITED_PAGE.findall(text))
        if rel.startswith("docs/"):
            names |= set(LINKED_PAGE.findall(text))
        missing += [f"{rel} -> docs/{name}" for name in sorted(names) if not (DOCS / name).is_file()]
    assert not missing, missing


def test_the_index_lists_every_page():
    pages = {p.name for p in DOCS.glob("*.md")} - {"README.md"}
    assert pages, "docs/ has no pages"
    listed = set(LINKED_PAGE.findall((DOCS / "README.md").read_text(encoding="utf-8")))
    assert listed == pages, f"docs/README.md lists {sorted(listed)}, docs/ holds {sorted(pages)}"
