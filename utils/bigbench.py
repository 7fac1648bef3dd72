"""BIG-bench 1.0.0 as a source of real tasks: the PyPI sdist, its JSON tasks, and their rendering as rows.

Used by the data builders under ``data/``. Multiple-choice examples are rendered FLAN-style: the input, a blank
line, ``OPTIONS:`` and one ``- option`` line per choice; the target is the text of the best-scored option.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tarfile
from pathlib import Path

logger = logging.getLogger(__name__)

SDIST_NAME = "bigbench-1.0.0.tar.gz"
TASK_DIR = "bigbench-1.0.0/bigbench/benchmark_tasks"


def download_sdist(cache: Path) -> Path:
    """The BIG-bench sdist from PyPI (downloaded once into ``cache``)."""
    path = cache / SDIST_NAME
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    logger.info("Downloading %s from PyPI into %s (358 MB, once)", SDIST_NAME, cache)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
           "bigbench==1.0.0", "-d", str(cache)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if not path.exists():
        # pip may fail to *prepare metadata* of the sdist yet still have saved the archive (older pips), or refuse it
        # without saving it (newer pips: the sdist declares a direct-URL dependency). Then fetch the file that PyPI's
        # simple index lists, and check its sha256 against the index's.
        try:
            fetch_from_index(path)
        except (OSError, ValueError) as err:
            raise SystemExit(f"Could not download {SDIST_NAME} with: {' '.join(cmd)}\n{done.stderr[-1500:]}\nnor from "
                             f"{SIMPLE_INDEX}: {err}") from err
    return path


SIMPLE_INDEX = "https://pypi.org/simple/bigbench/"


def fetch_from_index(path: Path) -> None:
    """Download ``path.name`` from PyPI's simple index into ``path``, checking the sha256 the index gives."""
    import hashlib
    import re
    import urllib.request

    with urllib.request.urlopen(SIMPLE_INDEX, timeout=60) as r:
        page = r.read().decode("utf-8")
    m = re.search(r'href="([^"]*/' + re.escape(path.name) + r')#sha256=([0-9a-f]{64})"', page)
    if m is None:
        raise ValueError(f"{SIMPLE_INDEX} lists no {path.name}")
    url, sha = m.group(1), m.group(2)
    tmp = path.with_name(path.name + ".part")
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=600) as r, open(tmp, "wb") as f:
        while chunk := r.read(1 << 20):
            digest.update(chunk)
            f.write(chunk)
    if digest.hexdigest() != sha:
        tmp.unlink()
        raise ValueError(f"{url} has sha256 {digest.hexdigest()}, the index says {sha}")
    tmp.rename(path)


def read_tasks(sdist: Path, sources: list[str]) -> dict[str, dict]:
    wanted = {f"{TASK_DIR}/{s}/task.json": s for s in sources}
    found = {}
    with tarfile.open(sdist) as tf:
        for member in tf:
            if member.name in wanted:
                found[wanted[member.name]] = json.load(tf.extractfile(member))
    missing = sorted(set(sources) - set(found))
    if missing:
        raise SystemExit(f"{sdist} lacks the tasks {missing}; is it the bigbench 1.0.0 sdist?")
    return found


def render(example: dict, prefix: str) -> tuple[str, str] | None:
    """(inputs, targets) of one BIG-bench example, or None when it has no usable target."""
    text = (prefix + example["input"]).strip()
    if "target_scores" in example:
        options = list(example["target_scores"])
        scores = example["target_scores"]
        best = max(options, key=lambda o: scores[o])
        if sum(1 for o in options if scores[o] == scores[best]) != 1:
            return None
        text = text + "\n\nOPTIONS:\n" + "\n".join(f"- {o.strip()}" for o in options)
        return text, best.strip()
    target = example.get("target")
    if isinstance(target, list):
        target = target[0] if target else None
    if not isinstance(target, str) or not target.strip():
        return None
    return text, target.strip()
