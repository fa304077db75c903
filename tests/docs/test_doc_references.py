"""Every "docs/metrics.md §N" (or "metrics.md §N") cited in code and docs names a section that exists.

A bare "§N" in code (a comment or docstring naming no page) cites docs/metrics.md too: the page every
formula's module points to.

Code and docs once cited "metrics.md §8.x", sections of a specification page that the project's own
docs/metrics.md does not have; a citation is only useful if a reader can follow it.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "metrics.md"
CITE = re.compile(r"metrics\.md\s+((?:§\s*[\d.]+[\s,–-]*)+)")
SECTION = re.compile(r"§\s*(\d+(?:\.\d+)?)")
BARE = re.compile(r"(?<![\w.`/])(?<![\w.`/] )§\s*(\d+(?:\.\d+)?)")
"""A "§N" with no page before it (in a .py file: a citation of docs/metrics.md)."""
CODE = ("analyze", "collect", "schemas")
SCANNED = ("analyze", "collect", "schemas", "tests", "benchmarks", "notebooks", "docs", "README.md")
HISTORY = {ROOT / "docs" / "decisions.md"}
"""Dated entries record what was cited then; they are not rewritten."""


def doc_sections() -> set[str]:
    """Section numbers of docs/metrics.md's headings ("6", "15.5")."""
    heads = re.findall(r"^#{2,3}\s+(\d+(?:\.\d+)?)\.?\s", DOC.read_text(encoding="utf-8"), re.M)
    return set(heads)


def citations() -> list[tuple[str, str]]:
    """(file:line, section) of every citation of metrics.md sections in the scanned tree."""
    out = []
    for top in SCANNED:
        base = ROOT / top
        files = (
            [base] if base.is_file() else [p for p in base.rglob("*") if p.suffix in (".py", ".md", ".html")]
        )
        for path in files:
            if path in HISTORY or ".venv" in path.parts:
                continue
            for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                where = f"{path.relative_to(ROOT)}:{i}"
                cited = [m.span(1) for m in CITE.finditer(line)]
                for m in CITE.finditer(line):
                    for sec in SECTION.findall(m.group(1)):
                        out.append((where, sec))
                if top in CODE and path.suffix == ".py":
                    for m in BARE.finditer(line):
                        if not any(a <= m.start() < b for a, b in cited):
                            out.append((where, m.group(1)))
    return out


def test_the_page_has_numbered_sections() -> None:
    assert {"6", "9", "11", "15.5"} <= doc_sections()


def test_every_cited_section_exists() -> None:
    found = citations()
    assert len(found) >= 10  # the code does cite the page
    places = {where.split(":")[0] for where, _ in found}
    # The scan reaches the report's code and the docs (where stale citations were found before).
    assert any(p.startswith("analyze/report/") for p in places) and any(p.startswith("docs/") for p in places)
    missing = [f"{where}: §{sec}" for where, sec in found if sec not in doc_sections()]
    assert missing == []


def test_a_missing_section_is_caught(tmp_path: Path) -> None:
    line = "see metrics" + ".md §8.7 and docs/metrics" + ".md §11"  # split: this file is scanned too
    cited = [sec for m in CITE.finditer(line) for sec in SECTION.findall(m.group(1))]
    assert cited == ["8.7", "11"]
    assert [s for s in cited if s not in doc_sections()] == ["8.7"]


def test_a_bare_section_in_code_cites_the_page() -> None:
    line = "# Matmul weights only (§8.3), see docs/metrics" + ".md §4 and `metrics.md` §8"
    cited = [m.span(1) for m in CITE.finditer(line)]
    bare = [m.group(1) for m in BARE.finditer(line) if not any(a <= m.start() < b for a, b in cited)]
    assert bare == ["8.3"]  # the cited §4 is not counted twice; a page named in backticks is not bare
