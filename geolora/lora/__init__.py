"""LoRA modules for geolora: injection, initialization, merge, save and load.

``ΔW = s · B A`` with ``B: (out, r)``, ``A: (r, in)``, ``s = alpha / r``; three-factor adapters
``ΔW = s · U S Vᵀ`` (PoLAR, StelLA) in :mod:`geolora.lora.three_factor`.
"""

from geolora.lora.adapters import ADAPTER_KINDS, inject_adapter
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
from geolora.lora.three_factor import (
    THREE_FACTOR_INITS,
    ThreeFactorLinear,
    init_three_factor_,
    inject_three_factor,
    merge_three_factor,
    three_factor_modules,
    unmerge_three_factor,
)
from geolora.lora.three_factor_io import (
    load_three_factor,
    read_three_factor_file,
    save_three_factor,
    three_factor_state_dict,
)

__all__ = [
    "ADAPTER_KINDS",
    "INIT_STRATEGIES",
    "LoRALinear",
    "LoRALoadResult",
    "THREE_FACTOR_INITS",
    "ThreeFactorLinear",
    "init_three_factor_",
    "inject_adapter",
    "inject_three_factor",
    "load_three_factor",
    "merge_three_factor",
    "read_three_factor_file",
    "save_three_factor",
    "three_factor_modules",
    "three_factor_state_dict",
    "unmerge_three_factor",
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
