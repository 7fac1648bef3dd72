"""Fine-tune a retriever with the paper's instruction-conditioned contrastive objective.

    python train_retriever.py --train_fraction 0.4 --out models/retriever   # then: main.py --retriever models/retriever

A seeded fraction of the pool's tasks is used for training; the rest are held out to measure how the
retriever generalises to tasks it never saw. Every input is embedded with the retrieval instruction as the
sentence-transformers prompt. For an input of task t, the other inputs of t in the batch are positives and
the inputs of other tasks are negatives: batches are grouped by task label (``GROUP_BY_LABEL``) and the loss
is sentence-transformers' ``BatchHardSoftMarginTripletLoss`` (for each anchor, its hardest positive against
its hardest negative), trained with ``SentenceTransformerTrainer``.

Training inputs: each training task's ``sample`` inputs from the pool config plus, when present, its rows in
``--train_dir`` (the suite's training split). The held-out split is written to ``<out>/task_split.json``, and
``evaluate_retrieval.py --tasks ...`` reports accuracy on the held-out tasks.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path

logger = logging.getLogger("train_retriever")


def split_tasks(names: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train tasks, held-out tasks): a seeded ``fraction`` of the tasks (at least 2) for training."""
    if not 0 < fraction < 1:
        raise SystemExit(f"--train_fraction must lie strictly between 0 and 1 (got {fraction}).")
    order = sorted(names)
    random.Random(seed).shuffle(order)
    n = max(2, round(fraction * len(order)))
    if n >= len(order):
        raise SystemExit(f"--train_fraction {fraction} leaves no held-out task out of {len(order)}; lower it.")
    return sorted(order[:n]), sorted(order[n:])


def main(argv=None) -> int:
    from utils.retrieval import PAPER_INSTRUCTION

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default="config/bigbench_pool.json", help="pool config (tasks and their samples)")
    p.add_argument("--train_dir", default="data/bigbench/train", help="optional <task>.json training rows per task")
    p.add_argument("--retriever", default="embedded:all-minilm-l6-v2", help="sentence-transformers model to fine-tune")
    p.add_argument("--instruction", default=PAPER_INSTRUCTION, help="instruction given as the prompt")
    p.add_argument("--train_fraction", type=float, default=0.4, help="fraction of tasks used for training (the paper: ~40%%)")
    p.add_argument("--per_task", type=int, default=64, help="training inputs per task")
    p.add_argument("--epochs", type=float, default=1.0, help="training epochs")
    p.add_argument("--batch_size", type=int, default=32, help="inputs per batch")
    p.add_argument("--learning_rate", type=float, default=2e-5, help="learning rate")
    p.add_argument("--seed", type=int, default=0, help="task-split and training seed")
    p.add_argument("--adapter_vector", default="normalized_mean", choices=("normalized_mean", "mean"),
                   help="the adapter vector the retriever is meant to be used with (recorded in task_split.json)")
    p.add_argument("--out", default="models/retriever", help="output model directory")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from utils.data import InputError, load_pool_config

    checks = [("--train_fraction", 0 < args.train_fraction < 1, "between 0 and 1 (exclusive)"), ("--per_task", args.per_task >= 2, "at least 2"),
              ("--epochs", args.epochs > 0, "above 0"), ("--batch_size", args.batch_size >= 2, "at least 2"),
              ("--learning_rate", args.learning_rate > 0, "above 0")]
    try:
        for flag, ok, rule in checks:
            if not ok:
                raise InputError(f"{flag} must be {rule} (got {getattr(args, flag[2:])}).")
        pool = load_pool_config(args.config_path, check_paths=False, adapter_pattern="{name}")
    except InputError as err:
        logger.error("%s", err)
        return 2

    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import BatchHardSoftMarginTripletLoss
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    from utils.retrieval import Embedder

    train_tasks, held_out = split_tasks([e.name for e in pool], args.train_fraction, args.seed)
    logger.info("Training on %d tasks %s; holding out %d %s", len(train_tasks), train_tasks, len(held_out), held_out)
    rng = random.Random(args.seed)
    texts, labels = [], []
    for label, entry in enumerate(e for e in pool if e.name in train_tasks):
        inputs = list(entry.samples)
        extra = Path(args.train_dir) / f"{entry.name}.json"
        if extra.is_file():
            inputs += [r["inputs"] for r in json.loads(extra.read_text(encoding="utf-8"))]
        inputs = list(dict.fromkeys(inputs))
        rng.shuffle(inputs)
        for t in inputs[: args.per_task]:
            texts.append(t)
            labels.append(label)
    dataset = Dataset.from_dict({"text": texts, "label": labels})
    embedder = Embedder(args.retriever, args.instruction)
    model = embedder.model
    out = Path(args.out)
    targs = SentenceTransformerTrainingArguments(
        output_dir=str(out / "checkpoints"), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, warmup_steps=0.1, seed=args.seed, batch_sampler=BatchSamplers.GROUP_BY_LABEL,
        prompts=args.instruction, save_strategy="no", report_to="none", logging_steps=5, use_cpu=not _cuda())
    trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=dataset, loss=BatchHardSoftMarginTripletLoss(model))
    trainer.train()
    model.save(str(out))
    (out / "task_split.json").write_text(json.dumps({"train": train_tasks, "held_out": held_out, "seed": args.seed,
                                                     "train_fraction": args.train_fraction, "instruction": args.instruction,
                                                     "base_retriever": args.retriever, "adapter_vector": args.adapter_vector}, indent=1), encoding="utf-8")
    logger.info("Saved the retriever to %s (load it with main.py --retriever %s)", out, out)
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
