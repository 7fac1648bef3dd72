"""Stage: the adapter pool. Every LoRA of the pool is loaded once per run with stock ``peft``.

After loading, the weights of each LoRA layer are stacked once into two tensors, so that a batch
only chooses indices and weights (the punica / vLLM layout):

    A[m]: [N, R_m, d_in]    lora_A weights of the N pool adapters at module m, zero-padded to the
                            largest rank R_m used at m (zero rows contribute nothing)
    B[m]: [N, d_out, R_m]   lora_B weights, each multiplied by its own adapter's scaling s_j
                            (lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA, as peft computed it)

An adapter that does not target module m has zeros there. The stacks live on the device of the
module's base weight, so composition also works when ``device_map`` spreads the model over devices, and
in its dtype (bfloat16 for a bf16 model), so the delta is one fused op in the model's precision, as in the
paper's code and the multi-LoRA servers (peft itself keeps adapter weights in float32 by default and casts
every LoRA input to float32). A quantised base weight (not floating point) keeps the adapters' dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from utils.data import InputError, PoolEntry

logger = logging.getLogger(__name__)


@dataclass
class StackedLayer:
    """Stacked LoRA weights of one peft LoRA layer (shapes in the module docstring)."""

    name: str
    module: torch.nn.Module
    A: torch.Tensor  # [N, R, d_in]
    B: torch.Tensor  # [N, d_out, R], pre-scaled


class AdapterPool:
    """The pool's adapters inside one ``PeftModel``, plus their stacked weights.

    ``names[i]`` is the adapter at stack index i; ``index[name]`` the reverse.
    """

    def __init__(self, base_model, entries: list[PoolEntry], show_progress: bool = True):
        from peft import PeftModel

        if not entries:
            raise InputError("The adapter pool is empty; the pool config must list at least one LoRA.")
        self.entries = entries
        self.names = [e.name for e in entries]
        self.index = {name: i for i, name in enumerate(self.names)}
        model = None
        for entry in tqdm(entries, desc="Loading adapters", disable=not show_progress):
            try:
                if model is None:
                    model = PeftModel.from_pretrained(base_model, entry.path, adapter_name=entry.name, is_trainable=False)
                else:
                    model.load_adapter(entry.path, adapter_name=entry.name, is_trainable=False)
            except (RuntimeError, ValueError, KeyError) as err:
                lines = [l.strip() for l in str(err).splitlines() if l.strip()] or [type(err).__name__]
                msg = next((l for l in lines if "size mismatch" in l), lines[0])[:300]
                raise InputError(
                    f"Adapter {entry.name!r} at {entry.path} does not fit the base model ({msg}); "
                    f"use an adapter trained for this base model or change --base_model."
                ) from err
            except OSError as err:
                raise InputError(f"Adapter {entry.name!r}: cannot read {entry.path} ({err}); fix its 'path' in the pool config.") from err
        self.model = model
        self.model.eval()
        self.layers = self._stack()
        logger.info("Loaded %d adapters; %d LoRA layers stacked", len(self.names), len(self.layers))

    def _stack(self) -> list[StackedLayer]:
        from peft.tuners.lora import LoraLayer

        layers = []
        for mod_name, module in self.model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            present = [n for n in self.names if n in module.lora_A]
            if not present:
                continue
            for n in present:
                if n in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(n, False):
                    raise InputError(f"Adapter {n!r} uses a LoRA variant (e.g. DoRA) at {mod_name}; only plain LoRA composes here.")
                if not isinstance(module.lora_A[n], torch.nn.Linear):
                    raise InputError(f"Adapter {n!r} has a non-linear LoRA layer at {mod_name} ({type(module).__name__}); only nn.Linear targets compose here.")
            base_weight = module.get_base_layer().weight
            d_out, d_in = base_weight.shape[0], base_weight.shape[1]
            rank = max(module.lora_A[n].weight.shape[0] for n in present)
            device = base_weight.device
            dtype = base_weight.dtype if base_weight.dtype.is_floating_point else module.lora_A[present[0]].weight.dtype
            A = torch.zeros(len(self.names), rank, d_in, device=device, dtype=dtype)
            B = torch.zeros(len(self.names), d_out, rank, device=device, dtype=dtype)
            with torch.no_grad():
                for n in present:
                    j = self.index[n]
                    a, b = module.lora_A[n].weight, module.lora_B[n].weight
                    A[j, : a.shape[0]] = a.to(device=device, dtype=dtype)
                    B[j, :, : b.shape[1]] = (b.float() * float(module.scaling[n])).to(device=device, dtype=dtype)
            layers.append(StackedLayer(mod_name, module, A, B))
        return layers

    def indices(self, names: list[list[str]]) -> torch.Tensor:
        """Stack indices [b, k] of per-sample adapter names."""
        try:
            return torch.tensor([[self.index[n] for n in row] for row in names], dtype=torch.long)
        except KeyError as err:
            raise InputError(f"Adapter {err.args[0]!r} is not in the pool; known adapters: {', '.join(self.names)}.") from err
