"""Stage: retriever training. The paper's InfoNCE objective over distinct-task batches (``train_retriever.py --loss infonce``).

Each batch takes B distinct tasks; for each, an anchor input and a positive input of the same task. With embeddings
a_i, p_j (normalised) and temperature tau the loss is ``CE(softmax_j(<a_i, p_j> / tau), i)``: the other tasks'
positives are in-batch negatives. ``hard_negatives="domain"`` adds, for each anchor, an input of another task of the
same domain to the candidates, when the domain has one.
"""

from __future__ import annotations

import logging
import random

logger = logging.getLogger(__name__)


def train_infonce(model, by_task: dict[str, list[str]], domains: dict[str, str], args) -> list[float]:
    """InfoNCE over distinct-task batches with in-batch and optional same-domain hard negatives (module docstring).

    Shapes: anchors a [B, d], candidates c [B or 2B, d] (positives first, then hard negatives); logits a c^T / tau
    [B, B or 2B]; target of row i: column i.
    """
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tasks = sorted(t for t, xs in by_task.items() if len(xs) >= 2)
    if len(tasks) < 2:
        raise SystemExit("InfoNCE needs at least 2 training tasks with 2 inputs each.")
    batch = min(args.batch_size, len(tasks))
    same_domain = {t: [u for u in tasks if u != t and domains.get(u) == domains.get(t)] for t in tasks}
    device = next(model.parameters()).device
    model.max_seq_length = args.max_seq_length
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then linear decay to 0
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (args.steps - s) / max(1, args.steps - warmup)))
    prefix = args.instruction or ""

    def embed(texts):
        features = model.tokenize([prefix + t for t in texts])
        features = {k: v.to(device) if hasattr(v, "to") else v for k, v in features.items()}
        return torch.nn.functional.normalize(model(features)["sentence_embedding"], dim=-1)

    losses = []
    for step in tqdm(range(args.steps), desc="Training retriever (InfoNCE)", unit="step"):
        chosen = rng.sample(tasks, batch)
        anchors, positives, negatives = [], [], []
        for t in chosen:
            a, p = rng.sample(by_task[t], 2)
            anchors.append(a)
            positives.append(p)
            if args.hard_negatives == "domain" and same_domain[t]:
                negatives.append(rng.choice(by_task[rng.choice(same_domain[t])]))
        a = embed(anchors)
        c = embed(positives + negatives)
        logits = a @ c.T / args.tau
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(anchors), device=device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 25 == 0:
            logger.info("step %d: loss %.4f (mean of the last 25: %.4f)", step + 1, losses[-1], sum(losses[-25:]) / 25)
    model.eval()
    return losses
