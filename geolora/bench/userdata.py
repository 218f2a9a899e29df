"""A user's labelled texts for ``geolora bench --data FILE``: read, check, split.

The file is CSV (header row) or JSON Lines (one object per line), with a text column and a
label column; labels are any strings or integers, mapped to ``0..C−1`` in sorted order
(integers numerically). The split comes from a column (values ``train``, ``val`` or
``validation``, ``test``) or is drawn at random with a fixed seed. Every problem raises
:class:`DataError` naming the file (and the line where one is at fault) before any model is
loaded or any training starts.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DataError", "TableData", "load_table"]

_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val",
                "test": "test"}


class DataError(ValueError):
    """A data file the bench cannot use; the message names the file and the problem."""


@dataclass
class TableData:
    """Records per split (``{"text": str, "label": int}``) and the label names (index = label)."""

    records: dict[str, list[dict[str, Any]]]
    label_names: list[str]
    path: Path

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def _rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` of a CSV or JSONL file."""
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"--data {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not text.strip():
        raise DataError(f"--data {path}: the file is empty")
    rows: list[tuple[int, dict[str, Any]]] = []
    if suffix in (".jsonl", ".ndjson"):
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"--data {path}: line {i} is not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"--data {path}: line {i} is a JSON {type(obj).__name__}, not an object")
            rows.append((i, obj))
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        for i, row in enumerate(reader, start=2):  # line 1 is the header
            if None in row:
                raise DataError(f"--data {path}: line {i} has more fields than the header")
            rows.append((i, dict(row)))
    else:
        raise DataError(f"--data {path}: unknown format {suffix or '(no suffix)'!r}; use .csv, .tsv or .jsonl")
    if not rows:
        raise DataError(f"--data {path}: no data rows (only a header or blank lines)")
    return rows


def _label_key(value: Any, path: Path, line: int, column: str) -> tuple[int, Any]:
    """A sortable key of one label: integers numerically, then strings; bad values raise."""
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        raise DataError(f"--data {path}: line {line}: unreadable label {value!r} in column {column!r}")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise DataError(f"--data {path}: line {line}: unreadable label {value!r} in column {column!r} "
                            "(labels are class names or integers)")
        value = int(value)
    if isinstance(value, int):
        return (0, value)
    s = str(value).strip()
    if not s:
        raise DataError(f"--data {path}: line {line}: empty label in column {column!r}")
    try:
        return (0, int(s))
    except ValueError:
        return (1, s)


def load_table(
    path: str | os.PathLike[str],
    *,
    text_column: str = "text",
    label_column: str = "label",
    split_column: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> TableData:
    """Read ``path`` and split it into train / val / test.

    Args:
        text_column, label_column: column names (CSV header fields or JSON keys).
        split_column: column holding ``train`` / ``val`` (or ``validation``) / ``test``; None
            draws the split at random: a seeded permutation, the first ``test_fraction`` of the
            rows are test, the next ``val_fraction`` validation, the rest training.
        seed: seed of the random split.

    Raises:
        DataError: missing file or columns, empty file, bad JSON, an empty text, an
            unreadable or empty label, a single class, an unknown split value, an empty split.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"--data {p}: no such file")
    if not p.is_file():
        raise DataError(f"--data {p}: not a file")
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < frac < 1:
            raise DataError(f"{name} must be in (0, 1), got {frac!r}")
    if val_fraction + test_fraction >= 1:
        raise DataError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")
    rows = _rows(p)
    columns = [text_column, label_column] + ([split_column] if split_column else [])
    seen = set().union(*(r.keys() for _, r in rows))
    missing = [c for c in columns if c not in seen]
    if missing:
        raise DataError(
            f"--data {p}: missing column(s) {', '.join(repr(c) for c in missing)}; "
            f"the file has {', '.join(repr(c) for c in sorted(seen))}"
        )
    texts, keys, splits = [], [], []
    for line, r in rows:
        for c in columns:
            if c not in r:
                raise DataError(f"--data {p}: line {line} has no {c!r} field")
        text = r[text_column]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"--data {p}: line {line}: empty or non-text value in column {text_column!r}")
        texts.append(text)
        keys.append(_label_key(r[label_column], p, line, label_column))
        if split_column:
            raw = str(r[split_column]).strip().lower()
            if raw not in _SPLIT_NAMES:
                raise DataError(
                    f"--data {p}: line {line}: split value {r[split_column]!r} in column "
                    f"{split_column!r} is not one of train, val, validation, test"
                )
            splits.append(_SPLIT_NAMES[raw])
    classes = sorted(set(keys))
    if len(classes) < 2:
        raise DataError(
            f"--data {p}: column {label_column!r} has a single class ({classes[0][1]!r}); "
            "a classification task needs at least two"
        )
    index = {k: i for i, k in enumerate(classes)}
    records = [{"text": t, "label": index[k]} for t, k in zip(texts, keys)]
    out: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    if split_column:
        for rec, sp in zip(records, splits):
            out[sp].append(rec)
    else:
        import torch

        n = len(records)
        n_test, n_val = round(test_fraction * n), round(val_fraction * n)
        if n_test < 1 or n_val < 1 or n - n_test - n_val < 2:
            raise DataError(
                f"--data {p}: {n} rows are too few for a random split with val_fraction "
                f"{val_fraction} and test_fraction {test_fraction}"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        out["test"] = [records[i] for i in order[:n_test]]
        out["val"] = [records[i] for i in order[n_test : n_test + n_val]]
        out["train"] = [records[i] for i in order[n_test + n_val :]]
    empty = [s for s in ("train", "val", "test") if not out[s]]
    if empty:
        raise DataError(f"--data {p}: split(s) {', '.join(empty)} have no rows (column {split_column!r})")
    if len({r["label"] for r in out["train"]}) < 2:
        raise DataError(f"--data {p}: the training split has a single class")
    return TableData(out, [str(k[1]) for k in classes], p)
