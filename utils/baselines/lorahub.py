"""Stage: LoraHub, one weight vector over a set of LoRAs learned gradient-free from a few labelled examples (a baseline).

LoraHub (Huang et al., 2023) fuses candidate LoRAs j = 1..n with one weight vector w (any sign, no sum constraint)

    A = sum_j w_j A_j,   B = sum_j w_j s_j B_j,   h = W x + B A x       (our ``fusion`` composition)

and chooses w by gradient-free search (nevergrad; NGOpt, or CMA-ES), starting from w = 0 (the base model) inside
[-1.5, 1.5]^n, minimising on a few labelled examples

    L(w) = mean over target tokens of the cross-entropy  +  l1 * mean_j |w_j|     (LoraHub: l1 = 0.05)

The examples are the pool entries' ``sample`` rows (inputs and targets), rendered with the run's prompt template; the
loss covers the target and EOS only. The learned w is then applied to every row of its scope through the same
per-sample composition as the other evaluation types.

Scopes (``main.py --lorahub_scope``): ``all``, one vector learned on examples of every pool task and used for the whole
mixed test set (the paper's "in the wild" setting); ``task``, one vector per task learned on that task's examples and
used for that task's rows (an oracle that knows each row's task).
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from utils.data import InputError, PoolEntry

logger = logging.getLogger(__name__)

OPTIMIZERS = ("NGOpt", "CMA")
BOUND = 1.5


@dataclass
class LearnedWeights:
    """One learned vector: the candidate adapters, their weights, and how the search went."""

    adapters: list[str]
    weights: list[float]
    loss: float  # the objective L(w) of the returned weights
    base_loss: float  # L(0): the base model's cross-entropy on the same examples
    evaluations: int
    seconds: float
    examples: int


def few_shot_examples(entries: list[PoolEntry], per_task: int) -> list[tuple[str, str]]:
    """The first ``per_task`` labelled samples (inputs, targets) of each entry, in pool order.

    An entry whose samples carry no ``targets`` cannot teach LoraHub anything: refused, naming it.
    """
    if per_task < 1:
        raise InputError(f"--lorahub_examples must be at least 1 (got {per_task}).")
    out = []
    for e in entries:
        labelled = [(x, y) for x, y in zip(e.samples, e.sample_targets or [None] * len(e.samples)) if y is not None]
        if not labelled:
            raise InputError(f"LoraHub learns from labelled examples, but the samples of adapter {e.name!r} have no 'targets'; "
                             "give its 'sample' entries as {\"inputs\": ..., \"targets\": ...} in the pool config.")
        out.extend(labelled[:per_task])
    return out


class FewShotLoss:
    """Mean target-token cross-entropy of the pool's model on fixed examples, under one fused weight vector.

    Args:
        pool: the loaded :class:`utils.adapter_pool.AdapterPool`.
        tokenizer, prompter: how examples become token ids (the run's template).
        examples: (inputs, targets) pairs.  batch_size: examples per forward.  max_length: tokens per example.
        max_padding: a batch's padded tokens stay within this many times its real ones (every padded position is
            computed; sorted by length and cut like this, the embedded profile's 26 examples cost 2,522 tokens
            per evaluation instead of 2,802 in batches of 8).
        autocast_dtype: compute the loss under ``torch.autocast`` in this dtype (e.g. bfloat16 for a float32 model on a
            GPU, or a CPU with bf16 instructions; the learned weights are then applied in the model's own dtype).
            None: the model's dtype. On a CPU without bf16 instructions autocast is emulated: 5.6 times slower than
            float32, and its rounding differs from a CPU that has them (docs/benchmarks.md, LoraHub's search).
    """

    def __init__(self, pool, tokenizer, prompter, examples: list[tuple[str, str]], batch_size: int = 8, max_length: int = 256,
                 autocast_dtype: torch.dtype | None = None, max_padding: float = 1.25):
        from utils.prompter import collate_supervised, encode_supervised

        if not examples:
            raise InputError("LoraHub has no examples to learn from.")
        self.pool = pool
        self.autocast_dtype = autocast_dtype
        encoded = [encode_supervised(tokenizer, prompter, x, y, max_length) for x, y in examples]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # similar lengths together: less padding
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        groups: list[list[int]] = []
        for i in order:  # at most batch_size rows, and padded tokens at most max_padding x the real ones
            g = groups[-1] if groups else None
            n = len(encoded[i][0])  # the longest so far: rows come sorted by length
            if g and len(g) < batch_size and n * (len(g) + 1) <= max_padding * (sum(len(encoded[j][0]) for j in g) + n):
                g.append(i)
            else:
                groups.append([i])
        self.batches = []
        for g in groups:
            ids, labels, mask = collate_supervised([encoded[i] for i in g], pad, left=True)
            # Rows are aligned at the end, so every target token sits in the last ``keep`` positions.
            keep = min(int((labels != -100).sum(1).max()) + 1, ids.shape[1])
            self.batches.append((ids, labels, mask, keep))
        self.n_examples = len(examples)
        self.n_tokens = int(sum(int((b[1] != -100).sum()) for b in self.batches))
        self.evaluations = 0

    @torch.inference_mode()
    def __call__(self, indices: list[int], weights) -> float:
        """Mean cross-entropy per target token with ``h = W x + (sum_j w_j s_j B_j)(sum_j w_j A_j) x``.

        The fused factors are built once per call (one weight vector for every example batch), by
        :func:`utils.composition.compose_shared`.
        """
        from contextlib import nullcontext

        from utils.composition import compose_shared

        self.evaluations += 1
        device = next(self.pool.model.parameters()).device
        autocast = torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None else nullcontext()
        total = 0.0
        with compose_shared(self.pool, list(indices), np.asarray(weights, dtype=np.float32), "fusion") as model:
            for ids, labels, mask, keep in self.batches:
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                with autocast:
                    # The LM head runs on the last ``keep`` positions only (the targets are short, the prompts long).
                    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                                   logits_to_keep=keep).logits
                logits = logits[:, :-1].float()  # position t predicts token t + 1
                target = labels[:, -(keep - 1):].to(device)
                total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                                 ignore_index=-100, reduction="sum"))
        return total / max(self.n_tokens, 1)


def learn_weights(loss: FewShotLoss, candidates: list[str], pool_index: dict[str, int], budget: int, seed: int,
                  l1: float = 0.05, optimizer: str = "NGOpt") -> LearnedWeights:
    """LoraHub's search: minimise ``loss(w) + l1 * mean|w|`` over w in [-1.5, 1.5]^n from w = 0, ``budget`` evaluations."""
    import nevergrad as ng

    if budget < 1:
        raise InputError(f"--lorahub_budget must be at least 1 (got {budget}).")
    if optimizer not in OPTIMIZERS:
        raise InputError(f"Unknown --lorahub_optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}.")
    idx = [pool_index[n] for n in candidates]
    t0 = time.time()
    start_evals = loss.evaluations
    base_loss = loss(idx, np.zeros(len(idx)))

    def objective(w: np.ndarray) -> float:
        return loss(idx, w) + l1 * float(np.abs(w).mean())

    param = ng.p.Array(init=np.zeros(len(idx)), lower=-BOUND, upper=BOUND)
    param.random_state = np.random.RandomState(seed)
    opt = getattr(ng.optimizers, optimizer)(parametrization=param, budget=budget, num_workers=1)
    best_w, best_value = np.zeros(len(idx)), base_loss  # w = 0 (the base model) is the starting point: keep it if nothing beats it
    with warnings.catch_warnings():
        # NGOpt's small-budget choice (COBYLA via scipy) warns about its own default trust-region radius.
        warnings.filterwarnings("ignore", message=".*RHOEND.*")
        for _ in range(budget):
            cand = opt.ask()
            value = objective(cand.value)
            opt.tell(cand, value)
            if value < best_value:
                best_w, best_value = np.array(cand.value, dtype=np.float64), value
    return LearnedWeights(adapters=list(candidates), weights=[round(float(x), 6) for x in best_w], loss=round(float(best_value), 6),
                          base_loss=round(float(base_loss), 6), evaluations=loss.evaluations - start_evals,
                          seconds=round(time.time() - t0, 2), examples=loss.n_examples)


class WeightStore:
    """Learned vectors of one run kept beside its results file (``<res_path>.lorahub.json``) until the run ends.

    An interrupted run resumes its search scope by scope instead of searching again; a store written under other
    settings is ignored.
    """

    def __init__(self, res_path: str | Path, fingerprint: str):
        self.path = Path(str(res_path) + ".lorahub.json")
        self.fingerprint = fingerprint
        self.vectors: dict[str, LearnedWeights] = {}
        if self.path.is_file():
            try:
                saved = json.loads(self.path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                saved = {}
            if saved.get("fingerprint") == fingerprint:
                self.vectors = {k: LearnedWeights(**v) for k, v in saved.get("vectors", {}).items()}

    def put(self, key: str, value: LearnedWeights) -> None:
        self.vectors[key] = value
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "vectors": {k: asdict(v) for k, v in self.vectors.items()}},
                                  indent=1), encoding="utf-8")
        os.replace(tmp, self.path)

    def remove(self) -> None:
        if self.path.exists():
            self.path.unlink()


def labelled_entries(pool: list[PoolEntry], library=()) -> list[PoolEntry]:
    """What ``--lorahub_scope all`` learns from: the pool entries with a card (whose samples must then carry targets:
    :func:`few_shot_examples` refuses them otherwise), then the task library's tasks
    (:class:`utils.task_library.Task`) as entries of their own, for a pool whose adapters come without cards."""
    out = [e for e in pool if e.samples]
    return out + [PoolEntry(t.name, t.domain, list(t.inputs), "", {}, list(t.targets)) for t in library]


def learn_scope_vectors(args, rows: list[dict], pool: list[PoolEntry], k: int, prompter, adapter_pool, tokenizer, retriever,
                        store: WeightStore, library=()) -> list[str]:
    """One weight vector per scope (``--lorahub_scope all``: the whole mixed set; ``task``: each task), kept in ``store``.

    A scope already in ``store`` (an interrupted run) is not searched again. With ``--ood`` a task's vector is learned
    without that task's adapter. Candidates are the whole pool, or (``--lorahub_candidates retrieved``) the ``k``
    adapters nearest to the mean embedding of the scope's examples. ``library``: the task library's tasks, examples
    of the ``all`` scope beside the pool's cards (:func:`labelled_entries`). Returns each row's scope key.
    """
    by_name = {e.name: e for e in pool}
    if args.lorahub_scope == "all":
        scopes = {"all": (labelled_entries(pool, library), None)}
        key_of = ["all"] * len(rows)
    else:
        tasks = list(dict.fromkeys(r["task"] for r in rows))
        scopes = {t: ([by_name[t]], t if args.ood else None) for t in tasks}
        key_of = [r["task"] for r in rows]
    for key, (entries, banned) in scopes.items():
        if key in store.vectors:
            logger.info("LoraHub %s: reusing the weights learned by the interrupted run", key)
            continue
        examples = few_shot_examples(entries, args.lorahub_examples)
        if args.lorahub_candidates == "retrieved":
            centre = retriever.embedder.encode([x for x, _ in examples]).mean(0, keepdims=True)
            centre /= max(float(np.linalg.norm(centre)), 1e-12)
            candidates = retriever.search_embeddings(centre, k, exclude=[banned])[0][0]
        else:
            candidates = [e.name for e in pool if e.name != banned]
        autocast = getattr(torch, args.lorahub_dtype) if args.lorahub_dtype else None
        loss = FewShotLoss(adapter_pool, tokenizer, prompter, examples, autocast_dtype=autocast)
        learned = learn_weights(loss, candidates, adapter_pool.index, args.lorahub_budget, args.seed, args.lorahub_l1,
                                args.lorahub_optimizer)
        logger.info("LoraHub %s: %d examples, %d evaluations in %.1f s; loss %.4f (base model %.4f); weights %s", key,
                    learned.examples, learned.evaluations, learned.seconds, learned.loss, learned.base_loss,
                    ", ".join(f"{n}={w:+.2f}" for n, w in zip(learned.adapters, learned.weights)))
        store.put(key, learned)
    return key_of
