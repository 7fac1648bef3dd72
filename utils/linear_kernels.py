"""Stage 1, continued: the kernel behind every ``nn.Linear`` of the base model on CPU.

On a CPU, PyTorch computes ``F.linear`` with a BLAS GEMM that re-packs the weight matrix into its blocked layout at
every call. A decoding step reads every weight once for a few rows, so that packing is most of the step's matmul time.
oneDNN (PyTorch's ``mkldnn`` backend, part of every CPU build) can pack each weight once, at load, and then multiply
straight from the packed copy. That is what the serving engines do on CPU. Measured for SmolLM2-135M's 211 linears
(30 layers of q, k, v, o, gate, up, down, and the 49,152-row head) on a 2-core AMD EPYC (docs/benchmarks.md,
``bench/bench_linear_kernels.py``): float32 1.7 to 2 times faster at 1 and 16 rows, and still ahead over a prompt.

:func:`use_linear_kernels` swaps the class of each ``nn.Linear`` (it stays an ``nn.Linear``: peft, hooks, ``state_dict``
and the adapters' target names see no difference) for :class:`PackedLinear`, whose ``forward`` is

    y = x @ W.T + b                     x [..., in_features], W [out_features, in_features], y [..., out_features]

computed by ``torch.ops.mkldnn._linear_pointwise`` from the packed copy of ``W``. The result differs from
``F.linear``'s only by float rounding (up to a few 1e-6 in float32). The dense weight stays where it is, so the
packed copies cost as much memory again as the linears' weights; ``auto`` packs only when that fits comfortably.

``PackedLinear`` falls back to ``F.linear`` whenever the packed copy cannot be right or cannot be used:
- autograd is recording and the input or the weight needs a gradient (training an adapter on the same model);
- the weight is no longer the tensor that was packed, or was changed in place (``weight._version``); it is re-packed
  at the next call without gradients. A write through ``weight.data`` bypasses the version counter: code that does
  that must call :func:`use_linear_kernels` again;
- the weight is not on the CPU, or the input's dtype differs from the weight's.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from utils.flags import LINEAR_KERNEL_CHOICES as CHOICES

logger = logging.getLogger(__name__)

# auto packs when the packed copies take at most this share of the memory available at load time
AUTO_MEMORY_SHARE = 0.25


def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether this PyTorch build and CPU can multiply from a packed oneDNN weight of ``dtype``."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` that multiplies from a oneDNN-packed copy of its weight (see the module's docstring)."""

    _packed: torch.Tensor | None
    _packed_of: tuple | None

    def _key(self) -> tuple:
        w = self.weight
        return (w.data_ptr(), w._version, w.dtype, w.shape)

    def stale(self) -> bool:
        """Whether the packed copy is missing or no longer the weight's (replaced, or changed in place)."""
        return self._packed is None or self._packed_of != self._key()

    def pack(self) -> None:
        with torch.no_grad():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())  # no batch hint: the layout that serves 1 row and 256 alike
        self._packed_of = self._key()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Called ~200 times per decoding step: the operator is its overload, resolved once.
        w = self.weight
        if (x.dtype != w.dtype or not w.is_cpu
                or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            return nn.functional.linear(x, w, self.bias)
        if self.stale():
            self.pack()
        return _LINEAR_POINTWISE(x, self._packed, self.bias, "none", [], "")


_LINEAR_POINTWISE = torch.ops.mkldnn._linear_pointwise.default


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if type(m) in (nn.Linear, PackedLinear)]


def linear_bytes(model: nn.Module) -> int:
    """Bytes of the weights of the model's ``nn.Linear`` modules (a tied head counted once more, as it is packed)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in _linears(model))


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def use_linear_kernels(model: nn.Module, choice: str = "auto") -> str:
    """Put the kernel ``choice`` behind every ``nn.Linear`` of ``model``; returns what was used: "onednn" or "torch".

    ``onednn`` packs every linear weight (an error where this CPU or build cannot, for this dtype); ``torch`` restores
    plain ``nn.Linear``; ``auto`` is ``onednn`` for a CPU model of float32 (or bfloat16 where the CPU has bf16
    instructions) whose packed copies fit in a quarter of the memory available now, and ``torch`` otherwise.
    """
    from utils.data import InputError

    if choice not in CHOICES:
        raise InputError(f"Unknown --linear_kernels {choice!r}; choose one of {', '.join(CHOICES)}.")
    linears = _linears(model)
    if not linears:
        return "torch"
    weight = linears[0].weight
    reason = None
    if weight.device.type != "cpu":
        reason = f"the model is on {weight.device.type}, and packed weights are a CPU kernel"
    elif not onednn_supports(weight.dtype):
        reason = (f"this CPU or PyTorch build has no oneDNN kernel for {weight.dtype} (float32 always; bfloat16 needs "
                  f"AVX512-BF16 or AMX)")
    elif choice == "auto" and (need := linear_bytes(model)) > AUTO_MEMORY_SHARE * (free := available_memory()):
        reason = (f"the packed copies ({need / 2**30:.1f} GiB) would take more than a quarter of the memory available "
                  f"({free / 2**30:.1f} GiB); pass --linear_kernels onednn to pack anyway")
    if choice == "torch" or reason:
        if choice == "onednn" and reason:
            raise InputError(f"--linear_kernels onednn: {reason}. Pass --linear_kernels torch (or auto).")
        if reason and choice == "auto":
            logger.info("Linear layers keep PyTorch's kernel: %s.", reason)
        for m in linears:
            if type(m) is PackedLinear:
                m.__class__ = nn.Linear
                del m._packed, m._packed_of
        return "torch"
    for m in linears:  # packed once: a module packed already is packed again only if its weight changed
        if type(m) is nn.Linear:
            m.__class__ = PackedLinear
            m._packed = None
        if m.stale():
            m.pack()
    logger.info("Linear layers multiply from oneDNN-packed weights (%d layers, %.0f MiB packed)", len(linears),
                linear_bytes(model) / 2**20)
    return "onednn"
