"""Shakespeare genre passages: a small real text-classification dataset shipped with geolora.

19,767 passages of 20–60 words from the 37 plays, labelled comedy / history / tragedy (First
Folio grouping, late romances counted as comedies), split by play so that the 7 test plays are
unseen in training. See ``SHAKESPEARE_GENRE.md`` next to this file for the source, the genre of
every play, the counts and the rebuild command (``scripts/build_shakespeare_dataset.py``).

Each record is ``{"text": str, "label": int, "genre": str, "play": str, "split": str}`` with
``label == GENRES.index(genre)`` and ``split`` in ``{"train", "test"}``.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from functools import lru_cache
from pathlib import Path

__all__ = [
    "GENRES",
    "SHAKESPEARE_SHA256",
    "SPLITS",
    "dataset_path",
    "load_shakespeare_genre",
    "summary",
]

GENRES = ("comedy", "history", "tragedy")
SPLITS = ("train", "test")
# sha256 of the committed shakespeare_genre.jsonl.gz (rebuilds byte for byte with the script).
SHAKESPEARE_SHA256 = "d027ab45756c29478366e88f40425d64b00aefe3bd1596c9304047a0c9f58c77"


def dataset_path() -> Path:
    """Path of the packaged ``shakespeare_genre.jsonl.gz``."""
    return Path(__file__).resolve().with_name("shakespeare_genre.jsonl.gz")


@lru_cache(maxsize=1)
def _records() -> tuple[dict, ...]:
    with gzip.open(dataset_path(), "rt", encoding="ascii") as f:
        return tuple(json.loads(line) for line in f)


def load_shakespeare_genre(split: str | None = None) -> list[dict]:
    """Records of one split (``"train"`` or ``"test"``), or of both when ``split`` is None.

    Order is the file's: comedies, histories, tragedies, each in First Folio order (Cymbeline and
    Pericles close the comedies), passages in text order within a play.
    Returns fresh dicts, so callers may modify them.
    """
    if split is not None and not isinstance(split, str):
        raise TypeError(f"split must be a str or None, got {type(split).__name__}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    return [dict(r) for r in _records() if split is None or r["split"] == split]


def summary() -> dict[str, dict[str, int]]:
    """Passage counts ``{split: {genre: count}}`` for both splits and the three genres."""
    counts = Counter((r["split"], r["genre"]) for r in _records())
    return {s: {g: counts[(s, g)] for g in GENRES} for s in SPLITS}
