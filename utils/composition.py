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

The base model carries no LoRA layers (the pool reads adapters, :mod:`utils.adapter_pool`): the context managers
add the composed delta through forward hooks on the base model's own target modules (its ``nn.Linear`` layers),
only on the modules the batch's adapters target, and leaving them removes the hooks.
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
    return compose_selected(A[idx], B[idx], weights, mode)


def compose_selected(A_sel: torch.Tensor, B_sel: torch.Tensor, weights: torch.Tensor, mode: str):
    """:func:`build_composed` on factors already selected per row: A_sel [b, k, R, d_in], B_sel [b, k, d_out, R]
    (slot j of row b holds adapter j of that row, zeros for an empty slot). Same returns, in A_sel's dtype."""
    w = weights.to(device=A_sel.device, dtype=torch.float32)
    b, k, R, d_in = A_sel.shape
    d_out = B_sel.shape[2]
    A32 = A_sel.float()  # [b, k, R, d_in]
    if mode == "mixture":
        # Each factor written once, straight into its layout: At[b, :, j*R + p] = A_bj[p, :],
        # Bt[b, j*R + p, :] = w_bj * B_bj[:, p] (a row's slots side by side, the weights folded into B).
        At = A32.reshape(b, k * R, d_in).transpose(1, 2).contiguous()  # [b, d_in, k*R]
        Bt = torch.empty(b, k, R, d_out, dtype=torch.float32, device=B_sel.device)
        torch.mul(B_sel.float().transpose(2, 3), w[:, :, None, None], out=Bt)
        return At.to(A_sel.dtype), Bt.view(b, k * R, d_out).to(A_sel.dtype)  # Bt [b, k*R, d_out]
    if mode != "fusion":
        raise ValueError(f"Unknown composition mode {mode!r}; use one of {MODES}.")
    A_b = (A32 * w[:, :, None, None]).sum(1)  # [b, R, d_in]
    B_b = (B_sel.float() * w[:, :, None, None]).sum(1)  # [b, d_out, R]
    return A_b.transpose(1, 2).contiguous().to(A_sel.dtype), B_b.transpose(1, 2).contiguous().to(A_sel.dtype)


LOW_PRECISION = (torch.bfloat16, torch.float16)


def _is_fusion(mode) -> bool:
    """A row's mode: "fusion" (or the flag True) against "mixture" (or False)."""
    return mode in ("fusion", True)


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
def _pinned(pool: AdapterPool, names: list[str]):
    pool.acquire(names)
    try:
        yield
    finally:
        pool.release(names)


def adapter_rows(pool: AdapterPool, adapters) -> list[list[str]]:
    """Each row's adapters by name, the identity that routing gives and composition uses. ``adapters`` holds names
    ([b][k] strings), or the pool's ids (a [b, k] tensor or nested list from ``pool.indices``)."""
    if isinstance(adapters, torch.Tensor):
        adapters = adapters.tolist()
    return [[a if isinstance(a, str) else pool.name_of(int(a)) for a in row] for row in adapters]


@contextmanager
def compose(pool: AdapterPool, adapters, weights: torch.Tensor, mode: str = "mixture"):
    """Apply per-sample compositions of pool adapters to ``pool.model`` inside the ``with`` block.

    Args:
        pool: the :class:`AdapterPool`; the batch's adapters are pinned on its device tier for the block.
        adapters: [b][k] adapter names, row b using adapters ``adapters[b]`` (or their ids, :func:`adapter_rows`).
        weights: [b, k] weights w_bj (uniform 1/k in the paper).
        mode: "mixture" or "fusion" (identical when k = 1).
    """
    if mode not in MODES:
        raise ValueError(f"Unknown composition mode {mode!r}; use one of {MODES}.")
    rows = adapter_rows(pool, adapters)
    if weights.dim() != 2 or len(rows) != weights.shape[0] or any(len(r) != weights.shape[1] for r in rows):
        raise ValueError(f"adapters ({len(rows)} rows of {sorted({len(r) for r in rows})}) and weights {tuple(weights.shape)} "
                         "must both be [batch, k].")
    names = list(dict.fromkeys(n for row in rows for n in row))
    with _pinned(pool, names):
        with torch.no_grad():
            hooks = [(module, _make_hook(*compose_selected(A_sel, B_sel, weights.to(A_sel.device), mode)))
                     for _, module, A_sel, B_sel in pool.gather(rows, weights.shape[1])]
        with _hooked(pool.model, hooks) as model:
            yield model


@contextmanager
def compose_shared(pool: AdapterPool, adapters: list, weights, mode: str = "fusion"):
    """Apply ONE composition to every row of every forward inside the ``with`` block.

    Same math as :func:`compose` with identical rows (module docstring), for callers that run many batches under
    one weight vector (LoraHub's search evaluates its loss on several example batches per vector). The factors are
    built once per block, not once per batch, and without a batch dimension:

        At: [d_in, R']    Bt: [R', d_out]    h = base(x) + (x @ At) @ Bt    for x of shape [..., d_in]

    Args:
        pool: the :class:`AdapterPool`.  adapters: k adapter names (or ids).  weights: k weights w_j.
        mode: "mixture" or "fusion".
    """
    if mode not in MODES:
        raise ValueError(f"Unknown composition mode {mode!r}; use one of {MODES}.")
    w = torch.as_tensor(weights, dtype=torch.float32).reshape(1, -1)
    rows = adapter_rows(pool, [list(adapters)])
    if len(rows[0]) != w.shape[1]:
        raise ValueError(f"{len(rows[0])} adapters but {w.shape[1]} weights.")

    def make(At: torch.Tensor, Bt: torch.Tensor):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["x"]
            return output + ((x.to(At.dtype) @ At) @ Bt).to(output.dtype)
        return hook

    with _pinned(pool, list(dict.fromkeys(rows[0]))):
        with torch.no_grad():
            hooks = []
            for _, module, A_sel, B_sel in pool.gather(rows, w.shape[1]):
                At, Bt = (f[0] for f in compose_selected(A_sel, B_sel, w, mode))
                hooks.append((module, make(At, Bt)))
        with _hooked(pool.model, hooks) as model:
            yield model


@contextmanager
def _hooked(model, hooks: list):
    """``model`` with each ``(module, hook)`` of ``hooks`` registered as a forward hook until exit."""
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield model
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
    idx = indices.to(A.device)
    return mixed_selected(A[idx], B[idx], weights, fusion_rows)


def mixed_selected(A_sel: torch.Tensor, B_sel: torch.Tensor, weights: torch.Tensor, fusion_rows: torch.Tensor):
    """:func:`build_mixed` on factors already selected per row (shapes as in :func:`compose_selected`)."""
    At, Bt = compose_selected(A_sel, B_sel, weights, "mixture")
    if bool(fusion_rows.any()):
        Af, Bf = compose_selected(A_sel, B_sel, weights, "fusion")  # [b, d_in, R], [b, R, d_out]
        r = Af.shape[2]
        Af = torch.nn.functional.pad(Af, (0, At.shape[2] - r))
        Bf = torch.nn.functional.pad(Bf, (0, 0, 0, Bt.shape[1] - r))
        sel = fusion_rows.to(At.device)[:, None, None]
        At, Bt = torch.where(sel, Af, At), torch.where(sel, Bf, Bt)
    return At.contiguous(), Bt.contiguous()


class _Stack:
    """The stacked factors of one batch's rows, in buffers with spare rows: per module At [cap, d_in, W] and
    Bt [cap, W, d_out], of which the batch uses rows 0..b-1 (position p holds the factors of ``serials[p]``, zero-padded
    from the row's R' to W; zeros for a row whose adapters do not target the module).

    :meth:`assign` rewrites only the positions whose row changed: a server's batch changes by a row or two at a time
    (one joins, one leaves and the last row takes its place, as the decoder's cache does): restacking every row's
    factors at each change cost 19.7 ms at 16 rows (top-3 mixtures, 60 modules; a step takes about 70), rewriting the
    changed rows 1.7 ms (``bench/bench_batch_changes.py``). The buffers
    grow (half as many rows again, the new widest R') when a batch does not fit them, copying the rows kept."""

    def __init__(self):
        self.serials: list = []  # the row at each position (None: must be rewritten)
        self.buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.used = 0  # a clock: when this stack was last assigned

    def overlap(self, key: tuple) -> int:
        return sum(1 for p, s in enumerate(key) if p < len(self.serials) and self.serials[p] == s)

    def forget(self, serials: set) -> None:
        self.serials = [None if s in serials else s for s in self.serials]

    def assign(self, key: tuple, rows: dict, modules: list[str]) -> dict:
        """Make positions 0..len(key)-1 hold ``key``'s rows (``rows``: serial -> module -> (At_r, Bt_r)) in every
        buffer and return module -> (At [b, d_in, W], Bt [b, W, d_out]) for ``modules`` (those the rows target), views
        of the buffers."""
        b = len(key)
        for m in dict.fromkeys([*modules, *self.buffers]):
            parts = [p for p in (rows[s].get(m) for s in key) if p is not None]
            buf = self.buffers.get(m)
            width = max([p[0].shape[1] for p in parts] + ([buf[0].shape[2]] if buf is not None else []))
            if buf is None or buf[0].shape[0] < b or buf[0].shape[2] < width:
                cap = max(b, 4) if buf is None else max(b, buf[0].shape[0] + buf[0].shape[0] // 2)
                At, Bt = (parts[0] if parts else buf)[:2]
                d_in, d_out = (At.shape[0], Bt.shape[1]) if parts else (At.shape[1], Bt.shape[2])
                self.buffers[m] = (At.new_zeros(cap, d_in, width), Bt.new_zeros(cap, width, d_out))
                self.serials = []  # every position is rewritten, in every buffer
        stale = [p for p in range(b) if p >= len(self.serials) or self.serials[p] != key[p]]
        for m, (At, Bt) in self.buffers.items():
            for p in stale:
                part = rows[key[p]].get(m)
                r = 0 if part is None else part[0].shape[1]
                if r:
                    At[p, :, :r] = part[0]
                    Bt[p, :r] = part[1]
                At[p, :, r:] = 0
                Bt[p, r:] = 0
        self.serials = list(key)
        return {m: (self.buffers[m][0][:b], self.buffers[m][1][:b]) for m in modules}


class _Shared:
    """One module-by-module stack of distinct adapters, shared by every row of a forward (the grouped kernel).

    Mixture (and selection, k = 1) is linear in the adapters, so a batch's rows can share one product per module
    instead of one per row. With the stack's D adapters zero-padded to one rank r (C = D * r columns):

        A_g = [A_1; ...; A_D]^T                  [d_in, C]
        B_g = [B_1, ..., B_D]^T                  [C, d_out]        (B_j pre-scaled by s_j, as the pool keeps it)
        M[t, j*r:(j+1)*r] = w_bj                 [T, C]            token t of row b; 0 for an adapter the row does not use

        h = base(x) + ((x @ A_g) * M) @ B_g      x [T, d_in]: every token of the forward, rows side by side

    which is each row's sum_j w_bj B_j A_j x (module docstring) with the other adapters' products multiplied by 0.
    Each adapter's factors are read once per forward, not once per row that uses it, and a forward is three
    operators per module, whatever its rows and their prompts' lengths. It costs b * C multiply-adds per module
    and token against the per-row kernel's b * k * r, so it pays while the batch's adapters are few against its
    rows (:meth:`LiveComposition._shared_for`). The stack holds copies: the adapters need no pins for it.

    Its buffers have ``capacity`` slots of r columns each: an adapter that joins the batch is copied into a free slot,
    or into the slot of one no row uses any more (:meth:`place`), so that a batch change copies the new adapter only;
    the product reads the columns up to the last slot in use.
    """

    def __init__(self, members: list, pool: AdapterPool, rank: int, capacity: int):
        self.pool = pool
        self.rank = rank  # every slot's width: the largest rank of any module of the first members
        self.slots: list = [None] * capacity  # a LoraWeights per slot (held here, so that ids stay unique), or None
        self.column: dict[int, int] = {}  # id(LoraWeights) -> slot
        self.buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> (A_g [d_in, C], B [capacity*r, d_out])
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # the used columns' views (A_g, B_g)
        self.place(members)

    @property
    def width(self) -> int:
        """Slots up to the last one in use: the product's C = width * rank columns."""
        return max((j + 1 for j, w in enumerate(self.slots) if w is not None), default=0)

    def covers(self, weights) -> bool:
        return all(id(w) in self.column for w in weights)

    def room_for(self, needed: list) -> bool:
        """Whether ``needed``'s adapters missing here fit in free slots or in slots of adapters ``needed`` does not use."""
        keep = {id(w) for w in needed}
        missing = sum(1 for w in needed if id(w) not in self.column)
        fits_rank = all(w.rank <= self.rank for w in needed)
        return fits_rank and missing <= sum(1 for w in self.slots if w is None or id(w) not in keep)

    def place(self, needed: list) -> None:
        """Write ``needed``'s missing adapters into the lowest free slots, then slots of adapters ``needed`` does not use
        (:meth:`room_for` first): one adapter's factors copied per module, the others' columns left as they are."""
        keep = {id(w) for w in needed}
        free = [j for j, w in enumerate(self.slots) if w is None] + [j for j, w in enumerate(self.slots) if w is not None and id(w) not in keep]
        missing = [w for w in needed if id(w) not in self.column]
        placed = list(zip(missing, sorted(free[:len(missing)])))
        for w, j in placed:
            old = self.slots[j]
            if old is not None:
                del self.column[id(old)]
            self.slots[j], self.column[id(w)] = w, j
        r, c = self.rank, self.width * self.rank
        with torch.no_grad():
            for m in (m for m in self.pool.targets if m not in self.buffers and any(m in w.modules for w, _ in placed)):
                a, b = next(w.modules[m] for w, _ in placed if m in w.modules)
                dtype = torch.float32 if a.device.type == "cpu" and a.dtype in LOW_PRECISION else a.dtype
                self.buffers[m] = (a.new_zeros(a.shape[1], c, dtype=dtype), b.new_zeros(len(self.slots) * r, b.shape[0], dtype=dtype))
            for m, (A, B) in list(self.buffers.items()):
                if A.shape[1] < c:  # A_g stays contiguous, [d_in, C] (a strided one multiplied 40% slower)
                    wider = A.new_zeros(A.shape[0], c)
                    wider[:, :A.shape[1]] = A
                    self.buffers[m] = (wider, B)
            for w, j in placed:
                for m, (A, B) in self.buffers.items():
                    A[:, j * r:(j + 1) * r] = 0
                    B[j * r:(j + 1) * r] = 0
                    if m in w.modules:
                        a, b = w.modules[m]  # [r_m, d_in], [d_out, r_m]
                        A[:, j * r:j * r + a.shape[0]] = a.T
                        B[j * r:j * r + a.shape[0]] = b.T
        self.factors = {m: (A, B[:c]) for m, (A, B) in self.buffers.items()}

    def mask(self, rows: list[tuple]) -> torch.Tensor:
        """M [len(rows), C] for rows of (LoraWeights, weights) (a base row: no adapters, zeros)."""
        at, cols, vals = [], [], []
        for i, (ws, wts) in enumerate(rows):
            for w, v in zip(ws, wts):
                at.append(i)
                cols.append(self.column[id(w)])
                vals.append(float(v))
        m = torch.zeros(len(rows), self.width, dtype=torch.float32)
        if at:
            m.index_put_((torch.tensor(at), torch.tensor(cols)), torch.tensor(vals, dtype=torch.float32), accumulate=True)
        first = next(iter(self.factors.values()), None)
        m = m.repeat_interleave(self.rank, dim=1)
        return m if first is None else m.to(device=first[0].device, dtype=first[0].dtype)


def _shared_delta(x: torch.Tensor, output: torch.Tensor, A: torch.Tensor, B: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """output + ((x @ A) * M) @ B in place (:class:`_Shared`), for x [..., d_in] of T tokens and M [T, C], or M [b, C]
    for x [b, t, d_in] (a padded prefill: each row's mask on all its tokens)."""
    u = x.reshape(-1, x.shape[-1]).to(A.dtype) @ A  # [T, C]
    if mask.shape[0] == u.shape[0]:
        u.mul_(mask)
    else:
        u.view(mask.shape[0], -1, u.shape[1]).mul_(mask[:, None])
    flat = output.view(-1, output.shape[-1])
    if flat.dtype == B.dtype:
        flat.addmm_(u, B)
    else:
        flat.add_((u @ B).to(flat.dtype))
    return output


class LiveComposition:
    """Per-sample composition for a batch whose rows change between forwards (continuous batching).

    :func:`compose` fixes one batch's rows for the length of a ``with`` block. A server's batch instead gains
    and loses rows between decoding steps. Here:

    - each row's factors (At_r [d_in, R'_r], Bt_r [R'_r, d_out] per module its adapters target, :func:`build_mixed`)
      are built once, when the row is first set, in one batched call for all new rows, and kept until :meth:`forget`;
      the row's adapters stay pinned on the pool's device tier meanwhile (:meth:`AdapterPool.acquire`);
    - :meth:`set_rows` stacks the kept factors of the current rows (zero-padding R' to the widest row, and zeros
      for a row whose adapters do not target a module) once per change of the batch, not per step, and then only the
      rows that changed place (:class:`_Stack`; two stacks: the running batch's and a joining group's prefill);
    - inside :meth:`active` (entered once for a server's lifetime) one hook per target module adds ``(x At) Bt`` with
      the stacked factors; hooks are added as adapters with new target modules arrive; :meth:`set_base` makes the
      hooks add nothing, for a forward of base rows only.

    Each row has its own adapters, weights and mode; a base row inside a composed batch has weights 0 and gets
    exactly the base output. Same math as :func:`compose` (module docstring).

    ``grouped=True`` adds the grouped kernel (:class:`_Shared`): a forward whose rows are all mixtures (or one
    adapter each) and share few enough adapters multiplies every token by the batch's distinct adapters once per
    module, each row's weights as a mask, and a row's own factors are built only when a forward needs them. The
    server uses it; evaluation keeps the per-row kernel, so that its tables do not move by float rounding.
    """

    def __init__(self, pool: AdapterPool, grouped: bool = False):
        self.pool = pool
        self.grouped = grouped
        self._rows: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # serial -> module -> (At_r, Bt_r)
        self._pins: dict[int, list[str]] = {}  # serial -> adapter names it pins
        # serial -> (LoraWeights, weights) when the row can share a grouped product (mixture or one adapter), else None
        self._linear: dict[int, tuple | None] = {}
        self._spec: dict[int, tuple] = {}  # serial -> the row as prepared (names resolved)
        self._shared: _Shared | None = None  # the grouped kernel's stack (kept while it covers the rows)
        self._shared_now = None  # (factors, mask) when the next forwards use the grouped kernel
        self.shared_forwards = 0  # forwards set up with the grouped kernel (a counter, for benchmarks)
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor, object]] | None = None
        self._stacks = [_Stack(), _Stack()]  # the running batch's and a prefill's
        self._clock = 0
        self._handles: dict[str, object] = {}
        self.rows_key = None
        self._segments: list[tuple[int, int, int]] | None = None  # a mixed step's joining rows: (start, end, serial)
        self._running = 0
        self._joined = None  # a mixed step's composed joining rows, gathered (set_ragged)
        self.is_active = False

    def set_rows(self, rows: list[tuple[int, list[str], list[float], str]], shared: bool = True) -> None:
        """Factors for a batch of rows ``(serial, adapter names, weights, mode)``, in batch order (mode: "mixture" or
        "fusion"; names may be the pool's ids, :func:`adapter_rows`, and mode a fusion flag).

        ``serial`` identifies a row across calls: a row seen before reuses its factors. With ``grouped`` (and
        ``shared``), a batch whose rows are all linear in their adapters may share one product per module instead
        (:meth:`_shared_for`).
        """
        self._segments = None
        key = tuple(r[0] for r in rows)
        if key == self.rows_key and (self._factors is not None or (shared and self._shared_now is not None)):
            return
        self.prepare(rows)
        shared = self._shared_for(key) if shared else None
        if shared is not None:
            self._use_shared(shared, shared.mask([self._linear[s] for s in key]))
            self.rows_key = key
            return
        self._shared_now = None
        self._ensure_factors(key)
        factors = {m: (At, Bt, _decode_factors(At, Bt)) for m, (At, Bt) in self._stacked(key).items()}
        self._install(factors)
        self._factors, self.rows_key = factors, key

    def _shared_for(self, serials) -> _Shared | None:
        """The grouped kernel's stack for a forward of rows ``serials`` (prepared), or None where the per-row kernel
        is the one to use: a fusion row of several adapters (not linear in them), or too many distinct adapters.

        The per-row kernel reads b * W columns of factors per module (W = k * r, each row's own) and multiplies each
        row by its W; the grouped one reads the C columns of the batch's distinct adapters once and multiplies every
        row by all of them. A decoding step is bound by those reads, not by its few rows' arithmetic, so the grouped
        kernel is used while it reads at most half as much: 2 * C <= b * W (``bench/bench_lora_kernels.py`` measures
        both in the decoding step; docs/benchmarks.md, "Grouped LoRA products"). A stack that covers the rows is kept,
        its unused adapters included, while it stays under that bound.
        """
        if not self.grouped or len(serials) < 2:
            return None
        rows = [self._linear[s] for s in serials]
        if any(r is None for r in rows):
            return None
        needed = list({id(w): w for ws, _ in rows for w in ws}.values())
        if not needed:
            return None
        k = max(len(ws) for ws, _ in rows)
        rank = max(w.rank for w in needed)

        def fits(count: int, r: int) -> bool:
            return 2 * count * r <= len(serials) * k * rank

        current = self._shared
        if current is not None and current.covers(needed) and fits(current.width, current.rank):
            return current
        if current is not None and current.room_for(needed):
            current.place(needed)  # the new adapters into free slots or those of adapters no row uses
            if fits(current.width, current.rank):
                return current
        if not fits(len(needed), rank):
            return None
        # A new stack, with room for up to twice its adapters, as far as the bound allows this batch.
        capacity = max(len(needed), min(2 * len(needed), len(serials) * k // 2))
        self._shared = _Shared(needed, self.pool, rank, capacity)
        return self._shared

    def _use_shared(self, shared: _Shared, mask: torch.Tensor) -> None:
        self._factors = None
        self._shared_now = (shared.factors, mask)
        self.shared_forwards += 1
        self._install(shared.factors)

    def _stacked(self, key: tuple) -> dict:
        """module -> (At [b, d_in, W], Bt [b, W, d_out]) for the rows ``key`` (built), for the modules they target."""
        present = set()
        for s in key:
            present.update(self._rows[s])
        modules = [m for m in self.pool.targets if m in present]
        if len(key) == 1:  # one row (a lone request's prefill): its own factors as they are, nothing stacked
            row = self._rows[key[0]]
            return {m: (row[m][0][None], row[m][1][None]) for m in modules}
        # The running batch's stack changes by the rows that joined or moved; a prefill's group (new rows only)
        # takes the other stack, so that the running batch's is not rewritten in between (:class:`_Stack`).
        overlap = [st.overlap(key) for st in self._stacks]
        best = max(range(len(self._stacks)), key=lambda i: (overlap[i], self._stacks[i].used))
        stack = self._stacks[best] if overlap[best] else min(self._stacks, key=lambda st: st.used)
        self._clock += 1
        stack.used = self._clock
        with torch.no_grad():
            return stack.assign(key, self._rows, modules)

    def prepare(self, rows: list[tuple[int, list[str], list[float], str]]) -> None:
        """Build the factors of rows not seen yet (as :meth:`set_rows` would), without changing the current batch's:
        a row whose adapters cannot be composed fails here, before it is in any forward."""
        new = [r for r in rows if r[0] not in self._linear]
        if new:
            self._pin(new)
            if not self.grouped:  # the grouped kernel builds per-row factors only for a forward that needs them
                self._build([self._spec[r[0]] for r in new])

    def _ensure_factors(self, serials) -> None:
        """Build the per-row factors of prepared rows that lack them (:meth:`prepare` with ``grouped``)."""
        missing = [s for s in dict.fromkeys(serials) if s not in self._rows]
        if missing:
            self._build([self._spec[s] for s in missing])

    def set_ragged(self, running: list[tuple[int, list[str], list[float], str]],
                   joining: list[tuple[int, list[str], list[float], str]], offsets: list[int], lengths: list[int]) -> None:
        """Factors for a mixed step (:class:`utils.decoding.RaggedStep`): the forward's tokens are packed in one
        sequence x [1, N, d_in], the running rows' tokens first (token i is row i's, one each), then joining row j's
        ``lengths[j]`` tokens from ``offsets[j]`` on. The hooks add the running rows' stacked factors to their tokens (as
        :meth:`set_rows` does for a decoding step) and each joining row's own factors to its span:

            h[0, i]         += (x[0, i] At_i) Bt_i                 i < len(running)
            h[0, o_j:o_j+L] += (x[0, o_j:o_j+L] At_j) Bt_j           (nothing for a base row)

        With the grouped kernel (:class:`_Shared`), every token of the forward shares one product per module instead,
        its row's mask picked per token.
        """
        self.prepare(joining)
        serials = [r[0] for r in running] + [r[0] for r in joining]
        shared = self._shared_for(serials) if any(r[1] for r in running + joining) else None
        if shared is not None:
            self._segments, self._joined, self.rows_key = None, None, None
            token_row = torch.cat([torch.arange(len(running))] +
                                  [torch.full((n,), len(running) + j) for j, n in enumerate(lengths)])
            rows = shared.mask([self._linear[s] for s in serials])
            self._use_shared(shared, rows.index_select(0, token_row.to(rows.device)))
            return
        self._ensure_factors(r[0] for r in joining if r[1])
        if running and any(r[1] for r in running):
            self.set_rows(running, shared=False)
        else:
            self.set_base()
        self._running = len(running)
        self._segments = [(o, o + n, r[0]) for o, n, r in zip(offsets, lengths, joining) if r[1]]
        self._joined = None
        if len(self._segments) > 1:
            # Several composed joining rows: their spans gathered into one padded batch [J, L_max, d_in] (positions
            # past a span's end repeat its last token; their products are dropped), so that a module's delta for
            # them all is two batched products, as in a padded prefill, not two products per row.
            longest = max(end - o for o, end, _ in self._segments)
            gather = torch.tensor([min(o + i, end - 1) for o, end, _ in self._segments for i in range(longest)])
            kept = torch.tensor([j * longest + i for j, (o, end, _) in enumerate(self._segments) for i in range(end - o)])
            target = torch.cat([torch.arange(o, end) for o, end, _ in self._segments])
            factors = self._stacked(tuple(serial for _, _, serial in self._segments))
            dev = next(iter(factors.values()))[0].device if factors else gather.device
            self._joined = (factors, gather.to(dev), kept.to(dev), target.to(dev), longest)
        self._install({m for _, _, serial in self._segments for m in self._rows[serial]})

    def _pin(self, new: list[tuple[int, list[str], list[float], str]]) -> None:
        """Check and pin new rows' adapters (a row whose adapters cannot be composed fails here)."""
        for i, (_, ids, ws, _) in enumerate(new):
            if len(ids) != len(ws):
                raise ValueError(f"Row {i}: {len(ids)} adapters but {len(ws)} weights.")
        rows = adapter_rows(self.pool, [r[1] for r in new])
        row_names = [list(dict.fromkeys(row)) for row in rows]
        acquired = []
        try:
            for rn in row_names:
                self.pool.acquire(rn)
                acquired.append(rn)
            weights = [self.pool.pinned_weights(row) for row in rows]
        except BaseException:
            for rn in acquired:
                self.pool.release(rn)
            raise
        for i, r in enumerate(new):
            self._pins[r[0]] = row_names[i]
            self._spec[r[0]] = (r[0], rows[i], list(r[2]), r[3])
            # Fusion of several adapters is not linear in them; fusion of one is (w B)(w A) = w^2 B A.
            fusion = _is_fusion(r[3])
            self._linear[r[0]] = (None if fusion and len(rows[i]) > 1 else
                                  (weights[i], [float(w) ** 2 if fusion else float(w) for w in r[2]]))

    def _build(self, new: list[tuple[int, list[str], list[float], str]]) -> None:
        """Per-row factors of pinned rows, as :meth:`_pin` kept them (names resolved)."""
        k = max(max(len(r[1]) for r in new), 1)
        w = torch.zeros(len(new), k, dtype=torch.float32)
        for i, (_, ids, ws, _) in enumerate(new):
            if ids:
                w[i, :len(ws)] = torch.as_tensor(ws, dtype=torch.float32)
        rows = [r[1] for r in new]
        per_row: list[dict] = [{} for _ in new]
        if any(rows):
            fusion = torch.tensor([_is_fusion(r[3]) for r in new], dtype=torch.bool)
            b = len(new)
            with torch.no_grad():
                # Modules whose factors have one shape are composed in one call (their rows side by side): the
                # same element-wise math, a few operators for all the q_proj of a model instead of a few each.
                groups: dict[tuple, list] = {}
                for m, _, slots, rank in self.pool.slots(rows, k):
                    a, bb = slots[0]
                    groups.setdefault((rank, a.shape[1], bb.shape[0], a.dtype, a.device), []).append((m, slots))
                for (rank, d_in, d_out, _, dev), group in groups.items():
                    # A: [n * b * k, R, d_in], every module's slots (row-major) stacked once, n modules of the group
                    A = torch.stack([a for _, slots in group for a, _ in slots])
                    B = torch.stack([bb for _, slots in group for _, bb in slots])  # [n * b * k, d_out, R]
                    At, Bt = mixed_selected(A.view(-1, k, rank, d_in), B.view(-1, k, d_out, rank),
                                            w.to(dev).repeat(len(group), 1), fusion.to(dev).repeat(len(group)))
                    for j, (m, _) in enumerate(group):
                        for i in range(b):
                            per_row[i][m] = (At[j * b + i], Bt[j * b + i])
        for i, r in enumerate(new):
            self._rows[r[0]] = per_row[i]

    def _install(self, modules) -> None:
        """A hook on each of ``modules`` (names; a dict's keys) that has none yet, while active."""
        if not self.is_active:
            return
        for m in modules:
            if m not in self._handles:
                self._handles[m] = self.pool.targets[m].register_forward_hook(self._hook(m), with_kwargs=True)

    def _hook(self, m: str):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["x"]
            if self._shared_now is not None:
                factors, mask = self._shared_now
                f = factors.get(m)
                return output if f is None else _shared_delta(x, output, *f, mask)
            f = self._factors.get(m) if self._factors is not None else None
            if self._segments is not None:
                return self._ragged_delta(m, x, output, f)
            if f is None:
                return output
            At, Bt, dec = f
            return _add_delta(x, output, At, Bt, dec)
        return hook

    def _ragged_delta(self, m: str, x: torch.Tensor, output: torch.Tensor, f) -> torch.Tensor:
        """The deltas of a mixed step (:meth:`set_ragged`), added into ``output`` [1, N, d_out] in place."""
        b = self._running
        if f is not None:
            At, Bt, dec = f
            output[0, :b] = _add_delta(x[0, :b, None], output[0, :b, None], At, Bt, dec)[:, 0]
        if self._joined is not None:
            factors, gather, kept, target, longest = self._joined
            if m in factors:
                At, Bt = factors[m]
                xs = x[0].index_select(0, gather).view(len(self._segments), longest, -1).to(At.dtype)
                delta = torch.bmm(torch.bmm(xs, At), Bt).view(-1, Bt.shape[2]).index_select(0, kept)
                output[0].index_add_(0, target, delta.to(output.dtype))
            return output
        for o, end, serial in self._segments:
            part = self._rows[serial].get(m)
            if part is not None:
                At_r, Bt_r = part
                output[0, o:end] += ((x[0, o:end].to(At_r.dtype) @ At_r) @ Bt_r).to(output.dtype)
        return output

    def set_base(self) -> None:
        """The next forwards add nothing (every row is a base row)."""
        self._factors, self.rows_key, self._segments, self._shared_now = None, None, None, None

    def forget(self, serials) -> None:
        """Drop the kept factors of rows that have left the batch, and unpin their adapters."""
        serials = list(serials)
        if self.rows_key is not None and set(serials) & set(self.rows_key):
            self.set_base()  # the stacked factors hold a forgotten row: the next set_rows restacks
        gone = set(serials)
        for stack in self._stacks:  # a serial may come back with other factors (a new decoder counts from 0 again)
            stack.forget(gone)
        for s in serials:
            self._rows.pop(s, None)
            self._linear.pop(s, None)
            self._spec.pop(s, None)
            names = self._pins.pop(s, None)
            if names:
                self.pool.release(names)

    @contextmanager
    def active(self):
        """The base model with the live per-row deltas on (until exit)."""
        self.is_active = True
        try:
            if self._factors:
                self._install(self._factors)
            if self._shared_now is not None:
                self._install(self._shared_now[0])
            yield self.pool.model
        finally:
            self.is_active = False
            for h in self._handles.values():
                h.remove()
            self._handles = {}


def materialize(pool: AdapterPool, names: list[str], weights, mode: str, out_dir, base_model_name: str | None = None):
    """Write ONE composition of pool adapters as a standard PEFT LoRA directory (what a one-adapter server can load).

    Mixture and fusion are each exactly one LoRA (module docstring): at every module m the adapters target,

        mixture:   A = concat_j A_j (rank k*R_m),   B = concat_j w_j s_j B_j
        fusion:    A = sum_j w_j A_j (rank R_m),    B = sum_j w_j s_j B_j

    The weights and scalings are folded into B, so the adapter's own scaling is 1 (``lora_alpha == r``). Every module
    is zero-padded to the largest rank r over modules (zero rows add nothing), so the directory needs no
    ``rank_pattern``. ``composition.json`` beside it records the adapters, weights and mode. Written to a temporary
    folder next to ``out_dir`` and renamed into place.

    Returns ``out_dir`` (a Path) and the adapter's rank r.
    """
    import json
    import os
    import shutil
    from pathlib import Path

    from safetensors.torch import save_file

    if mode not in MODES:
        raise ValueError(f"Unknown composition mode {mode!r}; use one of {MODES}.")
    if len(names) != len(weights) or not names:
        raise ValueError(f"{len(names)} adapters but {len(weights)} weights; give one weight per adapter.")
    w = torch.as_tensor([list(weights)], dtype=torch.float32)
    unique = list(dict.fromkeys(names))
    factors = {}
    with _pinned(pool, unique), torch.no_grad():
        ranks = {n: {m: a.shape[0] for m, (a, _) in pool.weights(n).modules.items()} for n in unique}
        for m, _, A_sel, B_sel in pool.gather([list(names)], len(names)):
            At, Bt = compose_selected(A_sel.float(), B_sel.float(), w, mode)  # [1, d_in, R'], [1, R', d_out]
            # gather pads each slot to the largest rank R among the adapters; keep only real rows (the zero padding
            # would add to the rank vLLM must hold): mixture, slot j's first r_j rows; fusion, the first max_j r_j.
            R = A_sel.shape[2]
            r = [ranks[n].get(m, 0) for n in names]
            keep = ([j * R + i for j, rj in enumerate(r) for i in range(rj)] if mode == "mixture" else list(range(max(r))))
            factors[m] = (At[0].T[keep].contiguous(), Bt[0].T[:, keep].contiguous())  # A [R', d_in], B [d_out, R']
    rank = max(a.shape[0] for a, _ in factors.values())
    tensors = {}
    for m, (a, b) in factors.items():
        pad = rank - a.shape[0]
        tensors[f"base_model.model.{m}.lora_A.weight"] = torch.nn.functional.pad(a, (0, 0, 0, pad)).contiguous()
        tensors[f"base_model.model.{m}.lora_B.weight"] = torch.nn.functional.pad(b, (0, pad)).contiguous()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none",
              "target_modules": sorted(factors), "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
              "inference_mode": True, "base_model_name_or_path": base_model_name}
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1))
    (tmp / "composition.json").write_text(json.dumps({"mode": mode, "adapters": list(names), "weights": [float(x) for x in weights],
                                                      "sources": [pool.entries[n].path for n in unique if n in pool.entries]}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out, rank
