"""Build the embedded mixed-task suite from BIG-bench 1.0.0, in the paper's file formats.

    python data/build_bigbench_suite.py            # downloads the sdist from PyPI once (358 MB)

Writes, for every task of SUITE (deterministic, seeded, disjoint splits):
    data/bigbench/train/<task>.json      training rows for the task's LoRA
    data/bigbench/test/<task>.json       test rows
    data/bigbench/combined_test.json     all test rows (the paper's combined_test.json format)
    data/bigbench/suite.json             tasks, domains, metrics and split sizes
    config/bigbench_pool.json            pool config: model_name, domain, 20 sample inputs, path

Multiple-choice tasks are rendered FLAN-style: the input, a blank line, ``OPTIONS:`` and one
``- option`` line per choice; the target is the text of the best-scored option.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("build_bigbench_suite")

ROOT = Path(__file__).resolve().parent.parent
SDIST_NAME = "bigbench-1.0.0.tar.gz"
TASK_DIR = "bigbench-1.0.0/bigbench/benchmark_tasks"


@dataclass(frozen=True)
class SuiteTask:
    name: str  # the adapter / task name used in the data files
    source: str  # BIG-bench task directory
    domain: str  # the paper's domain name
    metric: str  # em, rouge or bleu


SUITE = (
    SuiteTask("epistemic_reasoning", "epistemic_reasoning", "nli", "em"),
    SuiteTask("entailed_polarity", "entailed_polarity", "nli", "em"),
    SuiteTask("snarks", "snarks", "sentiment", "em"),
    SuiteTask("irony_identification", "irony_identification", "sentiment", "em"),
    SuiteTask("sports_understanding", "sports_understanding", "commonsense", "em"),
    SuiteTask("social_iqa", "social_iqa", "commonsense", "em"),
    SuiteTask("disambiguation_qa", "disambiguation_qa", "coreference", "em"),
    SuiteTask("winowhy", "winowhy", "coreference", "em"),
    SuiteTask("qa_wikidata", "qa_wikidata", "closed_book QA", "em"),
    SuiteTask("disfl_qa", "disfl_qa", "reading comp", "em"),
    SuiteTask("e2e_nlg", "gem/e2e_nlg", "struct to text", "rouge"),
    SuiteTask("common_gen", "gem/common_gen", "struct to text", "rouge"),
    SuiteTask("asset", "gem/asset", "paraphrase", "bleu"),
)


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


def build(sdist: Path, out_dir: Path, pool_config: Path, adapter_dir: str, test_size: int, sample_size: int,
          train_size: int, max_input_chars: int, seed: int) -> dict:
    raw = read_tasks(sdist, [t.source for t in SUITE])
    (out_dir / "train").mkdir(parents=True, exist_ok=True)
    (out_dir / "test").mkdir(parents=True, exist_ok=True)
    combined, pool, summary = [], [], []
    for task in SUITE:
        data = raw[task.source]
        prefix = data.get("task_prefix", "") or ""
        rows, skipped = [], 0
        for ex in data["examples"]:
            r = render(ex, prefix)
            if r is None or len(r[0]) > max_input_chars:
                skipped += 1
                continue
            rows.append({"inputs": r[0], "targets": r[1], "task": task.name, "domain": task.domain, "metric": task.metric})
        # Deduplicate inputs so that the splits are disjoint in content, not only in position.
        unique = list({r["inputs"]: r for r in rows}.values())
        random.Random(f"{seed}:{task.name}").shuffle(unique)
        need = test_size + sample_size + 8
        if len(unique) < need:
            raise SystemExit(f"Task {task.name} has {len(unique)} usable rows, fewer than the {need} needed; lower --test_size.")
        test = unique[:test_size]
        samples = unique[test_size:test_size + sample_size]
        train = unique[test_size + sample_size:test_size + sample_size + train_size]
        (out_dir / "train" / f"{task.name}.json").write_text(json.dumps(train, ensure_ascii=False, indent=1), encoding="utf-8")
        (out_dir / "test" / f"{task.name}.json").write_text(json.dumps(test, ensure_ascii=False, indent=1), encoding="utf-8")
        combined.extend(test)
        pool.append({"model_name": task.name, "domain": task.domain, "metric": task.metric,
                     "path": f"{adapter_dir}/{task.name}",
                     "sample": [{"inputs": s["inputs"], "targets": s["targets"]} for s in samples]})
        summary.append({"task": task.name, "source": f"bigbench/{task.source}", "domain": task.domain, "metric": task.metric,
                        "usable": len(unique), "skipped": skipped, "train": len(train), "sample": len(samples), "test": len(test)})
        logger.info("%-22s %-15s %-5s train %3d  sample %2d  test %2d  (skipped %d)", task.name, task.domain, task.metric,
                    len(train), len(samples), len(test), skipped)
    (out_dir / "combined_test.json").write_text(json.dumps(combined, ensure_ascii=False, indent=1), encoding="utf-8")
    suite = {"source": "BIG-bench 1.0.0 (PyPI sdist bigbench==1.0.0, Apache-2.0)", "seed": seed, "tasks": summary}
    (out_dir / "suite.json").write_text(json.dumps(suite, indent=1), encoding="utf-8")
    pool_config.parent.mkdir(parents=True, exist_ok=True)
    pool_config.write_text(json.dumps(pool, ensure_ascii=False, indent=1), encoding="utf-8")
    return suite


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sdist", default=None, help="path to bigbench-1.0.0.tar.gz (default: download into --cache)")
    p.add_argument("--cache", default=str(ROOT / "data" / "cache"), help="where the sdist is downloaded")
    p.add_argument("--out_dir", default=str(ROOT / "data" / "bigbench"), help="suite output directory")
    p.add_argument("--pool_config", default=str(ROOT / "config" / "bigbench_pool.json"), help="pool config to write")
    p.add_argument("--adapter_dir", default="../loras/bigbench", help="adapter directory written into the pool config (relative to it)")
    p.add_argument("--test_size", type=int, default=15, help="test rows per task")
    p.add_argument("--sample_size", type=int, default=20, help="pool-config sample inputs per task (the paper: 20)")
    p.add_argument("--train_size", type=int, default=300, help="training rows per task (at most)")
    p.add_argument("--max_input_chars", type=int, default=700, help="skip examples with longer inputs")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sdist = Path(args.sdist) if args.sdist else download_sdist(Path(args.cache))
    build(sdist, Path(args.out_dir), Path(args.pool_config), args.adapter_dir, args.test_size, args.sample_size,
          args.train_size, args.max_input_chars, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
