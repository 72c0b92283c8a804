"""The docs name only what exists: README.md and docs/*.md, read as Markdown, against the tree and the CLI.

Every relative link resolves (to a file, and to one of its headings when it has an anchor), every repository path
written in code exists, every `llamasys COMMAND` is a subcommand of the real parser and every `make TARGET` a target
of the Makefile; the README stays short enough to read in five minutes. Pure: no binaries, no network.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from harness.cli import make_parser

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 220

# A code token names a repository path when it starts with a top-level folder or is a top-level file. Run
# directories (`runs/...`), the cache (`~/.cache/...`) and paths with placeholders (`mmlu/<variant>.json`) do not.
TOP_FOLDERS = (
    "bench/", "harness/", "locustfiles/", "mmlu/", "reports/", "tests/", "benchmarks/", "docs/", "docker/",
    "scripts/", "requirements/", ".ci/",
)  # fmt: skip
TOP_FILES = ("Makefile", "setup.cfg", "pyproject.toml")
PLACEHOLDER = re.compile(r"[<>{}$]")

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
LLAMASYS = re.compile(r"(?<![\w/.-])(?:\.venv/bin/)?llamasys\s+([a-z][\w-]*)")
MAKE = re.compile(r"(?<![\w/.-])make\s+([a-z][\w-]*)")


@dataclass(frozen=True)
class Doc:
    """One Markdown file split into its prose (code spans blanked out), its code (spans and blocks) and headings."""

    path: Path
    prose: str
    code: tuple[str, ...]
    headings: tuple[str, ...]

    @property
    def name(self) -> str:
        return str(self.path.relative_to(REPO))


@cache
def read_doc(path: Path) -> Doc:
    prose_lines: list[str] = []
    blocks: list[str] = []
    headings: list[str] = []
    fenced = False
    previous_blank = True
    in_indented = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            prose_lines.append("")
            continue
        # An indented code block starts after a blank line (list continuations here are indented 2 or 3 spaces).
        indented = line.startswith("    ") and (previous_blank or in_indented)
        if fenced or indented:
            blocks.append(line)
            in_indented = indented
            prose_lines.append("")
        else:
            in_indented = in_indented and not line.strip()
            match = HEADING.match(line)
            if match:
                headings.append(match.group(2))
            prose_lines.append(line)
        previous_blank = not line.strip()
    text = "\n".join(prose_lines)
    spans = [m.group(2) for m in CODE_SPAN.finditer(text)]
    prose = CODE_SPAN.sub(lambda m: "`" + " " * len(m.group(2)) + "`", text)
    return Doc(path, prose, (*spans, *blocks), tuple(headings))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text without markup, lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in read_doc(path).headings:
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


def broken_links(doc: Doc) -> list[str]:
    problems = []
    for match in LINK.finditer(doc.prose):
        target = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, file: ...
            continue
        file_part, _, anchor = target.partition("#")
        linked = (doc.path.parent / file_part).resolve() if file_part else doc.path
        if not linked.exists():
            problems.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{target}: no such heading")
    return problems


def repository_paths(doc: Doc) -> set[str]:
    paths = set()
    for code in doc.code:
        for token in code.split():
            token = token.strip("'\"()[],;")
            token = token.split("::")[0].removesuffix("...").rstrip(":.")
            if PLACEHOLDER.search(token):
                continue
            if token.startswith(TOP_FOLDERS) or token in TOP_FILES:
                paths.add(token)
    return paths


def missing_paths(doc: Doc) -> list[str]:
    missing = []
    for path in sorted(repository_paths(doc)):
        exists = any(REPO.glob(path)) if "*" in path else (REPO / path).exists()
        if not exists:
            missing.append(path)
    return missing


@cache
def subcommands() -> frozenset[str]:
    parser = make_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return frozenset(name for action in actions for name in action.choices)


@cache
def make_targets() -> frozenset[str]:
    targets = set()
    for line in (REPO / "Makefile").read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9_.%/ -]+?)\s*::?(?!=)", line)
        if match:
            targets.update(name for name in match.group(1).split() if not name.startswith("."))
    return frozenset(targets)


def named(pattern: re.Pattern[str], doc: Doc) -> set[str]:
    return {m.group(1) for code in doc.code for m in pattern.finditer(code)}


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves_to_a_file_and_heading(path: Path):
    assert broken_links(read_doc(path)) == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_repository_path_in_code_exists(path: Path):
    assert missing_paths(read_doc(path)) == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_llamasys_command_is_a_subcommand_of_the_parser(path: Path):
    assert named(LLAMASYS, read_doc(path)) - subcommands() == set()


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_make_target_is_in_the_makefile(path: Path):
    assert named(MAKE, read_doc(path)) - make_targets() == set()


@pytest.mark.parametrize("path", DOCS[1:], ids=lambda p: str(p.relative_to(REPO)))
def test_every_docs_page_starts_with_a_title_and_what_it_covers(path: Path):
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# ") and lines[1] == "" and lines[2].strip()


def test_the_readme_is_short_and_links_every_docs_page():
    readme = read_doc(REPO / "README.md")
    assert len(readme.path.read_text(encoding="utf-8").splitlines()) <= README_MAX_LINES
    linked = {(REPO / m.group(1).partition("#")[0]).resolve() for m in LINK.finditer(readme.prose)}
    assert [p.name for p in DOCS[1:] if p.resolve() not in linked] == []


# The checks themselves, on small documents: a test that cannot fail keeps nothing honest.


def doc_of(tmp_path: Path, text: str, name: str = "page.md") -> Doc:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return read_doc(path)


def test_slugs_follow_githubs_rule():
    assert slug("Capacity under a latency target: goodput") == "capacity-under-a-latency-target-goodput"
    assert slug("Tuning llama-server's settings (`[tune]`, `llamasys tune`)") == (
        "tuning-llama-servers-settings-tune-llamasys-tune"
    )
    assert slug("`benchmarks/loadgen.py`") == "benchmarksloadgenpy"


def test_a_link_to_a_missing_file_or_heading_is_reported(tmp_path: Path):
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n", encoding="utf-8")
    doc = doc_of(tmp_path, "# T\n\n[ok](other.md#a-section) [gone](renamed.md) [no](other.md#nowhere) [up](#t)\n")
    assert broken_links(doc) == ["renamed.md: no such file", "other.md#nowhere: no such heading"]


def test_paths_in_code_spans_and_blocks_are_read_and_placeholders_skipped(tmp_path: Path):
    doc = doc_of(
        tmp_path,
        "# T\n\nRun `.venv/bin/python benchmarks/gone.py --x`, see `tests/unit/test_docs.py::test_x`,\n"
        "`mmlu/<variant>.json`, `runs/demo/report.html` and [`bench/`](x).\n\n"
        "    locust -f locustfiles/native.py\n    make demo\n",
    )
    assert repository_paths(doc) == {"benchmarks/gone.py", "tests/unit/test_docs.py", "bench/", "locustfiles/native.py"}
    assert missing_paths(doc) == ["benchmarks/gone.py"]
    assert named(MAKE, doc) == {"demo"}


def test_an_unknown_command_or_make_target_is_caught(tmp_path: Path):
    doc = doc_of(tmp_path, "# T\n\n`llamasys frobnicate --x`, `.venv/bin/llamasys run`, `make deploy`\n")
    assert named(LLAMASYS, doc) - subcommands() == {"frobnicate"}
    assert named(MAKE, doc) - make_targets() == {"deploy"}
    assert {"demo", "run", "build", "serve", "report"} <= subcommands()
    assert {"demo", "test", "check", "install"} <= make_targets()
