"""Stage: Arrow routing, PEFT's training-free token-level mixture of the pool's LoRAs (a baseline).

Arrow (Ostapenko et al., 2024) routes every token, in every LoRA layer, to the adapters whose prototype is
closest to the token's hidden state. PEFT implements it (``ArrowConfig`` / ``create_arrow_model``); this module
only builds that model from the pool and checks the pool first. Per LoRA layer, with pool adapters e = 1..E:

    prototype p_e = top right singular vector of s_e B_e A_e (power iteration)     [d_in]
    for a token x [d_in]:  sim_e = |<x, p_e>|,  the top-k sims kept, the others -inf,
                           c = softmax(sim / router_temperature)                    [E]
                           h = W x + sum_e c_e s_e B_e A_e x

GenKnowSub (``use_gks``) first subtracts the average of some *general* LoRAs (trained on general text, given
apart from the pool) from every task LoRA's A and B.

PEFT's Arrow needs every adapter to have the same rank and the same target modules, and linear targets only;
:func:`check_arrow_pool` refuses other pools before any model loads. Arrow injects its own LoRA layers into the
base model, so it is built on a base model without the pool's layers and removed (``unload``) after the run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from utils.data import InputError, PoolEntry, check_adapter_config, looks_like_hub_id

logger = logging.getLogger(__name__)


def _adapter_shape(entry_path: str, where: str) -> tuple[int, tuple[str, ...]] | None:
    """(rank, sorted target modules) from a local adapter's config; None for a hub id (checked after loading)."""
    if looks_like_hub_id(entry_path):
        return None
    config_file = Path(entry_path) / "adapter_config.json"
    if not config_file.is_file():
        raise InputError(f"{where}: {entry_path} does not exist or has no adapter_config.json; give a PEFT LoRA directory or hub id.")
    config = check_adapter_config(config_file, where)
    targets = config.get("target_modules") or []
    if isinstance(targets, str):  # a regular expression: compared as written
        targets = [targets]
    ranks = set((config.get("rank_pattern") or {}).values()) | {int(config.get("r", 8))}
    if len(ranks) > 1:
        return (-1, tuple(sorted(targets)))
    return (ranks.pop(), tuple(sorted(targets)))


def check_arrow_pool(entries: list[PoolEntry], top_k: int, general_paths: list[str] | None = None, left_out: int = 0) -> None:
    """Refuse, before any model loads, a pool that PEFT's Arrow cannot route over (see the module docstring).

    ``left_out``: adapters each Arrow model goes without (1 for OOD, which leaves each task's own adapter out).
    """
    if top_k < 1:
        raise InputError(f"--arrow_top_k must be at least 1 (got {top_k}).")
    available = len(entries) - left_out
    if top_k > available:
        raise InputError(f"--arrow_top_k {top_k} is larger than the {available} adapters Arrow can route over"
                         + (" once the own task's adapter is left out" if left_out else "") + "; lower --arrow_top_k.")
    shapes = {}
    for e in entries:
        shape = _adapter_shape(e.path, f"Adapter {e.name!r}")
        if shape is not None:
            shapes[e.name] = shape
    for path in general_paths or []:
        shape = _adapter_shape(path, f"--arrow_general_adapters {path}")
        if shape is not None:
            shapes[f"general adapter {path}"] = shape
    if not shapes:
        return
    bad_rank = sorted(n for n, (r, _) in shapes.items() if r == -1)
    if bad_rank:
        raise InputError(f"Arrow needs one rank per adapter, but {', '.join(bad_rank)} set(s) per-module ranks (rank_pattern); "
                         "use --eval_type mixture or fusion, which handle any ranks.")
    by_shape: dict[tuple, list[str]] = {}
    for name, shape in shapes.items():
        by_shape.setdefault(shape, []).append(name)
    if len(by_shape) > 1:
        groups = "; ".join(f"rank {r} on {', '.join(t)}: {', '.join(sorted(ns)[:6])}{' ...' if len(ns) > 6 else ''}"
                           for (r, t), ns in sorted(by_shape.items(), key=lambda kv: -len(kv[1])))
        raise InputError(f"PEFT's Arrow routes only over adapters of one rank and one set of target modules, and this pool mixes "
                         f"them ({groups}); evaluate Arrow on a pool of matching adapters, or use --eval_type mixture / fusion, "
                         "which compose any ranks and targets (in eval_all.sh, SKIP=\"arrow arrow_ood\" leaves the Arrow rows out).")


def build_arrow_model(base_model, entries: list[PoolEntry], top_k: int, router_temperature: float,
                      general_paths: list[str] | None = None, seed: int = 0):
    """PEFT's Arrow model over ``entries`` on ``base_model`` (modified in place; call ``.unload()`` to restore it).

    The pool's adapters are loaded under PEFT's names ``task_0 .. task_{E-1}`` in ``entries`` order.
    """
    from peft import ArrowConfig, create_arrow_model

    check_arrow_pool(entries, top_k, general_paths)
    config = ArrowConfig(top_k=top_k, router_temperature=router_temperature, use_gks=bool(general_paths), rng_seed=seed)
    try:
        model = create_arrow_model(base_model, [e.path for e in entries], config,
                                   general_adapter_paths=list(general_paths) if general_paths else None)
    except ValueError as err:  # PEFT's own shape / rank / target checks (hub adapters are checked only here)
        raise InputError(f"PEFT's Arrow refused this pool: {err}. Arrow needs adapters of one rank and one set of target "
                         "modules; use --eval_type mixture or fusion for other pools.") from err
    except TypeError as err:  # non-linear targets
        raise InputError(f"PEFT's Arrow refused this pool: {err}. Use --eval_type mixture or fusion for such adapters.") from err
    model.eval()
    return model
