"""The user's own model, data and task: ``--model DIR --data FILE``, ``--task module:Class``, and
a clear error for every bad input before any training starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from geolora.bench.userdata import DataError, load_table
from geolora.cli import main

WORDS = ["storm", "ship", "sea", "wave", "king", "crown", "sword", "throne", "love", "kiss",
         "rose", "heart"]


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """The frozen-layer cache goes to a temporary folder, not the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 16) with a word-level vocabulary, saved like a hub checkpoint."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny_bert")
    vocab = d / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(d)
    cfg = BertConfig(vocab_size=5 + len(WORDS), hidden_size=16, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(d)
    return d


def _texts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Three classes, each with its own words (so the task is learnable)."""
    g = torch.Generator().manual_seed(seed)
    names = ["sea", "court", "romance"]
    rows = []
    for i in range(n):
        c = i % 3
        words = WORDS[4 * c : 4 * c + 4]
        idx = torch.randint(0, 4, (6,), generator=g).tolist()
        rows.append((" ".join(words[j] for j in idx), names[c]))
    return rows


@pytest.fixture
def csv_file(tmp_path) -> Path:
    p = tmp_path / "plays.csv"
    p.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in _texts(60)))
    return p


def _squash(text: str) -> str:
    """Text without whitespace: rich wraps long lines at spaces and drops the space."""
    return "".join(text.split())


def _bench(out: Path, *args: str) -> int:
    return main(["bench", *args, "--steps", "3", "--seeds", "2", "--lr-grid", "2", "--rank", "2",
                 "--optimizers", "adamw,adams", "--workers", "1", "--out", str(out)])


def test_own_model_and_data(tiny_bert, csv_file, tmp_path) -> None:
    out = tmp_path / "out"
    assert _bench(out, "--model", str(tiny_bert), "--data", str(csv_file)) == 0
    data = json.loads((out / "results.json").read_text())
    s = data["summary"]
    assert s["task"] == "plays" and s["primary_metric"] == "accuracy"
    assert {r["optimizer"] for r in s["rows"]} == {"adamw", "adams"}
    assert all(r["n_seeds"] == 2 for r in s["rows"])
    assert 0 < s["baseline"] < 1
    assert len(data["runs"]) == 2 * 2 + 2  # grid of 2 per optimizer, plus seed 1 of each


def test_split_column_and_jsonl(tiny_bert, tmp_path) -> None:
    rows = _texts(30)
    p = tmp_path / "d.jsonl"
    splits = ["train"] * 18 + ["validation"] * 6 + ["test"] * 6
    p.write_text("".join(json.dumps({"sentence": t, "y": lab, "part": sp}) + "\n"
                         for (t, lab), sp in zip(rows, splits)))
    table = load_table(p, text_column="sentence", label_column="y", split_column="part")
    assert [len(table.records[s]) for s in ("train", "val", "test")] == [18, 6, 6]
    assert table.label_names == ["court", "romance", "sea"]
    # integer labels are sorted numerically, and a random split is the same for one seed
    p2 = tmp_path / "ints.csv"
    p2.write_text("text,label\n" + "".join(f"{t},{[10, 2, 1][i % 3]}\n" for i, (t, _) in enumerate(rows)))
    a, b = load_table(p2, seed=3), load_table(p2, seed=3)
    assert a.label_names == ["1", "2", "10"] and a.records == b.records
    assert load_table(p2, seed=4).records != a.records
    out = tmp_path / "out"
    assert _bench(out, "--model", str(tiny_bert), "--data", str(p), "--text-column", "sentence",
                  "--label-column", "y", "--split-column", "part") == 0


BAD_DATA = {
    "missing column": ("t.csv", "text,genre\na b,x\nc d,y\n", "missing column(s) 'label'"),
    "single class": ("t.csv", "text,label\na,x\nb,x\nc,x\nd,x\n", "single class"),
    "empty file": ("t.csv", "", "the file is empty"),
    "header only": ("t.csv", "text,label\n", "no data rows"),
    "unreadable label": ("t.jsonl", '{"text": "a", "label": [1]}\n{"text": "b", "label": 2}\n',
                         "line 1: unreadable label [1]"),
    "null label": ("t.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": null}\n',
                   "line 2: unreadable label None"),
    "fractional label": ("t.jsonl", '{"text": "a", "label": 1.5}\n{"text": "b", "label": 2}\n',
                         "unreadable label 1.5"),
    "bad json": ("t.jsonl", '{"text": "a", "label": 1}\n{"text": "b", \n', "line 2 is not valid JSON"),
    "empty text": ("t.csv", "text,label\na,x\n,y\n", "line 3: empty or non-text value"),
    "unknown format": ("t.parquet", "x", "unknown format '.parquet'"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_refused_before_training(case, tmp_path, capsys) -> None:
    name, text, message = BAD_DATA[case]
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as err:
        load_table(path)
    assert str(path) in str(err.value) and message in str(err.value)
    out = tmp_path / "out"
    assert _bench(out, "--data", str(path)) == 2
    assert _squash(message) in _squash(capsys.readouterr().out)
    assert not (out / "study.db").exists()  # nothing ran


def test_bad_split_values_and_missing_file(tmp_path) -> None:
    p = tmp_path / "s.csv"
    p.write_text("text,label,part\na,x,train\nb,y,holdout\n")
    with pytest.raises(DataError, match="split value 'holdout'"):
        load_table(p, split_column="part")
    p.write_text("text,label,part\na,x,train\nb,y,train\nc,x,test\n")
    with pytest.raises(DataError, match="split\\(s\\) val have no rows"):
        load_table(p, split_column="part")
    with pytest.raises(DataError, match="no such file"):
        load_table(tmp_path / "nope.csv")
    p.write_text("text,label\na,x\nb,y\n")
    with pytest.raises(DataError, match="too few"):
        load_table(p)


def test_bad_model_dir_is_refused_before_training(tiny_bert, csv_file, tmp_path, capsys) -> None:
    import shutil

    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_bert, no_weights)
    (no_weights / "model.safetensors").unlink()
    cases = {
        no_weights: "no weights file",
        tmp_path / "missing": "no such directory",
        csv_file: "not a directory",
    }
    empty = tmp_path / "empty"
    empty.mkdir()
    cases[empty] = "no config.json"
    for model, message in cases.items():
        out = tmp_path / f"out_{model.name}"
        assert _bench(out, "--model", str(model), "--data", str(csv_file)) == 2
        printed = _squash(capsys.readouterr().out)
        assert _squash(str(model)) in printed and _squash(message) in printed, printed
        assert not (out / "study.db").exists()
    assert main(["bench", "--model", str(tiny_bert)]) == 2
    assert _squash("--model needs --data") in _squash(capsys.readouterr().out)


TASK_SOURCE = '''
import torch
from torch import nn
from geolora.bench.adapters import adapt


class Tiny:
    name = "tiny"
    primary_metric = "mse"
    higher_is_better = False
    default_steps = 30
    quick_steps = 10

    def setup(self, seed, rank, device, *, dtype=torch.float32, factor_scale=0.0, init="zero",
              adapter="lora"):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(300, 8, generator=g)
        y = x @ torch.randn(8, 4, generator=g)
        model = nn.Sequential(nn.Linear(8, 4))
        groups = adapt(model, adapter, rank=rank, seed=seed, init=init, factor_scale=factor_scale)
        return Run(model, groups, x, y, seed)


class Run:
    def __init__(self, model, groups, x, y, seed):
        self.model, self.groups, self.x, self.y = model, groups, x, y
        self.gen = torch.Generator().manual_seed(seed)

    def param_groups(self):
        return self.groups

    def batches(self):
        while True:
            idx = torch.randint(0, 200, (16,), generator=self.gen)
            yield self.x[idx], self.y[idx]

    def loss(self, batch):
        return (self.model(batch[0]) - batch[1]).pow(2).mean()

    @torch.no_grad()
    def evaluate(self, split):
        rows = slice(200, 250) if split == "val" else slice(250, 300)
        return {"mse": float((self.model(self.x[rows]) - self.y[rows]).pow(2).mean())}


class NotATask:
    name = "x"
'''


def test_user_task_from_file_and_module(tmp_path, monkeypatch) -> None:
    src = tmp_path / "my_bench_task.py"
    src.write_text(TASK_SOURCE)
    out = tmp_path / "out"
    assert _bench(out, "--task", f"{src}:Tiny") == 0
    first = json.loads((out / "results.json").read_text())["summary"]
    assert first["task"] == "tiny" and first["primary_metric"] == "mse"
    monkeypatch.syspath_prepend(str(tmp_path))
    out2 = tmp_path / "out2"
    assert _bench(out2, "--task", "my_bench_task:Tiny") == 0
    second = json.loads((out2 / "results.json").read_text())["summary"]
    assert [r["mean"] for r in second["rows"]] == [r["mean"] for r in first["rows"]]


@pytest.mark.parametrize(
    "ref, message",
    [
        ("no_such_module_xyz:Task", "cannot import module 'no_such_module_xyz'"),
        ("my_bench_task2:Missing", "has no attribute 'Missing'"),
        ("my_bench_task2:NotATask", "NotATask is not a Task"),
        ("nothing_here.py:Tiny", "no such file"),
        ("sensingg", "unknown task"),
    ],
)
def test_bad_task_is_refused(ref, message, tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "my_bench_task2.py").write_text(TASK_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert _bench(tmp_path / "out", "--task", ref) == 2
    assert _squash(message) in _squash(capsys.readouterr().out)
