"""Stage: input files. Reading and validating evaluation data and LoRA pool configurations.

Formats are the paper's (see the README): the evaluation data is a JSON list (or JSON Lines) of rows
``{"inputs", "targets", "task", "domain", "metric"}``; the pool config is a JSON list of
``{"model_name", "domain", "sample": [{"inputs", "targets"}, ...], "path"?}``.

Every problem raises :class:`InputError` with one line that names the file, the row or field, and the fix.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

METRICS = ("em", "rouge", "bleu")
ROW_FIELDS = ("inputs", "targets", "task", "domain", "metric")


class InputError(ValueError):
    """A user-supplied file, row or setting is invalid; the message says which and how to fix it."""


def _read_json_or_jsonl(path: Path, what: str):
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path} does not exist; check the path.")
    if not path.is_file():
        raise InputError(f"{what} {path} is not a file; pass a .json or .jsonl file.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{what} {path} is not UTF-8 text (byte {err.start}); re-save it as UTF-8.") from err
    if not text.strip():
        raise InputError(f"{what} {path} is empty; it must hold a JSON list of rows (or JSON Lines).")
    try:
        return json.loads(text)
    except json.JSONDecodeError as whole_err:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise InputError(
                    f"{what} {path} is neither JSON nor JSON Lines (line {lineno}: {whole_err.msg}); fix the syntax."
                ) from whole_err
        return rows


def load_rows(path: str | Path) -> list[dict]:
    """Read and validate evaluation rows (the paper's ``combined_test.json``)."""
    rows = _read_json_or_jsonl(Path(path), "Data file")
    if not isinstance(rows, list):
        raise InputError(f"Data file {path} holds a JSON {type(rows).__name__}, not a list of rows; wrap the rows in [...].")
    if not rows:
        raise InputError(f"Data file {path} holds no rows; give it at least one row.")
    for i, row in enumerate(rows):
        validate_row(row, i, path)
    return rows


def validate_row(row, i: int, path) -> None:
    where = f"Data file {path}, row {i}"
    if not isinstance(row, dict):
        raise InputError(f"{where} is a {type(row).__name__}, not an object with fields {list(ROW_FIELDS)}.")
    for key in ROW_FIELDS:
        if key not in row:
            raise InputError(f"{where} lacks the field {key!r}; every row needs {list(ROW_FIELDS)}.")
        if not isinstance(row[key], str):
            raise InputError(f"{where}: field {key!r} is a {type(row[key]).__name__}, expected a string.")
    if row["metric"] not in METRICS:
        raise InputError(f"{where}: unknown metric {row['metric']!r}; use one of {', '.join(METRICS)}.")
    if not row["inputs"].strip():
        # Refused, not warned about: retrieval and generation on an empty prompt produce a prediction that is
        # scored against the target, so one broken row would silently lower the method's score.
        raise InputError(f"{where} (task {row['task']!r}): 'inputs' is empty; fill it in or remove the row.")


@dataclass
class PoolEntry:
    """One LoRA of the pool: its name, domain, example inputs and where its weights live."""

    name: str
    domain: str
    samples: list[str]
    path: str  # local directory or hub id
    extra: dict = field(default_factory=dict)
    sample_targets: list = field(default_factory=list)  # each sample's 'targets' (None where a sample has none)


def looks_like_hub_id(path: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path)) and not Path(path).exists()


def load_pool_config(path: str | Path, adapter_pattern: str | None = None, check_paths: bool = True) -> list[PoolEntry]:
    """Read and validate a pool config (the paper's ``config/config2.json`` plus an optional ``path`` per entry).

    Where an entry has no ``path``, ``adapter_pattern`` gives it, with ``{name}`` replaced by ``model_name``
    (``loras/{name}`` or a hub pattern such as ``owner/prefix-{name}``). Relative local paths are resolved against the
    config file's directory first, then the working directory.
    """
    path = Path(path)
    entries = _read_json_or_jsonl(path, "Pool config")
    if not isinstance(entries, list):
        raise InputError(f"Pool config {path} holds a JSON {type(entries).__name__}, not a list of LoRA entries.")
    if not entries:
        raise InputError(f"Pool config {path} lists no LoRA; add at least one entry.")
    pool, seen = [], set()
    for i, entry in enumerate(entries):
        where = f"Pool config {path}, entry {i}"
        if not isinstance(entry, dict):
            raise InputError(f"{where} is a {type(entry).__name__}, not an object.")
        name = entry.get("model_name")
        if not isinstance(name, str) or not name:
            raise InputError(f"{where} lacks a string 'model_name'.")
        if name in seen:
            raise InputError(f"{where}: duplicate adapter name {name!r}; every 'model_name' must be unique.")
        seen.add(name)
        if not isinstance(entry.get("domain", ""), str):
            raise InputError(f"{where} ({name!r}): 'domain' is a {type(entry['domain']).__name__}, expected a string.")
        samples = entry.get("sample", [])  # no card: routed through the task library (LoRAuter) or by name, never retrieved
        if not isinstance(samples, list):
            raise InputError(f"{where} ({name!r}): 'sample' must be a list of example inputs (or left out for an adapter without a card).")
        texts, targets = [], []
        for s in samples:
            text = s.get("inputs") if isinstance(s, dict) else s
            if not isinstance(text, str):
                raise InputError(f"{where} ({name!r}): each sample must be a string or an object with a string 'inputs'.")
            texts.append(text)
            target = s.get("targets") if isinstance(s, dict) else None
            targets.append(target if isinstance(target, str) else None)
        adapter_path = entry.get("path")
        if adapter_path is None:
            if adapter_pattern is None:
                raise InputError(f"{where} ({name!r}) has no 'path'; add one or pass --adapter_pattern (e.g. 'loras/{{name}}').")
            try:
                adapter_path = adapter_pattern.format(name=name)
            except (KeyError, IndexError, ValueError) as err:
                raise InputError(f"--adapter_pattern {adapter_pattern!r} is not a valid pattern ({err!r}); "
                                 "use {name} as the only placeholder, e.g. loras/{name}.") from err
        elif not isinstance(adapter_path, str) or not adapter_path:
            raise InputError(f"{where} ({name!r}): 'path' must be a non-empty string (a local directory or a hub id).")
        adapter_path = resolve_adapter_path(str(adapter_path), path.parent)
        if check_paths and not looks_like_hub_id(adapter_path):
            if not (Path(adapter_path) / "adapter_config.json").is_file():
                raise InputError(
                    f"{where} ({name!r}): adapter path {adapter_path} does not exist or has no adapter_config.json; "
                    f"train it (python train_lora.py) or fix 'path' / --adapter_pattern."
                )
            check_adapter_config(Path(adapter_path) / "adapter_config.json", f"{where} ({name!r})")
        pool.append(PoolEntry(name=name, domain=str(entry.get("domain", "")), samples=texts, path=adapter_path,
                              extra={k: v for k, v in entry.items() if k not in ("model_name", "domain", "sample", "path")},
                              sample_targets=targets))
    return pool


def check_adapter_config(config_file: Path, where: str) -> dict:
    """The adapter's ``adapter_config.json``, checked to be readable JSON of a LoRA (``peft_type`` ``LORA``)."""
    try:
        config = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise InputError(f"{where}: {config_file} is not UTF-8 text (byte {err.start}); the adapter's config is unreadable, re-save or re-export it.") from err
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: {config_file} is not valid JSON (line {err.lineno}: {err.msg}); the adapter's config is "
                         "unreadable, re-save or re-export the adapter.") from err
    except OSError as err:
        raise InputError(f"{where}: cannot read {config_file} ({err.strerror}).") from err
    if not isinstance(config, dict):
        raise InputError(f"{where}: {config_file} holds a JSON {type(config).__name__}, not a peft adapter config object.")
    peft_type = config.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise InputError(f"{where}: {config_file} describes a {peft_type!r} adapter, not a LoRA (peft_type 'LORA'); "
                         "only LoRA adapters can be retrieved and composed, remove it from the pool.")
    return config


def resolve_adapter_path(adapter_path: str, config_dir: Path) -> str:
    p = Path(adapter_path)
    if p.is_absolute():
        return str(p)
    beside = config_dir / p
    if beside.exists():
        return str(beside.resolve())
    if p.exists():
        return str(p.resolve())
    return adapter_path
