"""The repository stands alone: no tracked file cites or points to a file outside it.

Papers are cited by authors, title, venue and arXiv / OpenReview id (``docs/index.md``,
``docs/design.md``), never by the name of a local copy; design notes live in ``docs/design.md``.
This test scans every tracked file under the package, the docs, the tests, the benchmarks and the
scripts, and ``README.md``, for references to files that only exist next to a development
checkout (this file is exempt: it has to spell the patterns out).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("geolora", "docs", "tests", "benchmarks", "scripts", "README.md")
EXEMPT = {Path(__file__).resolve().relative_to(ROOT).as_posix()}

#: What a reference to a file outside the repository looks like.
FORBIDDEN = {
    "a papers/ directory": re.compile(r"papers/"),
    "a local copy of a paper": re.compile(
        r"\b(?:lora-s|lora-s-summary|loram|lora-rite|stiefel-lora|stiefel-lora-abstract)\.txt\b",
        re.I,
    ),
    "a design note outside docs/": re.compile(r"\b(?:DESIGN|STYLE|BENCHMARK_PROTOCOL)\.md\b"),
    "the ../shared directory": re.compile(r"\.\./shared\b"),
}


def tracked_files() -> list[str]:
    """Tracked files under :data:`SCANNED` (every file there when git is not available)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--", *SCANNED],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        files = [f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.SubprocessError):
        files = []
    if files:
        return files
    found: list[str] = []
    for entry in SCANNED:
        path = ROOT / entry
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        found += [
            p.relative_to(ROOT).as_posix()
            for p in candidates
            if p.is_file() and "__pycache__" not in p.parts
        ]
    return found


def offending_lines(text: str) -> list[tuple[int, str, str]]:
    """``(line number, what, line)`` for every forbidden reference in ``text``."""
    hits = []
    for no, line in enumerate(text.splitlines(), 1):
        for what, pattern in FORBIDDEN.items():
            if pattern.search(line):
                hits.append((no, what, line.strip()))
    return hits


def test_patterns_catch_what_they_should() -> None:
    bad = [
        "see DESIGN.md",
        "(lora-s.txt eq. 9)",
        "papers/loram.txt",
        "LoRA-RITE (lora-rite.txt, Alg. 1)",
        "stiefel-lora-abstract.txt",
        "../shared/STYLE.md",
    ]
    for line in bad:
        assert offending_lines(line), line
    good = [
        "Zheng & Wu, LoRA-S, ICLR 2026, OpenReview Guo2XGgxZA, eq. 9",
        "docs/design.md",
        "`hamlet_gut.txt`",
        "gpu_perf.txt",
        "shared/ (the device machine's folder)",
    ]
    for line in good:
        assert not offending_lines(line), line


def test_no_reference_to_files_outside_the_repository() -> None:
    files = [f for f in tracked_files() if f not in EXEMPT]
    assert any(f.startswith("geolora/") for f in files) and "README.md" in files
    problems = []
    for rel in files:
        try:
            text = (ROOT / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue  # binary data (images, weights) or deleted in the working tree
        problems += [f"{rel}:{no}: {what}: {line}" for no, what, line in offending_lines(text)]
    assert not problems, "references to files outside the repository:\n" + "\n".join(problems)
