"""Stage: reading an adapter. A standard PEFT LoRA directory (or hub id) read with stock ``peft``'s own readers
(``PeftConfig.from_pretrained``, ``peft.utils.load_peft_weights``) into the factors composition uses, keyed by the base
model's own module names:

    A_j[m]: [r_jm, d_in]     lora_A weight
    B_j[m]: [d_out, r_jm]    lora_B weight multiplied by the adapter's own scaling at m,
                             s_jm = alpha_jm / r_jm (alpha_jm / sqrt(r_jm) with rsLoRA), where r_jm and alpha_jm
                             follow ``rank_pattern`` / ``alpha_pattern`` with peft's own key matching

An adapter that is not LoRA factors that compose (DoRA, trained biases, ``modules_to_save``, embedding LoRAs), that
does not fit the base model, or cannot be read is refused with an :class:`utils.data.InputError` naming it and the fix.
:mod:`utils.adapter_pool` keeps what is read in its tiers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from utils.data import InputError

# peft's saved keys: "<prefix>.<module>.lora_A.weight" (older files may name the adapter: ".lora_A.default.weight").
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.[^.]+)?\.weight$")
_PREFIX = "base_model.model."


@dataclass
class LoraWeights:
    """One adapter's factors per base-model module (shapes in the module docstring), on one device each."""

    name: str
    path: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A [r, d_in], B [d_out, r] * s)
    nbytes: int = 0
    rank: int = 0  # the largest rank over its modules

    def to_devices(self, devices: dict[str, torch.device]) -> "LoraWeights":
        """A copy whose factors at module m live on ``devices[m]`` (the same tensors where they already do)."""
        moved = {m: (a.to(devices[m], non_blocking=True), b.to(devices[m], non_blocking=True)) for m, (a, b) in self.modules.items()}
        return LoraWeights(self.name, self.path, moved, self.nbytes, self.rank)


def targetable_modules(model) -> dict[str, torch.nn.Module]:
    """The base model's modules a LoRA can target here: ``nn.Linear`` (quantised ones included) and GPT-2's ``Conv1D``."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            out[name] = module
    return out


def module_shape(module) -> tuple[int, int]:
    """(d_in, d_out) of a Linear or Conv1D module."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    w = module.weight  # Conv1D: weight [d_in, d_out]
    return int(w.shape[0]), int(w.shape[1])


def _lora_config(name: str, path: str):
    from peft import PeftConfig

    try:
        cfg = PeftConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise InputError(f"Adapter {name!r}: cannot read the adapter config at {path} ({str(err).splitlines()[0][:200]}); "
                         "give a PEFT LoRA directory with adapter_config.json.") from err
    peft_type = getattr(cfg.peft_type, "value", cfg.peft_type)
    if str(peft_type).upper() != "LORA":
        raise InputError(f"Adapter {name!r} at {path} is a {peft_type} adapter, not a LoRA; only LoRA adapters compose here.")
    for attr, what in (("use_dora", "DoRA"), ("lora_bias", "a LoRA bias"), ("use_qalora", "QALoRA")):
        if getattr(cfg, attr, False):
            raise InputError(f"Adapter {name!r} at {path} uses {what}; only plain LoRA composes here.")
    if getattr(cfg, "bias", "none") not in (None, "none"):
        raise InputError(f"Adapter {name!r} at {path} trains biases (bias={cfg.bias!r}), which change the base model; "
                         "only plain LoRA (bias 'none') composes here.")
    if getattr(cfg, "modules_to_save", None):
        raise InputError(f"Adapter {name!r} at {path} saves whole modules ({cfg.modules_to_save}), which replace the base "
                         "model's; only LoRA factors compose here.")
    if getattr(cfg, "use_rslora", False) and (cfg.rank_pattern or cfg.alpha_pattern):
        raise InputError(f"Adapter {name!r} at {path} combines use_rslora with rank_pattern/alpha_pattern, which peft refuses.")
    return cfg


def read_adapter_config_rank(path: str, name: str | None = None) -> int:
    """An adapter's largest rank, from its config alone (``r`` and its ``rank_pattern``)."""
    cfg = _lora_config(name or str(path), str(path))
    return max([int(cfg.r)] + [int(v) for v in (cfg.rank_pattern or {}).values()])


def read_adapter(name: str, path: str, targets: dict[str, torch.nn.Module]) -> LoraWeights:
    """One adapter's factors from its directory or hub id, checked against the base model's ``targets``.

    The factors are on the host (CPU), in the dtype each target's base weight has (float32 for a quantised one).
    Raises :class:`InputError` naming the adapter and the fix when it is not a plain LoRA for this base model.
    """
    from peft.utils import load_peft_weights
    from peft.utils.other import get_pattern_key

    cfg = _lora_config(name, path)
    try:
        state = load_peft_weights(path, device="cpu")
    except Exception as err:  # a file from the wild: OSError, safetensors' and pickle's own errors alike
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise InputError(f"Adapter {name!r}: cannot read the weights at {path} ({type(err).__name__}: {first}); "
                         "give adapter_model.safetensors or adapter_model.bin as peft saves them.") from err
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = _KEY.match(key)
        if m is None:
            raise InputError(f"Adapter {name!r} at {path} holds {key!r}, which is not a LoRA factor of a linear layer "
                             "(embedding LoRA, DoRA magnitudes and saved modules do not compose here).")
        module = m.group("module")
        module = module[len(_PREFIX):] if module.startswith(_PREFIX) else module
        parts.setdefault(module, {})[m.group("ab")] = tensor
    if not parts:
        raise InputError(f"Adapter {name!r} at {path} holds no LoRA weights.")
    modules, nbytes, rank = {}, 0, 0
    for module_name, ab in parts.items():
        base = targets.get(module_name)
        if base is None:
            raise InputError(f"Adapter {name!r} at {path} targets {module_name!r}, which is not a linear layer of the base model; "
                             "use an adapter trained for this base model or change --base_model.")
        if set(ab) != {"A", "B"}:
            raise InputError(f"Adapter {name!r} at {path} has lora_{'A' if 'A' not in ab else 'B'} missing at {module_name}.")
        A, B = ab["A"], ab["B"]
        d_in, d_out = module_shape(base)
        r = int(cfg.rank_pattern.get(get_pattern_key(cfg.rank_pattern.keys(), module_name), cfg.r))
        alpha = float(cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), module_name), cfg.lora_alpha))
        if A.dim() != 2 or B.dim() != 2 or tuple(A.shape) != (r, d_in) or tuple(B.shape) != (d_out, r):
            raise InputError(f"Adapter {name!r} at {path} does not fit the base model at {module_name}: lora_A {tuple(A.shape)} and "
                             f"lora_B {tuple(B.shape)}, expected ({r}, {d_in}) and ({d_out}, {r}); use an adapter trained "
                             "for this base model or change --base_model.")
        scaling = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
        weight = base.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        a = A.to(dtype=dtype)
        b = (B.float() * scaling).to(dtype=dtype)
        modules[module_name] = (a, b)
        nbytes += a.numel() * a.element_size() + b.numel() * b.element_size()
        rank = max(rank, r)
    return LoraWeights(name, str(path), modules, nbytes, rank)
