"""The repository stands alone: no file in it points at documents that live outside it.

Developer notes kept next to a checkout are not part of the product, so a reference to them is
a dead end for every other reader; docs/ALGORITHMS.md and docs/CONTRACT.md carry those facts
instead. Relative Markdown links are checked as well, so the in-repo pointers that replaced the
outside ones keep resolving (to a file, and to a heading when they name one).

Files examined: everything git tracks plus new files it does not ignore (so that a document is
checked before its first commit, and a link to a page added in the same change resolves).
"""

from __future__ import annotations

import posixpath
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from functools import cache
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Built from pieces so that this file does not contain the strings it looks for.
ALGORITHMS = "ALGORITHMS" + ".md"
FORBIDDEN = ("DESIGN" + ".md", "STYLE" + ".md", "/work" + "/shared", "shared" + "/docs")
# Generated data (benchmark output), not prose anyone reads for pointers.
SKIPPED = frozenset({"bench/quality/results/results.json"})

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
INLINE_LINK = re.compile(r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _git_files() -> list[str]:
    """Repository-relative paths of tracked and not-ignored files, or a pytest skip."""
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    top = subprocess.run(
        [git, "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True, text=True
    )
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != ROOT:
        pytest.skip(f"{ROOT} is not the top of a git checkout")
    listed = subprocess.run(
        [git, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    names = {p.decode("utf-8") for p in listed.stdout.split(b"\0") if p}
    # A file deleted in the working tree but still in the index is not there to read.
    return sorted(n for n in names if (ROOT / n).is_file())


@cache
def _files() -> tuple[str, ...]:
    return tuple(_git_files())


def _text(rel: str) -> str | None:
    """The file's text, or None for binary files (NUL bytes or not UTF-8)."""
    data = (ROOT / rel).read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def _outside_references(rel: str, text: str) -> Iterator[str]:
    """Every mention of an outside document in one file, as 'path:line: what'."""
    for needle in FORBIDDEN:
        for hit in re.finditer(re.escape(needle), text):
            yield f"{rel}:{_line_of(text, hit.start())}: mentions {needle!r}"
    # The in-repo page is fine as "docs/<name>" from anywhere, or as the target of a relative
    # Markdown link from a file in docs/ ("](<name>" or "](<name>#..."), which the link test
    # resolves. Any other mention is taken to mean the outside document of that name.
    in_docs = rel.startswith("docs/")
    for hit in re.finditer(re.escape(ALGORITHMS), text):
        before = text[: hit.start()]
        if before.endswith("docs/") or (in_docs and before.endswith("](")):
            continue
        yield (
            f"{rel}:{_line_of(text, hit.start())}: mentions {ALGORITHMS!r} "
            f"(write docs/{ALGORITHMS}, or link to it from docs/)"
        )


def test_no_file_refers_to_documents_outside_the_repository() -> None:
    """Outside documents are not shipped: a pointer to one leaves the reader nowhere."""
    problems: list[str] = []
    for rel in _files():
        if rel in SKIPPED:
            continue
        text = _text(rel)
        if text is not None:
            problems.extend(_outside_references(rel, text))
    if problems:
        pytest.fail("references to documents outside the repository:\n" + "\n".join(problems))


def _prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with inline code spans blanked."""
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        opened = FENCE.match(line)
        if fence is not None:
            if opened and opened.group(1)[0] == fence[0] and len(opened.group(1)) >= len(fence):
                fence = None
            continue
        if opened:
            fence = opened.group(1)
            continue
        yield number, CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@cache
def _anchors(rel: str) -> frozenset[str]:
    """Anchors of every ATX heading in a Markdown file (repeats get -1, -2, ... as on GitHub)."""
    text = _text(rel) or ""
    seen: Counter[str] = Counter()
    out: set[str] = set()
    for _, line in _prose_lines(text):
        match = HEADING.match(line)
        if match is None:
            continue
        slug = _slug(match.group(2))
        out.add(slug if seen[slug] == 0 else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return frozenset(out)


def _link_targets(text: str) -> Iterator[tuple[int, str]]:
    for number, line in _prose_lines(text):
        for match in INLINE_LINK.finditer(line):
            yield number, match.group(1)
        definition = REFERENCE_DEF.match(line)
        if definition:
            yield number, definition.group(1)


def _broken_link(rel: str, target: str, files: frozenset[str], dirs: frozenset[str]) -> str:
    """Why a relative link from `rel` does not resolve inside the repository ('' if it does)."""
    path, _, fragment = target.partition("#")
    path = unquote(path)
    if path.startswith("/"):  # GitHub resolves a leading slash from the repository root
        resolved = posixpath.normpath(path.lstrip("/"))
    else:
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), path))
    if resolved == ".." or resolved.startswith("../"):
        return "leaves the repository"
    if resolved not in files and resolved not in dirs:
        return f"{resolved} is not a file of the repository"
    if not fragment or not resolved.endswith(".md") or resolved not in files:
        return ""
    if unquote(fragment).lower() not in _anchors(resolved):
        return f"{resolved} has no heading with anchor #{fragment}"
    return ""


def test_relative_markdown_links_resolve() -> None:
    """A relative link in a Markdown file must reach a file (and heading) of the repository."""
    files = frozenset(_files())
    dirs = frozenset(str(parent) for f in files for parent in PurePosixPath(f).parents)
    problems: list[str] = []
    for rel in sorted(f for f in files if f.endswith(".md")):
        text = _text(rel)
        if text is None:
            continue
        for number, target in _link_targets(text):
            if not target or target.startswith("#") or SCHEME.match(target):
                continue  # external (http, https, mailto, ...) or an anchor in the same page
            why = _broken_link(rel, target, files, dirs)
            if why:
                problems.append(f"{rel}:{number}: link ({target}) {why}")
    if problems:
        pytest.fail("broken relative Markdown links:\n" + "\n".join(problems))
