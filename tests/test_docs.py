"""The repository explains itself: every `§` the code cites resolves to a heading in docs/, and no tracked file points
outside the repository (docs/README.md says how references resolve).

Citations walked (in dsv4_lab/, tests/, notebooks/, benchmarks/, scripts/ and README.md):
    docs §2.3                   -> docs/architecture.md, heading "2.3"
    docs/kernels.md §9.1        -> docs/kernels.md, heading "9.1" (any docs/<file>.md the same way)
    docs §2.1-2.2, §6.3         -> a chain: every label after the first belongs to the same file; in a range "5.1.1-2"
                                   the short end replaces the last component (5.1.2)
    docs/hf_parity.md 9b, H1    -> items of that file: "9b" is item A.9b, "H1" hazard H1
A heading's label is its first word without a trailing "." ("### 2.3 Token-level compressor" -> "2.3",
"## Appendix A. FLOPs" -> "A", "### A.9b Hash routing" -> "A.9b"). `docs §x` (the placeholder in config.py's
docstring) is not a citation.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SCAN_DIRS = ("dsv4_lab", "tests", "notebooks", "benchmarks", "scripts")
SCAN_SUFFIXES = {".py", ".ipynb", ".md", ".sh", ".json", ".txt", ".toml", ".cfg", ".yml", ".yaml"}

LABEL = r"(?:[0-9]+(?:\.[0-9]+)*(?:-§?[0-9]+(?:\.[0-9]+)*)?|[A-E](?:\.[0-9]+[a-z]?)?)"
ITEM = r"(?:[0-9]+[a-z]|H[0-9]+|A\.[0-9]+[a-z]?)(?![\w.])"         # hf_parity.md items: 9b, H1, A.1
CITE = re.compile(r"docs(?:/(?P<file>[a-z_]+)\.md)?(?P<labels> (?:§" + LABEL + "|" + ITEM + r")"
                  r"(?:[,;]? (?:and )?(?:§" + LABEL + "|" + ITEM + r"))*)")
ONE = re.compile(r"§(" + LABEL + r")|(" + ITEM + r")")


def _heading_labels(md: Path) -> set[str]:
    labels = set()
    for line in md.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#{1,6}\s+(?:Appendix\s+)?(\S+)", line)
        if m:
            labels.add(m.group(1).rstrip(".").lstrip("§"))
    return labels


def _expand(label: str) -> list[str]:
    """'§2.1-2.2' -> ['2.1', '2.2']; '5.1.1-2' -> ['5.1.1', '5.1.2']; '2-§3' -> ['2', '3']."""
    label = label.lstrip("§")
    if "-" not in label:
        return [label]
    a, b = (s.lstrip("§") for s in label.split("-", 1))
    pa, pb = a.split("."), b.split(".")
    if len(pb) < len(pa):
        pb = pa[:len(pa) - len(pb)] + pb
    return [a, ".".join(pb)]


def _citations():
    """(file of the citation, line number, docs file name, label) for every label cited."""
    paths = [ROOT / "README.md"]
    for d in SCAN_DIRS:
        paths += [p for p in sorted((ROOT / d).rglob("*")) if p.is_file() and p.suffix in SCAN_SUFFIXES
                  and ".ipynb_checkpoints" not in p.parts and "__pycache__" not in p.parts]
    out = []
    for p in paths:
        if p.resolve() == Path(__file__).resolve():
            continue                                          # this docstring's examples are not citations
        for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for m in CITE.finditer(line):
                doc = (m.group("file") or "architecture") + ".md"
                for a, b in ONE.findall(m.group("labels")):
                    for lab in _expand(a or b):
                        out.append((p.relative_to(ROOT).as_posix(), n, doc, lab))
    return out


def _resolves(doc: str, label: str, labels: set[str]) -> bool:
    if label in labels:
        return True
    if doc == "hf_parity.md" and re.fullmatch(r"[0-9]+[a-z]?|[0-9]+", label):
        return f"A.{label}" in labels                         # "9b" = item 9b of section A
    return False


def test_citations_are_found():
    """The walker sees the citations the code is known to make (guards against a regex that matches nothing)."""
    cites = _citations()
    seen = {(doc, lab) for _, _, doc, lab in cites}
    for must in [("architecture.md", "2.3"), ("architecture.md", "5.1.5"), ("kernels.md", "9.1"),
                 ("methodology.md", "3.4"), ("hf_parity.md", "E"), ("hf_parity.md", "9c")]:
        assert must in seen, f"no citation {must} found: the citation pattern is broken"
    assert len(cites) > 200


def test_every_cited_section_exists():
    docs_files = {p.name for p in DOCS.glob("*.md")}
    heads = {name: _heading_labels(DOCS / name) for name in docs_files}
    missing = []
    for src, line, doc, label in _citations():
        if doc not in docs_files:
            missing.append(f"{src}:{line}: docs/{doc} does not exist")
        elif not _resolves(doc, label, heads[doc]):
            missing.append(f"{src}:{line}: docs/{doc} has no heading §{label}")
    assert not missing, "\n".join(sorted(set(missing)))


def test_cited_plain_docs_files_exist():
    """`docs/<file>.md` cited without a section (e.g. docs/toolchain.md) must exist too."""
    missing = []
    for d in SCAN_DIRS + ("README.md",):
        for p in ([ROOT / d] if (ROOT / d).is_file() else (ROOT / d).rglob("*")):
            if p.is_file() and p.suffix in SCAN_SUFFIXES:
                for m in re.finditer(r"docs/([A-Za-z_]+\.md)", p.read_text(encoding="utf-8", errors="replace")):
                    if not (DOCS / m.group(1)).exists():
                        missing.append(f"{p.relative_to(ROOT)}: docs/{m.group(1)}")
    assert not missing, "\n".join(sorted(set(missing)))


# strings assembled so that this file does not match itself
_FORBIDDEN = re.compile("|".join([re.escape("shared" + "/design"), re.escape("/" + "work/"),
                                  r"/" + "home/[A-Za-z0-9_.-]+", r"/" + "Users/[A-Za-z0-9_.-]+", r"(?<![\w.])/" + "root/"]))


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / f for f in out.decode().split("\0") if f]


def test_no_file_points_outside_the_repository():
    bad = []
    for p in _tracked_files():
        if not p.is_file():
            continue
        data = p.read_bytes()
        if b"\0" in data[:8192]:
            continue                                          # binary (PNG, checkpoints)
        for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            m = _FORBIDDEN.search(line)
            if m:
                bad.append(f"{p.relative_to(ROOT)}:{n}: {m.group(0)!r}")
    assert not bad, "tracked files mention paths outside the repository:\n" + "\n".join(bad[:50])


def test_forbidden_pattern_catches_examples():
    for s in ["see shared" + "/design/x.md", "/" + "work/main/x", "/" + "home/alice/x", "cd /" + "root/x"]:
        assert _FORBIDDEN.search(s), s
    assert not _FORBIDDEN.search("docs/architecture.md §2.3 and benchmarks/results/x.json")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_in_docs_resolve():
    """[text](file.md#anchor) links in docs/ and the README point at an existing file and heading."""
    bad = []
    for md in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#:\s]*)(?:#([^)\s]+))?\)", md.read_text(encoding="utf-8")):
            path = (md.parent / target).resolve() if target else md
            if not path.exists():
                bad.append(f"{md.relative_to(ROOT)}: {target} does not exist")
            elif anchor and path.suffix == ".md":
                slugs = {_slug(re.sub(r"^#+", "", line)) for line in path.read_text(encoding="utf-8").splitlines()
                         if line.startswith("#")}
                if anchor not in slugs:
                    bad.append(f"{md.relative_to(ROOT)}: no heading #{anchor} in {target or md.name}")
    assert not bad, "\n".join(bad)
