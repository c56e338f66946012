"""The repository's own docs say what the code and the other docs cite: no reference to a design
document or style guide that is not in the repository, and every ``docs/NAME.md, "Section"``
citation names a file and a heading that exist (issue 16, item 3)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import ROOT

FOLDERS = ("ism_edge", "training", "engines", "cli", "tests", "examples", "scripts", "docs")
OUTSIDE = re.compile(r"\bSPEC\b|SPEC §|STYLE\.md")
CITATION = re.compile(r"docs/([a-z0-9_]+\.md)`?(?:,|\s\()\s*\"([^\"]+)\"")
MENTION = re.compile(r"docs/([a-z0-9_]+\.md)")


def _texts() -> list[tuple[Path, str]]:
    files = [ROOT / "README.md"] + [p for f in FOLDERS for p in (ROOT / f).rglob("*") if p.suffix in (".py", ".md")]
    return [(p, p.read_text(encoding="utf-8")) for p in files if p.resolve() != Path(__file__).resolve()]


def test_nothing_cites_a_document_outside_the_repository() -> None:
    hits = [f"{p.relative_to(ROOT)}:{i}" for p, text in _texts() for i, line in enumerate(text.splitlines(), 1)
            if OUTSIDE.search(line)]
    assert hits == []


def test_every_cited_doc_and_section_exists() -> None:
    headings = {p.name: [h.lstrip("#").strip() for h in p.read_text().splitlines() if h.startswith("#")]
                + re.findall(r"\*\*([^*]+)\*\*", p.read_text())  # a bold paragraph title is a section too
                for p in (ROOT / "docs").glob("*.md")}
    missing = []
    for path, text in _texts():
        flat = " ".join(text.split())  # a citation may be wrapped over two lines
        missing += [f"{path.relative_to(ROOT)}: docs/{name}" for name in MENTION.findall(flat) if name not in headings]
        missing += [f"{path.relative_to(ROOT)}: docs/{name}, {section!r}" for name, section in CITATION.findall(flat)
                    if name in headings and not any(h.startswith(section) or section in h for h in headings[name])]
    assert missing == []
