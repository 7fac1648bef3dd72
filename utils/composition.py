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


def _decode_factors(At: torch.Tensor, Bt: torch.Tensor):
    # On CPU, batched matmuls this small are several times slower in bf16/fp16 than in float32 (39.5 us
    # against 10.3 us for one decoding step of one row at k*r = 24, d = 576; bench/bench_forward.py), while over
    # a whole prompt the low-precision fused op wins; so a CPU decoding step (one token per row) computes in float32.
    return (At.float(), Bt.float()) if At.device.type == "cpu" and At.dtype in LOW_PRECISION else None


def _add_delta(x: torch.Tensor, output: torch.Tensor, At: torch.Tensor, Bt: torch.Tensor, decode_factors) -> torch.Tensor:
    """output + (x @ At) @ Bt for x [b, t, d_in] (or [b, d_in]), At [b, d_in, R'], Bt [b, R', d_out]."""
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


def _make_hook(At: torch.Tensor, Bt: torch.Tensor):
    decode_factors = _decode_factors(At, Bt)

    def hook(module, args, kwargs, output):
        return _add_delta(args[0] if args else kwargs["x"], output, At, Bt, decode_factors)

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


def build_mixed(A: torch.Tensor, B: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, fusion_rows: torch.Tensor):
    """Per-sample factors of one layer when rows of one batch use different composition modes.

    Args:
        A, B, indices, weights: as in :func:`build_composed` ([N, R, d_in], [N, d_out, R], [b, k], [b, k]).
        fusion_rows: [b] bool, True where row b composes by fusion, False for mixture.
    Returns:
        (At [b, d_in, k*R], Bt [b, k*R, d_out]). A fusion row's rank-R factors sit in the first R columns and
        the rest are zeros, which add nothing: (x At) Bt is unchanged by zero-padding the rank. A row whose
        weights are all 0 (the base model, or padding of k) gets zero factors and hence exactly the base output.
    """
    At, Bt = build_composed(A, B, indices, weights, "mixture")
    if bool(fusion_rows.any()):
        Af, Bf = build_composed(A, B, indices, weights, "fusion")  # [b, d_in, R], [b, R, d_out]
        r = Af.shape[2]
        Af = torch.nn.functional.pad(Af, (0, At.shape[2] - r))
        Bf = torch.nn.functional.pad(Bf, (0, 0, 0, Bt.shape[1] - r))
        sel = fusion_rows.to(At.device)[:, None, None]
        At, Bt = torch.where(sel, Af, At), torch.where(sel, Bf, Bt)
    return At.contiguous(), Bt.contiguous()


class LiveComposition:
    """Per-sample composition for a batch whose rows change between forwards (continuous batching).

    :func:`compose` fixes one batch's rows for the length of a ``with`` block. A server's batch instead gains
    and loses rows between decoding steps, so here the hooks stay registered inside :meth:`active` and read the
    factors last set by :meth:`set_rows`, which rebuilds them (once per change of the batch, not per step)
    with :func:`build_mixed`. Each row has its own adapters, weights and mode; the base model is a row with
    weights 0. Same math as :func:`compose` (module docstring).
    """

    def __init__(self, pool: AdapterPool):
        self.pool = pool
        self._factors: list[tuple[torch.Tensor, torch.Tensor, object]] | None = None
        self.rows_key = None

    def set_rows(self, indices: torch.Tensor, weights: torch.Tensor, fusion_rows: torch.Tensor, key=None) -> None:
        """Factors for a batch: indices [b, k] (long), weights [b, k], fusion_rows [b] (bool).

        ``key`` identifies the batch's rows; a call with the key of the factors in place does nothing.
        """
        if key is not None and key == self.rows_key:
            return
        if indices.shape != weights.shape or indices.dim() != 2 or fusion_rows.shape != indices.shape[:1]:
            raise ValueError(f"indices {tuple(indices.shape)}, weights {tuple(weights.shape)} and fusion_rows "
                             f"{tuple(fusion_rows.shape)} must be [batch, k], [batch, k] and [batch].")
        factors, on_device = [], {}
        with torch.no_grad():
            for layer in self.pool.layers:
                dev = layer.A.device
                if dev not in on_device:
                    on_device[dev] = (indices.to(dev), weights.to(device=dev, dtype=torch.float32), fusion_rows.to(dev))
                At, Bt = build_mixed(layer.A, layer.B, *on_device[dev])
                factors.append((At, Bt, _decode_factors(At, Bt)))
        self._factors, self.rows_key = factors, key

    @contextmanager
    def active(self, hooks: bool = True):
        """The pool's model with peft's own LoRA path off and the live per-row deltas on.

        ``hooks=False``: peft's LoRA path off and no deltas, the base model exactly (a batch of base rows only).
        """
        handles = []

        def make(i):
            def hook(module, args, kwargs, output):
                if self._factors is None:
                    raise RuntimeError("LiveComposition.set_rows() must run before a forward pass.")
                At, Bt, dec = self._factors[i]
                return _add_delta(args[0] if args else kwargs["x"], output, At, Bt, dec)
            return hook

        with self.pool.model.disable_adapter():
            try:
                for i, layer in enumerate(self.pool.layers if hooks else []):
                    handles.append(layer.module.register_forward_hook(make(i), with_kwargs=True))
                yield self.pool.model
            finally:
                for h in handles:
                    h.remove()
