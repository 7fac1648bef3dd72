"""Train one standard PEFT LoRA per task of a suite (or one named task) on any causal LM.

    python train_lora.py                                   # every task of config/bigbench_pool.json
    python train_lora.py --task snarks --steps 48 --force  # one task, retrained
    python train_lora.py --inspect loras/bigbench/snarks   # peft_type, r, alpha, targets, parameters

Settings come from a YAML/JSON file (``--settings``, default config/train_lora.yaml) and flags
override them. The loss covers only the response tokens of the alpaca-formatted prompt (plus EOS, so
the adapter learns to stop). An adapter that already exists is reused unless ``--force``. Each trained
adapter directory holds ``adapter_config.json``, ``adapter_model.safetensors`` and ``training.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path

from utils.lora_training import TrainSettings, inspect_adapter, load_settings, train_one

logger = logging.getLogger("train_lora")
ROOT = Path(__file__).resolve().parent


def registered_path(adapter: Path, pool_path: Path) -> str:
    """How the pool config refers to an adapter: relative to the config when both sit in one project, else absolute."""
    adapter, config_dir = adapter.resolve(), pool_path.parent.resolve()
    if adapter.is_relative_to(config_dir.parent):
        return Path(os.path.relpath(adapter, config_dir)).as_posix()
    return str(adapter)


def build_parser() -> argparse.ArgumentParser:
    from utils.flags import HelpFormatter, add_deprecated_alias

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config_path", default=str(ROOT / "config" / "bigbench_pool.json"), help="pool config whose adapters to train")
    p.add_argument("--train_dir", default=str(ROOT / "data" / "bigbench" / "train"), help="directory of <task>.json training files")
    p.add_argument("--task", action="append", help="train only this task (repeatable)")
    p.add_argument("--adapter_dir", default=None, help="where adapters go (default: each entry's 'path', else loras/<task>)")
    p.add_argument("--force", action="store_true", help="retrain adapters that already exist")
    p.add_argument("--inspect", metavar="DIR", help="print an adapter's peft_type, r, alpha, target modules and parameter count, then exit")
    p.add_argument("--settings", default=str(ROOT / "config" / "train_lora.yaml"),
                   help="YAML/JSON file of training settings; the flags below override its values")
    for f in fields(TrainSettings):
        kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, None)
        if f.name == "target_modules":
            p.add_argument("--target_modules", nargs="+", default=None, help="modules that get a LoRA")
        elif f.name == "layers_to_transform":
            p.add_argument("--layers_to_transform", nargs="+", type=int, default=None, help="layer indices that get a LoRA")
        else:
            p.add_argument(f"--{f.name}", type=kind or str, default=None, help=f"(default from the settings file: {f.default})")
    add_deprecated_alias(p, "--pool_config", "--config_path")
    add_deprecated_alias(p, "--train_settings", "--settings")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.inspect:
        sys.stdout.write(json.dumps(inspect_adapter(args.inspect), indent=1) + "\n")
        return 0
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainSettings)}
    from utils.data import InputError
    from utils.flags import resolve_device

    try:
        settings = load_settings(args.settings if Path(args.settings).exists() else None, overrides)
        resolve_device(settings.device)
    except (InputError, TypeError) as err:
        logger.error("%s", err)
        return 2
    pool_path = Path(args.config_path)
    try:
        pool = json.loads(pool_path.read_text(encoding="utf-8"))
        if not isinstance(pool, list) or not all(isinstance(e, dict) and isinstance(e.get("model_name"), str) for e in pool):
            raise ValueError("expected a JSON list of objects with a string 'model_name'")
    except (OSError, ValueError) as err:  # missing, unreadable, not UTF-8, not JSON, wrong shape
        logger.error("Pool config %s cannot be used (%s); pass --config_path with a valid pool config.", pool_path, err)
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
        if not rows:
            raise SystemExit(f"The training file {train_file} of task {task!r} holds no rows; add rows or leave the task out.")
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
    base = load_base_model(settings.base_model, dtype=settings.dtype, device=settings.device,
                           linear_kernels="torch")  # training: gradients take F.linear anyway
    logger.info("Training %d adapter(s) with %s", len(todo), asdict(settings))
    for task, rows, out in todo:
        record = train_one(task, rows, out, settings, tokenizer, base)  # seeds itself: order of tasks does not matter
        logger.info("%s: %d steps in %.0f s, loss %.3f -> %.3f, saved to %s", task, settings.steps, record["seconds"],
                    record["losses"][0], record["losses"][-1], out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
