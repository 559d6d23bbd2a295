"""Every ```python block in README.md and docs/**/*.md runs.

The blocks of one page run in order in one namespace, so a page reads as one session: a later
block may use what an earlier one defined. They run in a temporary directory (files they write go
there). A block that cannot run on CPU in seconds (a multi-GPU launch, a full training loop) is
preceded by ``<!-- not-run: reason -->``; one that needs an optional package by
``<!-- requires: package -->`` (several: comma-separated). Such blocks are reported as skipped
tests that print their reason. Keep both rare: a page's examples should run as written.
"""
from __future__ import annotations

import importlib.util
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
# a fence may be indented (a block inside a list item); its code is dedented
FENCE = re.compile(r"^([ \t]*)```([\w+-]*)[^\n]*\n(.*?)^\1```[ \t]*$", re.S | re.M)
MARKER = re.compile(r"<!--\s*(not-run|requires)\s*:([^\n]*?)-->")  # one line
MARKER_BEFORE = re.compile(MARKER.pattern + r"\s*\Z")
PYTHON = ("python", "py", "python3")


@dataclass
class Block:
    page: Path
    line: int  # of the first code line, 1-based
    code: str
    not_run: str | None  # the reason, when marked not-run
    requires: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    def missing(self) -> list[str]:
        return [m for m in self.requires if importlib.util.find_spec(m) is None]


def blocks(page: Path) -> list[Block]:
    """The python blocks of ``page`` with the marker right above each, if any.

    >>> [b.line for b in blocks(ROOT / "README.md")][:1]
    [10]
    """
    text = page.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        if m.group(2).lower() not in PYTHON:
            continue
        before = MARKER_BEFORE.search(text[:m.start()])
        not_run, requires = None, ()
        if before and before.group(1) == "not-run":
            not_run = before.group(2).strip()
        elif before:
            requires = tuple(r.strip() for r in before.group(2).split(",") if r.strip())
        out.append(Block(page, text[:m.start(3)].count("\n") + 1, textwrap.dedent(m.group(3)), not_run, requires))
    return out


ALL = [b for p in PAGES for b in blocks(p)]
NOT_RUN = [b for b in ALL if b.not_run is not None or b.missing()]


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.page == p for b in ALL)], ids=_page_id)
def test_page_code_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    ran = 0
    for b in blocks(page):
        if b.not_run is not None or b.missing():
            continue
        # pad with newlines so that a traceback names the line of the markdown file
        # dont_inherit: a block runs as a user runs it, without this file's __future__ imports
        code = compile("\n" * (b.line - 1) + b.code, str(b.page), "exec", dont_inherit=True)
        try:
            exec(code, namespace)
        except Exception as e:
            raise AssertionError(f"the code block at {b.where} raised {type(e).__name__}: {e}") from e
        ran += 1
    assert ran or all(b.not_run or b.missing() for b in blocks(page))


@pytest.mark.parametrize("block", NOT_RUN, ids=lambda b: b.where)
def test_block_not_run(block):
    if block.not_run is not None:
        pytest.skip(f"{block.where} not run: {block.not_run}")
    pytest.skip(f"{block.where} needs {', '.join(block.missing())} (pip install -e '.[integrations]')")


def test_markers_have_reasons_and_precede_python_blocks():
    """A marker without a reason, or one that marks no python block, is a mistake in the page."""
    problems = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        marked = {b.line for b in blocks(page) if b.not_run is not None or b.requires}
        for m in MARKER.finditer(text):
            if not m.group(2).strip():
                problems.append(f"{_page_id(page)}: empty <!-- {m.group(1)}: --> marker")
            nxt = FENCE.search(text, m.end())
            gap = text[m.end():nxt.start()] if nxt else "x"
            line = text[:nxt.start(3)].count("\n") + 1 if nxt else None
            if gap.strip() or line not in marked:
                problems.append(f"{_page_id(page)}: <!-- {m.group(1)}: ... --> is not right above a python block")
    assert not problems, "\n".join(problems)


def test_blocks_found():
    """The extraction itself: the README's quickstart is found, runs, and few blocks are exempt."""
    readme = blocks(ROOT / "README.md")
    assert readme and "sparsify.sparsify(" in readme[0].code and readme[0].not_run is None
    assert len([b for b in ALL if b.not_run is not None]) <= max(3, len(ALL) // 5), \
        "more than a fifth of the docs' code blocks are marked not-run: make them runnable"


def test_marker_parsing(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("x\n\n<!-- not-run: needs 8 GPUs -->\n```python\nraise SystemExit\n```\n\n"
                    "<!-- requires: lightning, transformers -->\n```py\nimport lightning\n```\n"
                    "```bash\nls\n```\n```python\nx = 1\n```\n- item:\n\n  ```python\n  y = 2\n  ```\n",
                    encoding="utf-8")
    got = [(b.line, b.not_run, b.requires, b.code) for b in blocks(page)]
    assert got == [(5, "needs 8 GPUs", (), "raise SystemExit\n"),
                   (10, None, ("lightning", "transformers"), "import lightning\n"),
                   (16, None, (), "x = 1\n"),
                   (21, None, (), "y = 2\n")]



def test_code_and_docs_cite_only_what_the_repository_holds():
    """Citations go to docs/ pages or papers: a reader of the repository cannot open the project's
    private specifications or another machine's paths."""
    outside = re.compile("|".join(re.escape(n) for n in ("METHODS" + ".md", "DESIGN" + ".md", "GROUND" + ".md",
                                                          "/work/" + "shared")))
    hits = []
    for folder in ("sparsify", "passes", "tests", "benchmarks", "examples", "docs"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".md", ".json", ".cfg", ".txt") and path.is_file():
                for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                    if outside.search(line):
                        hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    hits += [f"README.md:{i}" for i, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1)
             if outside.search(line)]
    assert not hits, "cite docs/methods/*.md or the paper instead:\n" + "\n".join(hits)
