"""Stage: metrics. Small pure functions, one per metric, from well-kept libraries.

The paper's metrics (its ``summarize_results.py``), which the tables use by default:

    em(pred, target)          target cut at its first blank line; both sides stripped, lower-cased,
                              every "." removed; 1.0 if equal else 0.0
    paper_bleu(pred, target)  NLTK sentence BLEU of whitespace tokens, 4-gram uniform weights,
                              no smoothing, x100
    paper_rouge(pred, target) ROUGE-1 / ROUGE-2 / ROUGE-L F-scores of the ``rouge`` package (pltrdy), x100

Alongside, under other names: ``sacrebleu`` (corpus BLEU, sacrebleu's default 13a tokenizer) and
``rougeL_rs`` (ROUGE-L F of Google's ``rouge-score``), both x100.

Messy predictions never raise: an empty or punctuation-only text, on which the ``rouge`` package
raises, scores 0 for ROUGE; each such case is reported through the returned ``notes``.
"""

from __future__ import annotations

import re
import sys
import warnings
from functools import lru_cache

PAPER_METRICS = {"em": ("em",), "bleu": ("bleu",), "rouge": ("rouge1", "rouge2", "rougeL")}
EXTRA_METRICS = {"em": (), "bleu": ("sacrebleu",), "rouge": ("rougeL_rs",)}
METRIC_LABELS = {"em": "EM", "bleu": "BLEU", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L",
                 "sacrebleu": "sacreBLEU (corpus)", "rougeL_rs": "ROUGE-L (rouge-score)"}


def normalize_em(text: str) -> str:
    return text.strip().lower().replace(".", "")


def em(pred: str, target: str) -> float:
    """Exact match as the paper defines it (see module docstring)."""
    return float(normalize_em(pred) == normalize_em(target.split("\n\n")[0]))


def paper_bleu(pred: str, target: str) -> float:
    """NLTK sentence BLEU, 4-gram, no smoothing, x100 (0 when a prediction shares no n-gram of some order)."""
    from nltk.translate.bleu_score import sentence_bleu

    hyp, ref = pred.split(), target.split()
    if not hyp or not ref:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLTK warns on zero n-gram counts; the score is then 0, as in the paper
        return 100.0 * float(sentence_bleu([ref], hyp))


def _has_word(text: str) -> bool:
    return bool(re.search(r"\w", text))


def paper_rouge(pred: str, target: str) -> tuple[dict[str, float], str | None]:
    """ROUGE-1/2/L F-scores x100 of the ``rouge`` package, and a note when the text could not be scored."""
    from rouge import Rouge

    if not _has_word(pred) or not _has_word(target):
        which = "prediction" if not _has_word(pred) else "target"
        return {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}, f"empty or punctuation-only {which} scored 0"
    limit = sys.getrecursionlimit()
    try:
        sys.setrecursionlimit(max(limit, 10_000))  # long texts recurse deeply in rouge's LCS reconstruction
        scores = Rouge().get_scores(pred, target)[0]
    except (ValueError, RecursionError) as err:
        return {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}, f"rouge package failed ({type(err).__name__}: {err}); scored 0"
    finally:
        sys.setrecursionlimit(limit)
    return {"rouge1": 100.0 * scores["rouge-1"]["f"], "rouge2": 100.0 * scores["rouge-2"]["f"],
            "rougeL": 100.0 * scores["rouge-l"]["f"]}, None


@lru_cache(maxsize=1)
def _rouge_l_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_score_l(pred: str, target: str) -> float:
    """ROUGE-L F of Google's ``rouge-score`` (no stemming), x100."""
    return 100.0 * _rouge_l_scorer().score(target, pred)["rougeL"].fmeasure


def corpus_sacrebleu(preds: list[str], targets: list[str]) -> float:
    """Corpus BLEU of sacrebleu with its default settings (13a tokenizer, exp smoothing)."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(preds, [targets]).score)


def score_task(metric: str, preds: list[str], targets: list[str]) -> tuple[dict[str, float], list[str]]:
    """Scores of one task's rows (paper metrics plus the extra ones) and notes on messy rows.

    Returns ({metric name: score averaged over rows}, notes).
    """
    n = len(preds)
    if n == 0:
        return {}, []
    notes: list[str] = []
    if metric == "em":
        return {"em": 100.0 * sum(em(p, t) for p, t in zip(preds, targets)) / n}, notes
    if metric == "bleu":
        return {"bleu": sum(paper_bleu(p, t) for p, t in zip(preds, targets)) / n,
                "sacrebleu": corpus_sacrebleu(preds, targets)}, notes
    if metric == "rouge":
        total = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
        for p, t in zip(preds, targets):
            s, note = paper_rouge(p, t)
            if note:
                notes.append(note)
            for k in total:
                total[k] += s[k]
        out = {k: v / n for k, v in total.items()}
        out["rougeL_rs"] = sum(rouge_score_l(p, t) for p, t in zip(preds, targets)) / n
        return out, notes
    raise ValueError(f"Unknown metric {metric!r}; use one of em, bleu, rouge.")
