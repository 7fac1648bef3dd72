"""Stage: results. Self-describing results files, a resumable checkpoint and atomic writes.

A results file is one JSON object:
    {"format": "lora_retriever.results/1", "settings": {...resolved settings...},
     "meta": {"date", "git_commit", "versions", "seed"}, "rows": [row, ...]}
where each row has the paper's fields (``inputs``, ``targets``, ``task``, ``domain``, ``metric``,
``predicted_answer``) plus ``adapters`` and ``weights`` (and ``scores`` when retrieved).

While a run is going, finished rows are appended to ``<res_path>.partial.jsonl``; its first line
holds the settings fingerprint, so a resumed run with other settings is refused.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

from utils.data import InputError

logger = logging.getLogger(__name__)

RESULTS_FORMAT = "lora_retriever.results/1"
VERSIONED_PACKAGES = ("torch", "transformers", "peft", "sentence-transformers", "faiss-cpu", "accelerate", "numpy")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_metadata(seed: int) -> dict:
    versions = {"python": platform.python_version()}
    for pkg in VERSIONED_PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "git_commit": git_commit(),
            "versions": versions, "seed": seed}


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def check_writable(path: str | Path) -> None:
    """Fail before any model loads if ``path`` cannot be written (the directory is created if missing)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"Results path {path} is a directory; pass a file name such as {path / 'run.json'}.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".write_test", delete=True):
            pass
    except OSError as err:
        raise InputError(f"Results path {path} is not writable ({err.strerror}); choose another --res_path.") from err


def current_umask() -> int:
    """The process's umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | Path, obj) -> None:
    """Write JSON to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file with mode 0600, which the rename would carry over; a results file follows the
        # user's umask like any other output (shared result folders on clusters).
        os.chmod(tmp, 0o666 & ~current_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Checkpoint:
    """Append-only JSON Lines record of finished rows (``{"index": i, ...row}``) for one run."""

    def __init__(self, res_path: str | Path, settings: dict, shard: int | None = None):
        suffix = ".partial.jsonl" if shard is None else f".rank{shard}.partial.jsonl"
        self.path = Path(str(res_path) + suffix)
        self.settings = settings
        self.fingerprint = fingerprint(settings)

    def load(self) -> dict[int, dict]:
        """Rows already finished by an earlier run with the same settings (index -> row)."""
        if not self.path.exists():
            return {}
        done = {}
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        try:
            header = json.loads(lines[0])
        except (json.JSONDecodeError, IndexError):
            header = {}
        if header.get("fingerprint") != self.fingerprint:
            old = header.get("settings", {})
            diff = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
            raise InputError(
                f"Checkpoint {self.path} belongs to a run with other settings (differing: {', '.join(diff) or 'unknown'}); "
                f"rerun with the same settings to resume, or delete the checkpoint (or pass --no_resume) to start over."
            )
        for line in lines[1:]:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("Ignoring a torn last line in %s (the run was killed while writing it)", self.path)
                break
            done[row["index"]] = row
        return done

    def start(self, keep: dict[int, dict]) -> None:
        """(Re)write the header and the rows to keep, dropping any torn line."""
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"fingerprint": self.fingerprint, "settings": self.settings}, ensure_ascii=False) + "\n")
            for i in sorted(keep):
                f.write(json.dumps(keep[i], ensure_ascii=False) + "\n")
        os.replace(tmp, self.path)

    def append(self, rows: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        if self.path.exists():
            self.path.unlink()


def load_results(path: str | Path) -> tuple[dict, list[dict]]:
    """(settings, rows) of a results file: this project's format or the paper's plain list of rows.

    Raises :class:`InputError` naming the file and the cause: unreadable, not UTF-8, not valid JSON (a truncated
    file, for instance), or JSON of another shape.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"Results file {path} is not UTF-8 text (byte {err.start}); it is not a results file.") from err
    except OSError as err:
        raise InputError(f"Results file {path} cannot be read ({err.strerror}).") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"Results file {path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); it may be "
                         "truncated: rerun the run that wrote it, or move the file away.") from err
    if isinstance(data, dict) and "rows" in data:
        settings, rows = data.get("settings", {}), data["rows"]
    elif isinstance(data, list):
        settings, rows = {}, data
    else:
        raise InputError(f"Results file {path} is a JSON {type(data).__name__} without 'rows'; a results file is a list of rows "
                         "or an object with 'rows'.")
    if not isinstance(rows, list):
        raise InputError(f"Results file {path}: 'rows' is a {type(rows).__name__}, not a list of rows.")
    if not isinstance(settings, dict):
        settings = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InputError(f"Results file {path}, row {i} is a {type(row).__name__}, not an object.")
    return settings, rows
