"""geolora optimizers on sharded LoRA factors through ``accelerate`` (FSDP2 plugin) and the
Hugging Face ``Trainer`` (``fsdp`` settings), on CPU with gloo and 2 processes (one spawn).

``accelerate`` engages FSDP only on accelerator devices: on CPU it sets up plain multi-process
data parallelism and ignores the plugin (``AcceleratorState`` records ``fsdp_plugin`` only for
GPU-like distributed types). The tests switch FSDP on right after the ``Accelerator`` is built
(:func:`_force_fsdp`); everything after that is accelerate's own FSDP2 path —
``fsdp2_prepare_model`` (``fully_shard`` of the model, its default ``Shard(0)`` placements) and
the swap of the optimizer's parameters for the sharded ``DTensor`` s.

* accelerate, float64, a manual loop: the factors after 6 steps equal one process on the same
  global batch to 1e-12, with FSDP2's default placements (``lora_A`` split along ``r``: the
  optimizer gathers it) and with the LoRA modules sharded beforehand by ``fully_shard(...,
  shard_placement_fn=fsdp2_shard_placement(model))`` (``lora_A`` row-sharded, nothing
  gathered; accelerate leaves modules that are already sharded alone) — ScaledGD in both,
  LoRA-RITE row-sharded too (to 1e-11: its sharded frames come from CholeskyQR2).
* Trainer: a tiny peft-LoRA BERT (built from a config, no download) trained for 4 steps by
  ``trainer_class(transformers.Trainer, "scaled_gd", ...)`` with ``fsdp=True``,
  ``fsdp_config={"version": 2, ...}``: the LoRA factors are ``DTensor`` s, geolora stepped them
  (robust start, then ScaledGD on the gathered/row-sharded factors), the loss is finite and both
  ranks hold the same factors.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import regression_batch  # noqa: E402
from tiny_models import trainable_parameters as whole  # noqa: E402

pytestmark = pytest.mark.slow

#: Forked workers inherit the imported torch (a spawned one spends seconds importing it again,
#: most of this file's run time); no process group exists in the parent.
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

WORLD = 2
GLOBAL_BATCH = 8
STEPS = 6


def build_model() -> nn.Module:
    """``12 → 14 → 3`` float64 MLP, geolora LoRA (r = 4, Gaussian init) on the first linear."""
    from geolora.lora import inject_lora, mark_only_lora_trainable

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 14), nn.Tanh(), nn.Linear(14, 3))
    inject_lora(model, ["0"], r=4, alpha=8.0, init="gaussian", seed=1)
    mark_only_lora_trainable(model, keep=["2"])
    return model.double()


def make_optimizer(model: nn.Module, name: str = "scaled_gd") -> torch.optim.Optimizer:
    from geolora.optim import LoRAMBoundedRank, LoRARite, ScaledGD
    from geolora.optim.groups import lora_param_groups

    if name == "lora_rite":
        return LoRARite(lora_param_groups(model), lr=1e-2)
    if name == "loram_br":  # an owned point (K, V) entered on the shards
        return LoRAMBoundedRank(lora_param_groups(model), lr=1e-2)
    return ScaledGD(lora_param_groups(model), lr=5e-2, momentum=0.9)


#: accelerate case -> (optimizer, LoRA modules sharded beforehand, tolerance vs one process);
#: LoRA-RITE's sharded frames come from CholeskyQR2, one process's from Householder QR
#: (tests/test_sharded.py, TOL64_OPT), hence its looser bound
ACCELERATE_CASES = {
    "accelerate_default": ("scaled_gd", False, 1e-12),
    "accelerate_presharded": ("scaled_gd", True, 1e-12),
    "accelerate_presharded_rite": ("lora_rite", True, 1e-11),
    "accelerate_presharded_loram_br": ("loram_br", True, 1e-12),
}


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return regression_batch(step, GLOBAL_BATCH, 12, 3, seed=50)


def single_process(name: str = "scaled_gd") -> dict[str, torch.Tensor]:
    model = build_model()
    opt = make_optimizer(model, name)
    for t in range(STEPS):
        x, y = batch(t)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return whole(model)


def _force_fsdp(accelerator: Any, plugin: Any) -> None:
    """Switch accelerate's FSDP2 path on (it is GPU-only; see the module docstring)."""
    from accelerate.utils import DistributedType

    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP


def _reset_accelerate() -> None:
    """Forget accelerate's process-wide state (a forked worker inherits the parent's)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _run_accelerate(rank: int, presharded: bool, name: str = "scaled_gd") -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    _reset_accelerate()
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    acc = Accelerator(fsdp_plugin=plugin, cpu=True)
    _force_fsdp(acc, plugin)
    model = build_model()
    if presharded:  # the row-sharded recipe: LoRA modules sharded before prepare()
        from torch.distributed.fsdp import fully_shard

        from geolora.lora import lora_modules
        from geolora.optim.sharding import fsdp2_shard_placement

        fn = fsdp2_shard_placement(model)
        for module in lora_modules(model).values():
            fully_shard(module, shard_placement_fn=fn)
    opt = make_optimizer(model, name)
    model, opt = acc.prepare(model, opt)
    rows = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
    for t in range(STEPS):
        x, y = batch(t)
        opt.zero_grad()
        acc.backward(((model(x[rows]) - y[rows]) ** 2).mean())
        opt.step()
    placements = {
        n: str(tuple(p.placements)) for n, p in model.named_parameters() if p.requires_grad
    }
    return {"params": whole(model), "placements": placements}


def _run_trainer(rank: int, out: str) -> dict[str, Any]:
    import peft
    from accelerate.utils import FullyShardedDataParallelPlugin

    from geolora.integrations.hf import trainer_class

    _reset_accelerate()
    cfg = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=2,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    lora = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    model = peft.get_peft_model(model, lora)
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(0, 40, (8,), generator=g), "labels": i % 2} for i in range(32)
    ]
    start = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    base = trainer_class(
        transformers.Trainer, "scaled_gd", lr=1e-2, robust_steps=1, momentum=0.9
    )

    class CPUFSDPTrainer(base):  # type: ignore[misc,valid-type]
        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            _force_fsdp(self.accelerator, FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args))
            self.is_fsdp_enabled = True

    args = transformers.TrainingArguments(
        output_dir=out, use_cpu=True, fsdp=True,
        # BertLayer only: accelerate 1.16 re-shards the word embeddings that the default
        # policy (BERT's _no_split_modules, BertEmbeddings included) already sharded
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]},
        max_steps=4, per_device_train_batch_size=4, save_strategy="no", report_to=[],
        logging_steps=1, seed=0, disable_tqdm=True,
    )
    trainer = CPUFSDPTrainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    opt = trainer.optimizer.optimizer  # accelerate's AcceleratedOptimizer wraps ours
    factors = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    state_kinds = sorted(
        {type(v).__name__ for st in opt.state.values() for v in st.values()
         if isinstance(v, torch.Tensor) and v.dim() > 0}
    )
    return {
        "optimizer": type(opt).__name__,
        "loss": float(result.training_loss),
        "factor_types": sorted({type(p).__name__ for p in factors.values()}),
        "moved": sorted(
            n for n, p in factors.items() if not torch.equal(p.full_tensor(), start[n])
        ),
        "params": {n: p.detach().full_tensor() for n, p in factors.items()},
        "state_kinds": state_kinds,
        "pair_steps": sorted(
            int(st["step"].item()) for st in opt.state.values() if "pair" in st
        ),
    }


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    cases: dict[str, Any] = {
        case: (lambda opt=opt, pre=pre: _run_accelerate(rank, pre, opt))
        for case, (opt, pre, _) in ACCELERATE_CASES.items()
    }
    cases["trainer"] = lambda: _run_trainer(rank, str(Path(out) / "trainer"))
    try:
        for name, run in cases.items():
            try:
                results[name] = run()
            except Exception as exc:  # noqa: BLE001 - reported per case by the tests
                results[name] = f"{type(exc).__name__}: {exc}"
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("frameworks")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(port, str(out)), nprocs=WORLD, start_method=START_METHOD)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _ok(res: Any) -> Any:
    assert not isinstance(res, str), res
    return res


@pytest.mark.parametrize("case", list(ACCELERATE_CASES))
def test_accelerate_fsdp2_equals_single_process(case: str, runs) -> None:
    opt_name, presharded, tol = ACCELERATE_CASES[case]
    got = [_ok(r[case]) for r in runs]
    want = single_process(opt_name)
    start = whole(build_model())
    for n, w in want.items():
        assert not torch.equal(w, start[n]), f"{n} not trained"
        for r in got:
            err = (r["params"][n] - w).abs().max().item()
            assert err <= tol, f"{n}: max |accelerate − single| = {err:.3g}"
    pl = got[0]["placements"]
    assert pl["0.lora_B"] == "(Shard(dim=0),)"
    assert pl["0.lora_A"] == ("(Shard(dim=1),)" if presharded else "(Shard(dim=0),)")


def test_trainer_fsdp2_with_geolora_optimizer(runs) -> None:
    got = [_ok(r["trainer"]) for r in runs]
    r0 = got[0]
    assert r0["optimizer"] == "ScaledGD"
    assert r0["factor_types"] == ["DTensor"]
    assert len(r0["moved"]) == 4  # both factors of both pairs were trained
    assert torch.isfinite(torch.tensor(r0["loss"]))
    assert r0["pair_steps"] == [3, 3]  # one robust step, then three ScaledGD steps
    assert r0["state_kinds"] == ["DTensor", "Tensor"]  # momentum_M sharded, momentum_N whole
    for n, p in r0["params"].items():
        assert torch.equal(p, got[1]["params"][n]), n
