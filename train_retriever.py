"""Fine-tune a retriever with the paper's instruction-conditioned contrastive objective.

    python train_retriever.py --train_fraction 0.4 --out models/retriever   # then: main.py --retriever models/retriever
    python train_retriever.py --config_path data/retrieval_train/pool.json --train_dir data/retrieval_train/train \\
        --train_fraction 0.8 --loss infonce --hard_negatives domain --out models/retriever

A seeded fraction of the pool's tasks is used for training; the rest are held out to measure how the
retriever generalises to tasks it never saw. Every input is embedded with the retrieval instruction prepended
(as the sentence-transformers prompt does for models that pool over it). Two objectives:

- ``infonce`` (the paper's): each batch takes B distinct tasks; for each, an anchor input and a positive input of
  the same task. With embeddings a_i, p_j (normalised) and temperature tau, the loss is
  ``CE(softmax_j(<a_i, p_j> / tau), i)``: the other tasks' positives are in-batch negatives, and no other input of
  the anchor's task is in the batch to be a false negative. ``--hard_negatives domain`` adds, for each anchor, an
  input of another task of the same domain to the candidates (a hard negative), when the domain has one.
- ``triplet``: batches grouped by task label (``GROUP_BY_LABEL``) and sentence-transformers'
  ``BatchHardSoftMarginTripletLoss`` (each anchor's hardest positive against its hardest negative), trained with
  ``SentenceTransformerTrainer``.

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


def build_parser() -> argparse.ArgumentParser:
    from utils.flags import HelpFormatter
    from utils.retrieval import PAPER_INSTRUCTION

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
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
    p.add_argument("--loss", default="infonce", choices=("infonce", "triplet"), help="training objective (see above)")
    p.add_argument("--steps", type=int, default=60, help="infonce: optimisation steps (about 4 s each at batch 16 with hard negatives on 2 CPU cores)")
    p.add_argument("--tau", type=float, default=0.05, help="infonce: temperature of the softmax over candidates")
    p.add_argument("--hard_negatives", default="domain", choices=("none", "domain"), help="infonce: add a same-domain negative per anchor")
    p.add_argument("--max_seq_length", type=int, default=128, help="tokens per input during training")
    p.add_argument("--adapter_vector", default="normalized_mean", choices=("normalized_mean", "mean"),
                   help="the adapter vector the retriever is meant to be used with (recorded in task_split.json)")
    p.add_argument("--out", default="models/retriever", help="output model directory")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from utils.data import InputError, load_pool_config

    checks = [("--train_fraction", 0 < args.train_fraction < 1, "between 0 and 1 (exclusive)"), ("--per_task", args.per_task >= 2, "at least 2"),
              ("--epochs", args.epochs > 0, "above 0"), ("--batch_size", args.batch_size >= 2, "at least 2"),
              ("--learning_rate", args.learning_rate > 0, "above 0"), ("--steps", args.steps >= 1, "at least 1"),
              ("--tau", args.tau > 0, "above 0"), ("--max_seq_length", args.max_seq_length >= 8, "at least 8")]
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
    embedder = Embedder(args.retriever, args.instruction)
    model = embedder.model
    out = Path(args.out)
    if args.loss == "infonce":
        domains = {e.name: e.domain for e in pool}
        names = [e.name for e in pool if e.name in train_tasks]
        by_task = {name: [t for t, lab in zip(texts, labels) if names[lab] == name] for name in names}
        from utils.retriever_training import train_infonce

        losses = train_infonce(model, by_task, domains, args)
        model.save(str(out))
        write_split(out, train_tasks, held_out, args, losses)
        logger.info("Saved the retriever to %s (load it with main.py --retriever %s)", out, out)
        return 0
    dataset = Dataset.from_dict({"text": texts, "label": labels})
    targs = SentenceTransformerTrainingArguments(
        output_dir=str(out / "checkpoints"), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, warmup_steps=0.1, seed=args.seed, batch_sampler=BatchSamplers.GROUP_BY_LABEL,
        prompts=args.instruction, save_strategy="no", report_to="none", logging_steps=5, use_cpu=not _cuda())
    trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=dataset, loss=BatchHardSoftMarginTripletLoss(model))
    trainer.train()
    model.save(str(out))
    write_split(out, train_tasks, held_out, args)
    logger.info("Saved the retriever to %s (load it with main.py --retriever %s)", out, out)
    return 0


def write_split(out: Path, train_tasks: list[str], held_out: list[str], args, losses: list[float] | None = None) -> None:
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    if losses:
        settings["losses"] = [round(x, 5) for x in losses]
    (out / "task_split.json").write_text(json.dumps({"train": train_tasks, "held_out": held_out, "seed": args.seed,
                                                     "train_fraction": args.train_fraction, "instruction": args.instruction,
                                                     "base_retriever": args.retriever, "adapter_vector": args.adapter_vector,
                                                     "settings": settings}, indent=1), encoding="utf-8")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
