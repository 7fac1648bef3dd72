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
import sys
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("build_bigbench_suite")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from utils.bigbench import download_sdist, read_tasks, render  # noqa: E402


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


def build_parser() -> argparse.ArgumentParser:
    from utils.flags import HelpFormatter, add_deprecated_alias

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--sdist", default=None, help="path to bigbench-1.0.0.tar.gz (default: download into --cache)")
    p.add_argument("--cache", default=str(ROOT / "data" / "cache"), help="where the sdist is downloaded")
    p.add_argument("--out_dir", default=str(ROOT / "data" / "bigbench"), help="suite output directory")
    p.add_argument("--config_path", default=str(ROOT / "config" / "bigbench_pool.json"), help="pool config to write")
    p.add_argument("--adapter_dir", default="../loras/bigbench", help="adapter directory written into the pool config (relative to it)")
    p.add_argument("--test_size", type=int, default=15, help="test rows per task")
    p.add_argument("--sample_size", type=int, default=20, help="pool-config sample inputs per task (the paper: 20)")
    p.add_argument("--train_size", type=int, default=300, help="training rows per task (at most)")
    p.add_argument("--max_input_chars", type=int, default=700, help="skip examples with longer inputs")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    add_deprecated_alias(p, "--pool_config", "--config_path")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sdist = Path(args.sdist) if args.sdist else download_sdist(Path(args.cache))
    build(sdist, Path(args.out_dir), Path(args.config_path), args.adapter_dir, args.test_size, args.sample_size,
          args.train_size, args.max_input_chars, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
