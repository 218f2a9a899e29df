"""LoRA modules for geolora: injection, initialization, merge, save and load.

``ΔW = s · B A`` with ``B: (out, r)``, ``A: (r, in)``, ``s = alpha / r`` (DESIGN.md).
"""

from geolora.lora.init import INIT_STRATEGIES, init_lora_, spectral_init_
from geolora.lora.io import LoRALoadResult, load_lora, lora_state_dict, read_lora_file, save_lora
from geolora.lora.layers import (
    LoRALinear,
    disable_lora,
    inject_lora,
    lora_modules,
    mark_only_lora_trainable,
    merge_lora,
    unmerge_lora,
)

__all__ = [
    "INIT_STRATEGIES",
    "LoRALinear",
    "LoRALoadResult",
    "disable_lora",
    "init_lora_",
    "inject_lora",
    "load_lora",
    "lora_modules",
    "lora_state_dict",
    "mark_only_lora_trainable",
    "merge_lora",
    "read_lora_file",
    "save_lora",
    "spectral_init_",
    "unmerge_lora",
]
