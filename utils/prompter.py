"""Stage: prompting. Prompt formats are JSON data under ``templates/`` (alpaca-lora format)."""

from __future__ import annotations

import json
from pathlib import Path

from utils.data import InputError

TEMPLATE_KEYS = ("description", "prompt_input", "prompt_no_input", "response_split")
DEFAULT_TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"


class Prompter:
    """Renders alpaca-style prompts from a template file.

    ``name`` is a template name (``alpaca`` reads ``templates/alpaca.json``) or a path to a JSON file.
    """

    def __init__(self, name: str = "alpaca", template_dir: Path = DEFAULT_TEMPLATE_DIR):
        path = Path(name) if name.endswith(".json") else Path(template_dir) / f"{name}.json"
        if not path.is_file():
            known = sorted(p.stem for p in Path(template_dir).glob("*.json"))
            raise InputError(f"Unknown template {name!r}: {path} does not exist. Known templates: {', '.join(known)}; or pass a path to a .json template.")
        try:
            template = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"Template {path} is not valid UTF-8 JSON: {err}") from err
        if not isinstance(template, dict):
            raise InputError(f"Template {path} holds a JSON {type(template).__name__}, not an object with the keys {list(TEMPLATE_KEYS)}.")
        missing = [k for k in TEMPLATE_KEYS if k not in template]
        if missing:
            raise InputError(f"Template {path} lacks the keys {missing}; an alpaca-format template has {list(TEMPLATE_KEYS)}.")
        for key in TEMPLATE_KEYS:
            if not isinstance(template[key], str):
                raise InputError(f"Template {path}: {key!r} is a {type(template[key]).__name__}, not a string.")
        for key, fields in (("prompt_input", {"instruction": "i", "input": "x"}), ("prompt_no_input", {"instruction": "i"})):
            try:
                template[key].format(**fields)
            except (KeyError, IndexError, ValueError) as err:
                raise InputError(f"Template {path}: {key!r} is not a valid format string ({err!r}); use only the placeholders "
                                 f"{{{'}, {'.join(fields)}}} and write literal braces as {{{{ }}}}.") from err
        if "{instruction}" not in template["prompt_no_input"]:
            raise InputError(f"Template {path}: 'prompt_no_input' has no {{instruction}} placeholder, so every input would be dropped.")
        self.name = name
        self.path = path
        self.template = template

    def generate_prompt(self, instruction: str, input: str | None = None, label: str | None = None) -> str:
        """The prompt for ``instruction`` (and ``input`` if given); ``label`` is appended for training."""
        if input:
            text = self.template["prompt_input"].format(instruction=instruction, input=input)
        else:
            text = self.template["prompt_no_input"].format(instruction=instruction)
        if label:
            text = f"{text}{label}"
        return text

    def get_response(self, output: str) -> str:
        """The part of a decoded full sequence after the template's response marker."""
        return output.split(self.template["response_split"], 1)[-1].strip()


def encode_supervised(tokenizer, prompter: Prompter, inputs: str, targets: str, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one prompt and its target, labels = -100 on the prompt: a loss covers the target and EOS only.

    The target keeps at most ``max_length // 2`` tokens; the prompt keeps its last tokens (the response marker).
    Used for LoRA training and for LoraHub's few-shot loss.
    """
    prompt_ids = tokenizer(prompter.generate_prompt(inputs), add_special_tokens=True).input_ids
    target_ids = tokenizer(targets, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    target_ids = target_ids[: max(1, max_length // 2)]
    keep = max_length - len(target_ids)
    prompt_ids = prompt_ids[-keep:] if keep > 0 else []
    return prompt_ids + target_ids, [-100] * len(prompt_ids) + target_ids


def collate_supervised(examples: list[tuple[list[int], list[int]]], pad_id: int, left: bool = False):
    """Padded (input_ids [n, T], labels [n, T] with -100 on padding, attention_mask [n, T]) tensors.

    Right-padded for training; ``left=True`` aligns every row at the end (its last tokens in the last positions).
    """
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        cols = slice(width - len(x), width) if left else slice(0, len(x))
        ids[i, cols] = torch.tensor(x)
        labels[i, cols] = torch.tensor(y)
        mask[i, cols] = 1
    return ids, labels, mask
