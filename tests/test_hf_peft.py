"""geolora optimizers on tiny random-weight Hugging Face models (no download).

* LoRA attached with ``inject_lora`` and with ``peft.get_peft_model`` trains from zero init
  (``B = 0``) with every geolora optimizer and AdamW;
* ``lora_param_groups(peft_model)`` gives exactly the hand-built pair groups;
* a real ``transformers.Trainer`` run with :func:`geolora.integrations.create_optimizer`;
* torch conveniences: autocast, bf16 parameters, ``.to(device)``, ``torch.compile``.

The task: a 2-layer BERT (hidden 32) classifies 32 random token sequences by comparing the token
sums of their halves; only the LoRA factors train (the classifier head stays frozen, so a loss
decrease is the LoRA optimizer's doing).
"""

from __future__ import annotations

import copy
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from devices import DEVICES  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from geolora.bench.registry import REGISTRY  # noqa: E402
from geolora.integrations import create_optimizer  # noqa: E402
from geolora.lora import inject_lora  # noqa: E402
from geolora.optim import (  # noqa: E402
    LRACS,
    AdamS,
    LoRAMBoundedRank,
    LoRAMFixedRank,
    LoRAOptimizer,
    LoRARite,
    StiefelLoRA,
    lora_param_groups,
)

hf_logging.set_verbosity_error()

CONFIG = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 16,
    "type_vocab_size": 1,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "num_labels": 2,
    # Large enough that the frozen random head can express a confident classifier.
    "initializer_range": 0.2,
}
TARGETS = ["query", "key", "value", "dense"]
RANK, ALPHA = 4, 8.0
N_PAIRS = 2 * 6 + 1  # per layer: q, k, v, attention.output.dense, intermediate, output; pooler
ATTACH = ("inject_lora", "peft")


def tiny_bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**CONFIG))


def attach_lora(model: nn.Module, how: str) -> nn.Module:
    """LoRA (r=4, alpha=8) on q/k/v and every dense layer, peft-default zero init (``B = 0``)."""
    if how == "inject_lora":
        inject_lora(model, TARGETS, r=RANK, alpha=ALPHA, seed=0)
        return model
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)
    return get_peft_model(model, config)


def lora_model(how: str) -> nn.Module:
    return attach_lora(tiny_bert(), how)


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG["vocab_size"], (32, 8), generator=g)
    labels = (ids[:, :4].sum(1) > ids[:, 4:].sum(1)).long()
    return {"input_ids": ids, "labels": labels}


def train(
    model: nn.Module, opt: torch.optim.Optimizer, steps: int, forward: Callable | None = None
) -> list[float]:
    """``steps`` full-batch steps; the losses before each step."""
    forward = model if forward is None else forward
    data, losses = batch(), []
    for _ in range(steps):
        loss = forward(**data).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def eval_loss(model: nn.Module) -> float:
    return model(**batch()).loss.item()


def b_factors(model: nn.Module) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if "lora_B" in n]


def assert_pairs_left_robust_start(opt: torch.optim.Optimizer) -> None:
    """Every LoRA pair reached the optimizer's own update (not only the AdamW robust start)."""
    pairs = [g for g in opt.param_groups if g.get("lora_pair")]
    assert len(pairs) == N_PAIRS
    for g in pairs:
        assert opt.state[g["params"][0]].get("pair") is True, g["name"]


# name -> (factory, lr): learning rates that train this task in 30 steps from B = 0.
OPTIMIZERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], float]] = {
    "AdamW": (lambda g, lr: torch.optim.AdamW(g, lr=lr, weight_decay=0.0), 3e-3),
    "AdamS": (lambda g, lr: AdamS(g, lr=lr, robust_steps=5), 3e-3),
    "LRACS": (lambda g, lr: LRACS(g, lr=lr, robust_steps=5), 3e-3),
    "LoRARite": (lambda g, lr: LoRARite(g, lr=lr), 1e-2),
    "LoRAMFixedRank": (lambda g, lr: LoRAMFixedRank(g, lr=lr), 3e-3),
    "LoRAMBoundedRank": (lambda g, lr: LoRAMBoundedRank(g, lr=lr), 3e-3),
    "StiefelLoRA": (lambda g, lr: StiefelLoRA(g, lr=lr), 1e-2),
}


@pytest.mark.parametrize("how", ATTACH)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_lora_trains_from_zero_init(how: str, name: str) -> None:
    model = lora_model(how)
    assert all(not b.any() for b in b_factors(model))  # B = 0: the model starts at the base
    assert len(b_factors(model)) == N_PAIRS
    factory, lr = OPTIMIZERS[name]
    opt = factory(lora_param_groups(model), lr)
    losses = train(model, opt, 30)
    final = eval_loss(model)
    assert all(math.isfinite(v) for v in losses) and math.isfinite(final)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert final < 0.5 * losses[0], (name, how, losses[0], final)
    if isinstance(opt, LoRAOptimizer):
        assert_pairs_left_robust_start(opt)


def test_peft_groups_equal_hand_paired_groups() -> None:
    """AdamS on ``lora_param_groups(peft_model)`` == AdamS on groups paired by hand (bitwise)."""
    auto = lora_model("peft")
    hand = copy.deepcopy(auto)
    groups = []
    for name, module in hand.named_modules():
        if isinstance(module, LoraLayer):
            groups.append(
                {
                    "params": [module.lora_B["default"].weight, module.lora_A["default"].weight],
                    "lora_pair": True,
                    "scaling": module.scaling["default"],
                    "name": name,
                }
            )
    assert len(groups) == N_PAIRS
    opt_auto = AdamS(lora_param_groups(auto), lr=3e-3, robust_steps=3)
    opt_hand = AdamS(groups, lr=3e-3, robust_steps=3)
    train(auto, opt_auto, 10)
    train(hand, opt_hand, 10)
    assert_pairs_left_robust_start(opt_auto)
    for (n1, p1), (n2, p2) in zip(auto.named_parameters(), hand.named_parameters(), strict=True):
        assert n1 == n2
        assert torch.equal(p1, p2), n1
    assert any(b.any() for b in b_factors(auto))  # it did train


@pytest.mark.parametrize("how", ATTACH)
def test_trainer_with_create_optimizer(how: str, tmp_path) -> None:
    model = lora_model(how)
    opt = create_optimizer(model, "adams", lr=3e-3, robust_steps=3)
    data = batch()
    dataset = [{k: v[i] for k, v in data.items()} for i in range(len(data["labels"]))]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=32,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        lr_scheduler_type="linear",
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, optimizers=(opt, None))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == list(range(1, 13))
    losses = [h["loss"] for h in logs]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses
    assert_pairs_left_robust_start(opt)
    # The Trainer's scheduler (LambdaLR) drives the geolora optimizer's group lr: linear decay.
    assert isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.LambdaLR)
    lrs = [h["learning_rate"] for h in logs]
    assert lrs == pytest.approx([3e-3 * (1 - k / 12) for k in range(12)], rel=1e-9)
    assert all(g["lr"] == 0.0 and g["initial_lr"] == 3e-3 for g in opt.param_groups)


def test_create_optimizer_names_and_errors() -> None:
    model = lora_model("inject_lora")
    opt = create_optimizer(model)
    assert isinstance(opt, AdamS)
    assert all(g["lr"] == REGISTRY["adams"].default_lr for g in opt.param_groups)
    with pytest.raises(ValueError, match=r"unknown optimizer name 'adam'.*adams.*lifted_shampoo"):
        create_optimizer(model, "adam")
    with pytest.raises(ValueError, match="lr"):
        create_optimizer(model, "adams", lr=-1.0)
    with pytest.raises(TypeError, match="model"):
        create_optimizer(lora_param_groups(model), "adams")
    frozen = tiny_bert().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        create_optimizer(frozen, "adams")


BENCH_NAMES = (
    "adamw", "loraplus", "rpadamw", "lora_rite", "lora_rite_eq14", "adams", "adams_lm", "lracs",
    "loram_fr", "loram_br", "stiefel_lora", "scaled_gd", "lifted_sgd", "lifted_shampoo", "lora_pro",
    "riemannion", "reflora", "reflora_s", "lifted_adam",
)  # fmt: skip


def test_bench_names_cover_the_lora_entries_of_the_registry() -> None:
    from geolora.optim import registry

    lora = {n for n in registry.names() if registry.get(n).adapter == "lora"}
    assert lora <= set(BENCH_NAMES)


@pytest.mark.parametrize("how", ATTACH)
def test_create_optimizer_every_registry_name(how: str) -> None:
    """Every named optimizer builds on the model's groups and takes finite steps."""
    template = lora_model(how)
    n_lora = sum(p.numel() for n, p in template.named_parameters() if "lora_" in n)
    for name in BENCH_NAMES:
        model = copy.deepcopy(template)
        kw = {} if name == "adamw" else {"robust_steps": 1}  # torch AdamW has no robust start
        opt = create_optimizer(model, name, **kw)
        assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n_lora, name
        losses = train(model, opt, 3)
        assert all(math.isfinite(v) for v in losses), name
        assert any(b.any() for b in b_factors(model)), name


# --- torch conveniences -----------------------------------------------------------------------


def test_autocast_bf16_forward_fp32_params() -> None:
    model = lora_model("inject_lora")
    opt = AdamS(lora_param_groups(model), lr=3e-3, robust_steps=3)
    data, losses = batch(), []
    for _ in range(30):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(math.isfinite(v) for v in losses)
    assert eval_loss(model) < 0.5 * losses[0]
    assert_pairs_left_robust_start(opt)


def test_bf16_parameters_fp32_optimizer_state() -> None:
    model = lora_model("inject_lora").to(torch.bfloat16)
    opt = AdamS(lora_param_groups(model), lr=3e-3, robust_steps=3)
    data, losses = batch(), []
    for step in range(30):
        loss = model(**data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        for state in opt.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    assert value.dtype == torch.float32, (step, key, value.dtype)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(math.isfinite(v) for v in losses)
    assert eval_loss(model) < 0.5 * losses[0]
    assert_pairs_left_robust_start(opt)


@pytest.mark.parametrize("device", DEVICES)
def test_to_device_round_trip(device: str) -> None:
    """3 steps on CPU, 3 on ``device`` (optimizer state moved by a state_dict round trip), 3 back
    on CPU == 9 steps on CPU (bitwise on CPU, to float32 accuracy across devices)."""
    ref = lora_model("inject_lora")
    moved = copy.deepcopy(ref)
    opt_ref = AdamS(lora_param_groups(ref), lr=3e-3, robust_steps=2)
    opt = AdamS(lora_param_groups(moved), lr=3e-3, robust_steps=2)
    train(ref, opt_ref, 9)
    train(moved, opt, 3)
    params = [p for p in moved.parameters()]
    moved.to(device)
    assert [p for p in moved.parameters()] == params  # same Parameter objects: opt still owns them
    opt.load_state_dict(opt.state_dict())  # moves the state to the parameters' device
    data = {k: v.to(device) for k, v in batch().items()}
    for _ in range(3):
        loss = moved(**data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.device.type == device for p in moved.parameters())
    moved.to("cpu")
    opt.load_state_dict(opt.state_dict())
    train(moved, opt, 3)
    assert_pairs_left_robust_start(opt)
    for (name, p), q in zip(moved.named_parameters(), ref.parameters(), strict=True):
        if device == "cpu":
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_torch_compile_matches_eager() -> None:
    eager = lora_model("inject_lora")
    compiled = copy.deepcopy(eager)
    opt_e = AdamS(lora_param_groups(eager), lr=3e-3, robust_steps=2)
    opt_c = AdamS(lora_param_groups(compiled), lr=3e-3, robust_steps=2)
    train(eager, opt_e, 5)
    train(compiled, opt_c, 5, forward=torch.compile(compiled, backend="eager"))
    assert_pairs_left_robust_start(opt_c)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0.0, atol=1e-6, msg=name)
    assert any(b.any() for b in b_factors(compiled))
