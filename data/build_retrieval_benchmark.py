"""Build a retrieval benchmark at the paper's scale, and a disjoint training set for retrievers, from BIG-bench 1.0.0.

    python data/build_retrieval_benchmark.py        # the same cached sdist as build_bigbench_suite.py

The paper's pool has 48 tasks in 10 domains, several of them close together (NLI tasks, reading-comprehension
tasks, translation pairs), which is where a retriever is tested. No LoRA is needed to measure retrieval, so this
builder writes only the paper's data formats:

    data/retrieval_benchmark/pool.json            config2.json format: model_name, domain, 20 sample inputs (no path)
    data/retrieval_benchmark/combined_test.json   combined_test.json format: up to 50 test rows per task
    data/retrieval_benchmark/suite.json           tasks, sources, domains and split sizes
    data/retrieval_train/{pool.json, combined_test.json, suite.json}   the same for the training tasks
    data/retrieval_train/train/<task>.json        up to --train_size training inputs per training task

BENCHMARK and TRAINING share no BIG-bench task, no two subtasks of one BIG-bench task are split between them, and
neither uses a task of the embedded 13-task pool for training. Rendering is the embedded suite's
(``utils.bigbench.render``); splits are seeded and disjoint in content (deduplicated inputs). A task with too few
usable rows is left out with a log line, deterministically.

``evaluate_retrieval.py --data_path data/retrieval_benchmark/combined_test.json --config_path
data/retrieval_benchmark/pool.json`` measures a retriever on it unchanged.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from utils.bigbench import download_sdist, read_tasks, render  # noqa: E402

logger = logging.getLogger("build_retrieval_benchmark")

# (BIG-bench task directory, domain). Several tasks per domain, so that neighbours compete.
BENCHMARK = (
    ("analytic_entailment", "nli"), ("presuppositions_as_nli", "nli"), ("formal_fallacies_syllogisms_negation", "nli"),
    ("vitaminc_fact_verification", "nli"), ("international_phonetic_alphabet_nli", "nli"), ("entailed_polarity_hindi", "nli"),
    ("emojis_emotion_prediction", "sentiment"), ("dark_humor_detection", "sentiment"), ("multiemo/all_sentence_en", "sentiment"),
    ("hinglish_toxicity", "sentiment"), ("suicide_risk", "sentiment"),
    ("causal_judgment", "commonsense"), ("cause_and_effect/two_sentences", "commonsense"), ("riddle_sense", "commonsense"),
    ("timedial", "commonsense"), ("physical_intuition", "commonsense"), ("fantasy_reasoning", "commonsense"), ("crass_ai", "commonsense"),
    ("bridging_anaphora_resolution_barqa", "coreference"), ("natural_instructions/subtask029_winogrande_full_object", "coreference"),
    ("natural_instructions/subtask030_winogrande_full_person", "coreference"), ("implicit_relations", "coreference"),
    ("general_knowledge", "closed_book QA"), ("hindu_knowledge", "closed_book QA"), ("misconceptions", "closed_book QA"),
    ("known_unknowns", "closed_book QA"), ("physics_questions", "closed_book QA"), ("strategyqa", "closed_book QA"),
    ("minute_mysteries_qa/multiplechoice", "reading comp"), ("gre_reading_comprehension", "reading comp"),
    ("understanding_fables", "reading comp"), ("natural_instructions/subtask058_multirc_question_answering", "reading comp"),
    ("strange_stories/multiple_choice", "reading comp"),
    ("gem/webnlg_en", "struct to text"), ("gem/cs_restaurants", "struct to text"), ("gem/schema_guided_dialog", "struct to text"),
    ("few_shot_nlg", "struct to text"),
    ("swahili_english_proverbs", "translation"), ("english_russian_proverbs", "translation"), ("swedish_to_german_proverbs", "translation"),
    ("gem/wikilingua_multilingual", "translation"),
    ("arithmetic/2_digit_addition", "math"), ("elementary_math_qa/question_only", "math"),
    ("modified_arithmetic/three_digit_addition_control", "math"), ("unit_conversion/si_conversion", "math"), ("simple_arithmetic_json", "math"),
    ("logical_deduction/three_objects", "logic"), ("tracking_shuffled_objects/three_objects", "logic"), ("navigate", "logic"),
    ("temporal_sequences", "logic"), ("logic_grid_puzzle", "logic"), ("penguins_in_a_table", "logic"),
)

TRAINING = (
    ("anachronisms", "commonsense"), ("empirical_judgments", "commonsense"), ("human_organs_senses", "commonsense"),
    ("date_understanding", "commonsense"), ("goal_step_wikihow/goal_inference", "commonsense"), ("moral_permissibility", "commonsense"),
    ("simple_ethical_questions", "commonsense"), ("sufficient_information", "commonsense"), ("evaluating_information_essentiality", "commonsense"),
    ("analogical_similarity", "reasoning"), ("odd_one_out", "reasoning"), ("similarities_abstraction", "reasoning"),
    ("logical_args", "logic"), ("logical_fallacy_detection", "logic"), ("logical_sequence", "logic"), ("reasoning_about_colored_objects", "logic"),
    ("geometric_shapes", "logic"), ("object_counting", "math"), ("mathematical_induction", "math"), ("identify_math_theorems", "math"),
    ("unit_interpretation/lv1", "math"), ("operators", "math"), ("matrixshapes", "math"),
    ("figure_of_speech_detection", "language"), ("identify_odd_metaphor", "language"), ("metaphor_boolean", "language"),
    ("metaphor_understanding/lit2met", "language"), ("hyperbaton", "language"), ("tense", "language"), ("phrase_relatedness", "language"),
    ("common_morpheme", "language"), ("nonsense_words_grammar", "language"), ("sentence_ambiguity", "language"),
    ("discourse_marker_prediction", "language"), ("crash_blossom", "language"), ("word_sorting", "language"), ("word_unscrambling", "language"),
    ("linguistic_mappings/plural_json", "language"), ("language_identification", "language"), ("rephrase", "paraphrase"),
    ("natural_instructions/subtask045_miscellaneous_sentence_paraphrasing", "paraphrase"), ("gem/turk", "paraphrase"),
    ("english_proverbs", "reading comp"), ("natural_instructions/subtask024_cosmosqa_answer_generation", "reading comp"),
    ("natural_instructions/subtask061_ropes_answer_generation", "reading comp"), ("natural_instructions/subtask028_drop_answer_generation", "reading comp"),
    ("natural_instructions/subtask002_quoref_answer_generation", "reading comp"), ("question_selection", "reading comp"),
    ("natural_instructions/subtask041_qasc_answer_generation", "closed_book QA"),
    ("natural_instructions/subtask047_misc_answering_science_questions", "closed_book QA"), ("periodic_elements/subtask_0", "closed_book QA"),
    ("movie_recommendation", "closed_book QA"), ("physics", "closed_book QA"), ("what_is_the_tao", "closed_book QA"),
    ("implicatures", "nli"), ("fact_checker/fever", "nli"), ("contextual_parametric_knowledge_conflicts", "nli"),
    ("intent_recognition", "sentiment"), ("social_support", "sentiment"), ("movie_dialog_same_or_different", "coreference"),
    ("play_dialog_same_or_different", "coreference"), ("gem/xsum", "struct to text"), ("topical_chat", "struct to text"),
    ("salient_translation_error_detection", "translation"), ("gender_inclusive_sentences_german", "translation"),
    ("persian_idioms", "translation"), ("code_line_description", "code"), ("auto_debugging", "code"), ("cs_algorithms/valid_parentheses", "code"),
    ("dyck_languages", "code"), ("bbq_lite_json/age_disambig", "bias"), ("bbq_lite_json/gender_identity_disambig", "bias"),
    ("emoji_movie", "commonsense"), ("ruin_names", "language"), ("kanji_ascii/kanji_ascii_meaning", "language"),
)

# The embedded pool's BIG-bench tasks (data/build_bigbench_suite.py): never used for training a retriever here.
EMBEDDED_SOURCES = ("epistemic_reasoning", "entailed_polarity", "snarks", "irony_identification", "sports_understanding", "social_iqa",
                    "disambiguation_qa", "winowhy", "qa_wikidata", "disfl_qa", "gem/e2e_nlg", "gem/common_gen", "gem/asset")
METRIC_BY_DOMAIN = {"struct to text": "rouge", "translation": "bleu", "paraphrase": "bleu"}


def task_name(source: str) -> str:
    """``natural_instructions/subtask029_winogrande_full_object`` -> ``subtask029_winogrande_full_object``; ``a/b`` -> ``a_b``."""
    if source.startswith("natural_instructions/"):
        return source.split("/", 1)[1]
    return source.replace("gem/", "").replace("/", "_")


def family(source: str) -> str:
    """The BIG-bench task a subtask belongs to (natural_instructions' subtasks count by their source dataset)."""
    if source.startswith("natural_instructions/"):
        return "ni:" + source.split("_")[2]
    if source.startswith("gem/"):
        return source
    return source.split("/")[0]


def check_disjoint() -> None:
    bench = {family(s) for s, _ in BENCHMARK}
    train = {family(s) for s, _ in TRAINING}
    embedded = {family(s) for s in EMBEDDED_SOURCES}
    shared = sorted((bench & train) | (train & embedded))
    if shared:
        raise SystemExit(f"The training tasks share BIG-bench tasks with the benchmark or the embedded pool: {shared}")


def rows_of(data: dict, source: str, domain: str, max_input_chars: int) -> tuple[list[dict], int]:
    prefix = data.get("task_prefix", "") or ""
    name = task_name(source)
    metric = METRIC_BY_DOMAIN.get(domain, "em")
    rows, skipped = [], 0
    for ex in data.get("examples", []):
        r = render(ex, prefix)
        if r is None or len(r[0]) > max_input_chars or not r[0].strip():
            skipped += 1
            continue
        rows.append({"inputs": r[0], "targets": r[1], "task": name, "domain": domain, "metric": metric})
    return list({r["inputs"]: r for r in rows}.values()), skipped


def write_set(out_dir: Path, tasks, raw: dict, test_size: int, sample_size: int, train_size: int, min_test: int,
              max_input_chars: int, seed: int) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    if train_size:
        (out_dir / "train").mkdir(exist_ok=True)
    combined, pool, summary, left_out = [], [], [], []
    for source, domain in tasks:
        unique, skipped = rows_of(raw[source], source, domain, max_input_chars)
        random.Random(f"{seed}:{source}").shuffle(unique)
        if len(unique) < sample_size + min_test:
            left_out.append(source)
            logger.info("Leaving out %s: %d usable rows, fewer than %d", source, len(unique), sample_size + min_test)
            continue
        samples = unique[:sample_size]
        test = unique[sample_size:sample_size + test_size]
        train = unique[sample_size + test_size:sample_size + test_size + train_size]
        name = task_name(source)
        combined.extend(test)
        pool.append({"model_name": name, "domain": domain, "sample": [{"inputs": s["inputs"], "targets": s["targets"]} for s in samples]})
        if train_size:
            (out_dir / "train" / f"{name}.json").write_text(json.dumps(train, ensure_ascii=False, indent=1), encoding="utf-8")
        summary.append({"task": name, "source": f"bigbench/{source}", "domain": domain, "usable": len(unique), "skipped": skipped,
                        "sample": len(samples), "test": len(test), "train": len(train)})
    (out_dir / "combined_test.json").write_text(json.dumps(combined, ensure_ascii=False, indent=1), encoding="utf-8")
    (out_dir / "pool.json").write_text(json.dumps(pool, ensure_ascii=False, indent=1), encoding="utf-8")
    suite = {"source": "BIG-bench 1.0.0 (PyPI sdist bigbench==1.0.0, Apache-2.0)", "seed": seed, "tasks": summary,
             "domains": sorted({t["domain"] for t in summary}), "left_out": left_out}
    (out_dir / "suite.json").write_text(json.dumps(suite, indent=1), encoding="utf-8")
    logger.info("%s: %d tasks in %d domains, %d test rows (%d left out)", out_dir, len(summary), len(suite["domains"]), len(combined),
                len(left_out))
    return suite


def build_parser() -> argparse.ArgumentParser:
    from utils.flags import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--sdist", default=None, help="path to bigbench-1.0.0.tar.gz (default: download into --cache)")
    p.add_argument("--cache", default=str(ROOT / "data" / "cache"), help="where the sdist is downloaded")
    p.add_argument("--benchmark_dir", default=str(ROOT / "data" / "retrieval_benchmark"), help="where the benchmark (pool.json, combined_test.json, suite.json) is written")
    p.add_argument("--train_dir", default=str(ROOT / "data" / "retrieval_train"), help="where the retriever-training tasks are written")
    p.add_argument("--test_size", type=int, default=50, help="test rows per task (at most)")
    p.add_argument("--sample_size", type=int, default=20, help="sample inputs per task (the paper: 20)")
    p.add_argument("--min_test", type=int, default=10, help="fewest test rows for a task to be kept")
    p.add_argument("--train_size", type=int, default=100, help="training inputs per training task (at most)")
    p.add_argument("--max_input_chars", type=int, default=2000, help="skip examples with longer inputs (retrievers truncate long ones)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task selection and the splits")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_disjoint()
    sdist = Path(args.sdist) if args.sdist else download_sdist(Path(args.cache))
    raw = read_tasks(sdist, [s for s, _ in BENCHMARK] + [s for s, _ in TRAINING])
    bench = write_set(Path(args.benchmark_dir), BENCHMARK, raw, args.test_size, args.sample_size, 0, args.min_test,
                      args.max_input_chars, args.seed)
    train = write_set(Path(args.train_dir), TRAINING, raw, args.test_size, args.sample_size, args.train_size, args.min_test,
                      args.max_input_chars, args.seed)
    if len(bench["tasks"]) < 48 or len(bench["domains"]) < 8 or len(train["tasks"]) < 60:
        raise SystemExit(f"Too few usable tasks: benchmark {len(bench['tasks'])} in {len(bench['domains'])} domains (need 48 in 8), "
                         f"training {len(train['tasks'])} (need 60).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
