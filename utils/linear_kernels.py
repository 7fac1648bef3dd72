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

Sibling projections that read the same input are multiplied as one (:class:`FusedProjections`, as vLLM's
``QKVParallelLinear`` and ``MergedColumnParallelLinear`` do): an attention's ``q_proj``, ``k_proj`` and ``v_proj``, and
an MLP's ``gate_proj`` and ``up_proj``. Their weights are packed once, stacked along the output dimension,

    Y = x @ [W_q; W_k; W_v].T           [..., d_q + d_k + d_v]      q_proj(x) = Y[..., :d_q], and so on

so that a layer makes 4 oneDNN calls instead of 7. The modules stay where they are, each still an ``nn.Linear`` with
its own weight, hooks and name: the first of a group called with an input computes ``Y`` and each member returns its
columns of it (a view). A member called again with the same input, or with another input, computes ``Y`` again, so
results never depend on the order of the calls. Each output element is the same dot product as its own module's
(bit for bit on the CPU measured, an AVX-512 Xeon: docs/benchmarks.md).
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
    _fused: "FusedProjections | None" = None

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
        if self._fused is not None:
            return self._fused.output(self, x)
        if self.stale():
            self.pack()
        return _LINEAR_POINTWISE(x, self._packed, self.bias, "none", [], "")


class FusedProjections:
    """Sibling :class:`PackedLinear` modules that read one input, multiplied by one packed weight (module docstring).

    ``members`` share ``in_features``, dtype and device, and all or none have a bias. The stacked weight is packed
    from the members' weights and packed again when any of them is replaced or changed in place (as
    :meth:`PackedLinear.stale`). The last product is kept with the input it was computed from (held, so that an
    identity test is sound), the input's version (an input changed in place is multiplied again; under
    ``torch.inference_mode`` tensors keep no version, so there only a new input object is noticed) and which members
    have taken their columns; it is one tuple, replaced whole, so that two
    threads calling the same layer each get their own input's product.
    """

    def __init__(self, members: list[PackedLinear]):
        self.members = members
        ends = torch.tensor([m.out_features for m in members]).cumsum(0).tolist()
        self.columns = {id(m): (end - m.out_features, m.out_features) for m, end in zip(members, ends)}  # (start, width)
        self._packed: torch.Tensor | None = None
        self._bias: torch.Tensor | None = None
        self._packed_of: tuple | None = None
        self._last: tuple | None = None  # (x, x._version, Y, ids of the members that took their columns)

    def _key(self) -> tuple:
        return tuple(m._key() for m in self.members)

    def pack(self) -> None:
        with torch.no_grad():
            weight = torch.cat([m.weight.detach() for m in self.members])
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight)
            self._bias = None if self.members[0].bias is None else torch.cat([m.bias.detach() for m in self.members])
        self._packed_of = self._key()

    def output(self, member: PackedLinear, x: torch.Tensor) -> torch.Tensor:
        """``member(x)``: its columns of the group's product for ``x``, computed unless this input's is at hand."""
        last = self._last
        version = None if x.is_inference() else x._version  # inference tensors keep no version counter
        if last is None or last[0] is not x or last[1] != version or id(member) in last[3]:
            if self._packed_of != self._key():
                self.pack()
            last = (x, version, _LINEAR_POINTWISE(x, self._packed, self._bias, "none", [], ""), set())
            self._last = last
        last[3].add(id(member))
        if len(last[3]) == len(self.members):
            self._last = None  # every member has its columns: the input and the product are not held any longer
        start, width = self.columns[id(member)]
        return last[2].narrow(-1, start, width)


# Sibling projections that read the same input in Llama-style blocks (Llama, Mistral, Qwen2, Gemma, SmolLM, ...)
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_projections(model: nn.Module) -> int:
    """Give the sibling projections of every block of ``model`` one :class:`FusedProjections`; returns the groups made.

    A group is made of the children of one module named as in :data:`FUSED_GROUPS`, where all are
    :class:`PackedLinear` with the same ``in_features``, dtype and device and all or none have a bias; any other
    set of siblings (a missing member, one wrapped by peft, mixed shapes) is left as separate modules.
    """
    made = 0
    for parent in model.modules():
        for names in FUSED_GROUPS:
            members = [getattr(parent, n, None) for n in names]
            if not all(type(m) is PackedLinear for m in members):
                continue
            w = members[0].weight
            if any(m.in_features != members[0].in_features or m.weight.dtype != w.dtype or m.weight.device != w.device
                   or (m.bias is None) != (members[0].bias is None) for m in members):
                continue
            if members[0]._fused is not None and all(m._fused is members[0]._fused for m in members):
                made += 1  # fused already (use_linear_kernels called again): packed again only if a weight changed
                continue
            group = FusedProjections(members)
            group.pack()
            for m in members:
                m._fused = group
                m._packed, m._packed_of = None, None  # the group's copy serves them: no second copy
            made += 1
    return made


def unfuse_projections(model: nn.Module) -> None:
    """Every :class:`PackedLinear` of ``model`` multiplies from its own packed weight again."""
    for m in _linears(model):
        if type(m) is PackedLinear and m._fused is not None:
            m._fused = None
            m._packed, m._packed_of = None, None  # packed again at its next call, or by use_linear_kernels


_LINEAR_POINTWISE = torch.ops.mkldnn._linear_pointwise.default


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if type(m) in (nn.Linear, PackedLinear)]


def linear_bytes(model: nn.Module) -> int:
    """Bytes of the weights of the model's ``nn.Linear`` modules (a tied head counted once more, as it is packed)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in _linears(model))


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def use_linear_kernels(model: nn.Module, choice: str = "auto", fuse: bool = True) -> str:
    """Put the kernel ``choice`` behind every ``nn.Linear`` of ``model``; returns what was used: "onednn" or "torch".

    ``onednn`` packs every linear weight (an error where this CPU or build cannot, for this dtype), with sibling
    projections fused (:func:`fuse_projections`) unless ``fuse`` is False; ``torch`` restores
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
                m.__dict__.pop("_fused", None)
                del m._packed, m._packed_of
        return "torch"
    for m in linears:  # packed once: a module packed already is packed again only if its weight changed
        if type(m) is nn.Linear:
            m.__class__ = PackedLinear
            m._packed, m._packed_of = None, None
    if fuse:
        groups = fuse_projections(model)
    else:
        unfuse_projections(model)
        groups = 0
    for m in linears:
        if m._fused is None and m.stale():
            m.pack()
    logger.info("Linear layers multiply from oneDNN-packed weights (%d layers, %.0f MiB packed; %d groups of sibling "
                "projections fused)", len(linears), linear_bytes(model) / 2**20, groups)
    return "onednn"
