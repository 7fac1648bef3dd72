"""Stage: composition. Per-sample mixture / fusion / selection of pool adapters inside one batch.

Semantics (sample b, retrieved adapters j = 1..k, weights w_bj, each adapter's own scaling s_j):

    mixture:   h_b = W x_b + sum_j w_bj * s_j * B_j A_j x_b
    fusion:    h_b = W x_b + (sum_j w_bj * s_j * B_j) (sum_j w_bj * A_j) x_b
    selection: k = 1, where mixture and fusion coincide.

Both reduce to one low-rank pair per sample, built ONCE per batch (not at every decoding step):

    mixture:   A_b = concat_j A_j            [b, k*R, d_in]     (rank-concatenation, peft's "cat")
               B_b = concat_j w_bj s_j B_j   [b, d_out, k*R]
    fusion:    A_b = sum_j w_bj A_j          [b, R, d_in]
               B_b = sum_j w_bj s_j B_j      [b, d_out, R]

and at every forward of a LoRA layer, for x of shape [b, t, d_in]:

    h = base(x) + (x @ A_b^T) @ B_b^T        [b, t, d_out]

The context manager switches peft's own LoRA path off (``PeftModel.disable_adapter``) and adds the
composed delta through forward hooks on the stock peft LoRA layers; leaving it removes the hooks.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from utils.adapter_pool import AdapterPool

MODES = ("mixture", "fusion")


def build_composed(A: torch.Tensor, B: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, mode: str):
    """Per-sample low-rank factors of one layer.

    Args:
        A: [N, R, d_in] stacked lora_A weights.  B: [N, d_out, R] stacked, pre-scaled lora_B weights.
        indices: [b, k] stack indices.  weights: [b, k] composition weights w_bj.
        mode: "mixture" or "fusion".
    Returns:
        (At, Bt) with At: [b, d_in, R'] and Bt: [b, R', d_out] (transposed for bmm), R' = k*R for
        mixture and R for fusion, in A's dtype and on A's device.
    """
    idx = indices.to(A.device)
    w = weights.to(device=A.device, dtype=torch.float32)
    b, k = idx.shape
    A_sel = A[idx].float()  # [b, k, R, d_in]
    B_sel = B[idx].float() * w[:, :, None, None]  # [b, k, d_out, R]
    if mode == "mixture":
        A_b = A_sel.reshape(b, k * A.shape[1], A.shape[2])  # [b, k*R, d_in]
        B_b = B_sel.permute(0, 2, 1, 3).reshape(b, B.shape[1], k * B.shape[2])  # [b, d_out, k*R]
    elif mode == "fusion":
        A_b = (A_sel * w[:, :, None, None]).sum(1)  # [b, R, d_in]
        B_b = B_sel.sum(1)  # [b, d_out, R]
    else:
        raise ValueError(f"Unknown composition mode {mode!r}; use one of {MODES}.")
    return A_b.transpose(1, 2).contiguous().to(A.dtype), B_b.transpose(1, 2).contiguous().to(A.dtype)


LOW_PRECISION = (torch.bfloat16, torch.float16)


def _make_hook(At: torch.Tensor, Bt: torch.Tensor):
    # On CPU, batched matmuls this small are several times slower in bf16/fp16 than in float32 (39.5 us
    # against 10.3 us for one decoding step of one row at k*r = 24, d = 576; bench/bench_forward.py), while over
    # a whole prompt the low-precision fused op wins; so a CPU decoding step (one token per row) computes in float32.
    decode_factors = (At.float(), Bt.float()) if At.device.type == "cpu" and At.dtype in LOW_PRECISION else None

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["x"]
        if x.shape[0] != At.shape[0]:
            raise RuntimeError(
                f"Composition was built for a batch of {At.shape[0]} rows but the layer saw {x.shape[0]}; "
                "beam search and num_return_sequences > 1 are not supported with per-sample composition."
            )
        if decode_factors is not None and x.dim() == 3 and x.shape[1] == 1:
            At32, Bt32 = decode_factors
            return output + torch.bmm(torch.bmm(x.float(), At32), Bt32).to(output.dtype)
        if x.dim() == 3 and x.dtype == At.dtype == output.dtype:
            return torch.baddbmm(output, torch.bmm(x, At), Bt)  # output + (x A_b^T) B_b^T, one fused op
        squeeze = x.dim() == 2
        xx = x.unsqueeze(1) if squeeze else x  # [b, t, d_in]
        delta = torch.bmm(torch.bmm(xx.to(At.dtype), At), Bt)  # [b, t, d_out]
        if squeeze:
            delta = delta.squeeze(1)
        return output + delta.to(output.dtype)

    return hook


@contextmanager
def compose(pool: AdapterPool, indices: torch.Tensor, weights: torch.Tensor, mode: str = "mixture"):
    """Apply per-sample compositions of pool adapters to ``pool.model`` inside the ``with`` block.

    Args:
        pool: the loaded :class:`AdapterPool`.
        indices: [b, k] long tensor of stack indices, row b using adapters ``indices[b]``.
        weights: [b, k] weights w_bj (uniform 1/k in the paper).
        mode: "mixture" or "fusion" (identical when k = 1).
    """
    if mode not in MODES:
        raise ValueError(f"Unknown composition mode {mode!r}; use one of {MODES}.")
    if indices.shape != weights.shape or indices.dim() != 2:
        raise ValueError(f"indices {tuple(indices.shape)} and weights {tuple(weights.shape)} must both be [batch, k].")
    handles = []
    on_device = {}  # indices and weights copied once per device (once in all unless device_map spreads the model)
    with torch.no_grad():
        factors = []
        for layer in pool.layers:
            dev = layer.A.device
            if dev not in on_device:
                on_device[dev] = (indices.to(dev), weights.to(device=dev, dtype=torch.float32))
            factors.append(build_composed(layer.A, layer.B, *on_device[dev], mode))
    with pool.model.disable_adapter():
        try:
            for layer, (At, Bt) in zip(pool.layers, factors):
                handles.append(layer.module.register_forward_hook(_make_hook(At, Bt), with_kwargs=True))
            yield pool.model
        finally:
            for h in handles:
                h.remove()
