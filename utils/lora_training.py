"""Stage: LoRA training. One standard PEFT LoRA trained on a task's rows (what ``train_lora.py`` runs for each task).

The loss covers only the response tokens of the templated prompt, plus EOS, so that the adapter learns to stop
(:func:`utils.prompter.encode_supervised`). Rows are drawn in seeded, shuffled epochs, batch after batch; AdamW
with linear warmup then linear decay to 5% of the learning rate; gradients clipped to norm 1. The adapter directory
holds ``adapter_config.json``, ``adapter_model.safetensors`` and ``training.json`` (settings and loss curve).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


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

        self._check_types()
        checks = [("r", self.r >= 1, "at least 1"), ("steps", self.steps >= 1, "at least 1"), ("batch_size", self.batch_size >= 1, "at least 1"),
                  ("max_length", self.max_length >= 8, "at least 8"), ("lora_alpha", self.lora_alpha > 0, "above 0"),
                  ("learning_rate", self.learning_rate > 0, "above 0"), ("warmup_steps", self.warmup_steps >= 0, "0 or more"),
                  ("lora_dropout", 0 <= self.lora_dropout < 1, "in [0, 1)")]
        for name, ok, rule in checks:
            if not ok:
                raise InputError(f"Training setting {name} must be {rule} (got {getattr(self, name)!r}); fix --{name} or the settings file.")
        if not self.target_modules:
            raise InputError("target_modules must name at least one module, e.g. [q_proj, v_proj].")


    def _check_types(self) -> None:
        """Each field holds a value of its type (a whole number for int fields, a number for float fields, a list of names
        for ``target_modules``, of layer indices for ``layers_to_transform``); ints are taken as floats."""
        from utils.data import InputError

        def bad(name: str, kind: str):
            value = getattr(self, name)
            return InputError(f"Training setting {name} must be {kind} (got {value!r}, a {type(value).__name__}); "
                              f"fix --{name} or the settings file.")

        for f in fields(self):
            value, kind = getattr(self, f.name), f.type if isinstance(f.type, str) else f.type.__name__
            if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise bad(f.name, "a whole number")
            if kind == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise bad(f.name, "a number")
                setattr(self, f.name, float(value))
            if kind == "str" and not isinstance(value, str):
                raise bad(f.name, "a string")
        if not isinstance(self.target_modules, list) or not all(isinstance(m, str) and m for m in self.target_modules):
            raise bad("target_modules", "a list of module names, e.g. [q_proj, v_proj]")
        layers = self.layers_to_transform
        if layers is not None and (not isinstance(layers, list)
                                   or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)):
            raise bad("layers_to_transform", "null or a list of layer indices (whole numbers, 0 or more)")

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


def train_one(task: str, rows: list[dict], out_dir: Path, settings: TrainSettings, tokenizer, base_model, on_step=None) -> dict:
    """Train a LoRA on ``rows`` and save it to ``out_dir``; returns the training record.

    ``on_step(step, loss)``, when given, is called after every optimisation step (an exception it raises stops the
    training before anything is saved)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    from utils.prompter import Prompter, collate_supervised, encode_supervised

    if not rows:
        from utils.data import InputError

        raise InputError(f"Task {task!r} has no training rows; give it rows in its training file or leave it out (--task).")
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
        if on_step is not None:
            on_step(len(losses), losses[-1])
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
