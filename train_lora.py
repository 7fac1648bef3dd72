"""Train one standard PEFT LoRA per task of a suite (or one named task) on any causal LM.

    python train_lora.py                                   # every task of config/bigbench_pool.json
    python train_lora.py --task snarks --steps 60 --force  # one task, retrained
    python train_lora.py --inspect loras/bigbench/snarks   # peft_type, r, alpha, targets, parameters

Settings come from a YAML/JSON file (``--train_settings``, default config/train_lora.yaml) and flags
override them. The loss covers only the response tokens of the alpaca-formatted prompt (plus EOS, so
the adapter learns to stop). An adapter that already exists is reused unless ``--force``. Each trained
adapter directory holds ``adapter_config.json``, ``adapter_model.safetensors`` and ``training.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

logger = logging.getLogger("train_lora")
ROOT = Path(__file__).resolve().parent


@dataclass
class TrainSettings:
    """LoRA training settings; the defaults are sized for 2 CPU cores and a ~135M model."""

    base_model: str = "embedded:smollm2-135m-instruct"  # causal LM: hub id, local dir or embedded:NAME
    r: int = 8  # LoRA rank
    lora_alpha: int = 16  # LoRA alpha (scaling = alpha / r)
    lora_dropout: float = 0.05  # dropout on the LoRA input during training
    target_modules: list = field(default_factory=lambda: ["q_proj", "v_proj"])  # modules that get a LoRA
    layers_to_transform: list | None = None  # restrict the LoRA to these layer indices (None: all layers)
    learning_rate: float = 2e-3  # AdamW learning rate (linear decay after warmup)
    warmup_steps: int = 2  # linear warmup steps
    steps: int = 24  # optimisation steps
    batch_size: int = 4  # rows per step
    max_length: int = 192  # tokens per row (prompt + response); longer prompts keep their end
    seed: int = 0  # sampling and initialisation seed
    template: str = "alpaca"  # prompt template under templates/
    device: str = "cpu"  # training device
    dtype: str = "float32"  # model dtype during training

    def __post_init__(self):
        from utils.data import InputError

        checks = [("r", self.r >= 1, "at least 1"), ("steps", self.steps >= 1, "at least 1"), ("batch_size", self.batch_size >= 1, "at least 1"),
                  ("max_length", self.max_length >= 8, "at least 8"), ("lora_alpha", self.lora_alpha > 0, "above 0"),
                  ("learning_rate", self.learning_rate > 0, "above 0"), ("warmup_steps", self.warmup_steps >= 0, "0 or more"),
                  ("lora_dropout", 0 <= self.lora_dropout < 1, "in [0, 1)")]
        for name, ok, rule in checks:
            if not ok:
                raise InputError(f"Training setting {name} must be {rule} (got {getattr(self, name)!r}); fix --{name} or the settings file.")
        if not self.target_modules:
            raise InputError("target_modules must name at least one module, e.g. [q_proj, v_proj].")


def load_settings(path: str | None, overrides: dict) -> TrainSettings:
    values = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise SystemExit(f"Training settings file {path} does not exist.")
        import yaml

        values = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        known = {f.name for f in fields(TrainSettings)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SystemExit(f"Training settings file {path} has unknown keys {unknown}; known: {sorted(known)}.")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainSettings(**values)


def train_one(task: str, rows: list[dict], out_dir: Path, settings: TrainSettings, tokenizer, base_model) -> dict:
    """Train a LoRA on ``rows`` and save it to ``out_dir``; returns the training record."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    from utils.prompter import Prompter, collate_supervised, encode_supervised

    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    prompter = Prompter(settings.template)
    examples = [encode_supervised(tokenizer, prompter, r["inputs"], r["targets"], settings.max_length) for r in rows]
    config = LoraConfig(r=settings.r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        target_modules=list(settings.target_modules), layers_to_transform=settings.layers_to_transform,
                        task_type="CAUSAL_LM")
    model = get_peft_model(base_model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, settings.warmup_steps)) * max(0.05, 1 - s / settings.steps))
    losses, t0 = [], time.time()
    order: list[int] = []
    bar = tqdm(range(settings.steps), desc=f"Training {task}", unit="step")
    for _ in bar:
        batch = []
        for _ in range(settings.batch_size):  # epochs of shuffled rows, batch after batch
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            batch.append(examples[order.pop()])
        ids, labels, mask = collate_supervised(batch, tokenizer.pad_token_id)
        dev = settings.device
        loss = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    record = {"task": task, "train_rows": len(rows), "trainable_parameters": n_params, "seconds": round(time.time() - t0, 1),
              "losses": losses, "settings": asdict(settings)}
    (out_dir / "training.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    model.unload()  # restore the plain base model for the next task
    return record


def inspect_adapter(path: str) -> dict:
    """peft_type, r, alpha, target modules and parameter count of an adapter directory."""
    from safetensors import safe_open

    p = Path(path)
    cfg_path = p / "adapter_config.json"
    if not cfg_path.is_file():
        raise SystemExit(f"{path} is not a PEFT adapter directory (no adapter_config.json).")
    cfg = json.loads(cfg_path.read_text())
    n = 0
    weights = p / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(weights, "pt") as f:
            for key in f.keys():
                n += math.prod(f.get_slice(key).get_shape())
    return {"path": str(p), "peft_type": cfg.get("peft_type"), "r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"),
            "target_modules": cfg.get("target_modules"), "base_model": cfg.get("base_model_name_or_path"), "parameters": n}


def registered_path(adapter: Path, pool_path: Path) -> str:
    """How the pool config refers to an adapter: relative to the config when both sit in one project, else absolute."""
    adapter, config_dir = adapter.resolve(), pool_path.parent.resolve()
    if adapter.is_relative_to(config_dir.parent):
        return Path(os.path.relpath(adapter, config_dir)).as_posix()
    return str(adapter)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool_config", default=str(ROOT / "config" / "bigbench_pool.json"), help="pool config whose adapters to train")
    p.add_argument("--train_dir", default=str(ROOT / "data" / "bigbench" / "train"), help="directory of <task>.json training files")
    p.add_argument("--task", action="append", help="train only this task (repeatable)")
    p.add_argument("--adapter_dir", default=None, help="where adapters go (default: each entry's 'path', else loras/<task>)")
    p.add_argument("--force", action="store_true", help="retrain adapters that already exist")
    p.add_argument("--inspect", metavar="DIR", help="print an adapter's peft_type, r, alpha, target modules and parameter count, then exit")
    p.add_argument("--train_settings", default=str(ROOT / "config" / "train_lora.yaml"), help="YAML/JSON settings file")
    for f in fields(TrainSettings):
        kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, None)
        if f.name == "target_modules":
            p.add_argument("--target_modules", nargs="+", default=None, help="modules that get a LoRA")
        elif f.name == "layers_to_transform":
            p.add_argument("--layers_to_transform", nargs="+", type=int, default=None, help="layer indices that get a LoRA")
        else:
            p.add_argument(f"--{f.name}", type=kind or str, default=None, help=f"(default from settings file: {f.default})")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.inspect:
        sys.stdout.write(json.dumps(inspect_adapter(args.inspect), indent=1) + "\n")
        return 0
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainSettings)}
    from utils.data import InputError
    from utils.flags import resolve_device

    try:
        settings = load_settings(args.train_settings if Path(args.train_settings).exists() else None, overrides)
        resolve_device(settings.device)
    except (InputError, TypeError) as err:
        logger.error("%s", err)
        return 2
    pool_path = Path(args.pool_config)
    try:
        pool = json.loads(pool_path.read_text(encoding="utf-8"))
        if not isinstance(pool, list) or not all(isinstance(e, dict) and isinstance(e.get("model_name"), str) for e in pool):
            raise ValueError("expected a JSON list of objects with a string 'model_name'")
    except (OSError, ValueError) as err:  # missing, unreadable, not UTF-8, not JSON, wrong shape
        logger.error("Pool config %s cannot be used (%s); pass --pool_config with a valid pool config.", pool_path, err)
        return 2
    tasks = args.task or [e["model_name"] for e in pool] or sorted(p.stem for p in Path(args.train_dir).glob("*.json"))
    if not tasks:
        raise SystemExit(f"No task to train: {pool_path} lists none and {args.train_dir} holds no <task>.json file.")
    entries = {e["model_name"]: e for e in pool}
    todo = []
    for task in tasks:
        train_file = Path(args.train_dir) / f"{task}.json"
        if not train_file.is_file():
            raise SystemExit(f"No training file {train_file} for task {task!r}; build the suite (python data/build_bigbench_suite.py) or fix --train_dir.")
        entry = entries.get(task)
        if args.adapter_dir:
            out = Path(args.adapter_dir) / task
        elif entry and entry.get("path"):
            out = ((pool_path.parent / entry["path"]) if not Path(entry["path"]).is_absolute() else Path(entry["path"])).resolve()
        else:
            out = ROOT / "loras" / task
        rows = json.loads(train_file.read_text(encoding="utf-8"))
        if (out / "adapter_model.safetensors").is_file() and not args.force:
            logger.info("Reusing the trained adapter %s (pass --force to retrain)", out)
        else:
            todo.append((task, rows, out))
        if entry is None:  # register a new task in the pool config, with 20 of its training inputs as samples
            entry = {"model_name": task, "domain": rows[0].get("domain", ""), "sample": [{"inputs": r["inputs"], "targets": r["targets"]} for r in rows[:20]]}
            pool.append(entry)
            entries[task] = entry
        entry["path"] = registered_path(out, pool_path)
    pool_path.write_text(json.dumps(pool, ensure_ascii=False, indent=1), encoding="utf-8")
    if not todo:
        return 0
    from utils.model_loading import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(settings.base_model)
    tokenizer.padding_side = "right"
    base = load_base_model(settings.base_model, dtype=settings.dtype, device=settings.device)
    logger.info("Training %d adapter(s) with %s", len(todo), asdict(settings))
    for task, rows, out in todo:
        record = train_one(task, rows, out, settings, tokenizer, base)  # seeds itself: order of tasks does not matter
        logger.info("%s: %d steps in %.0f s, loss %.3f -> %.3f, saved to %s", task, settings.steps, record["seconds"],
                    record["losses"][0], record["losses"][-1], out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
