"""Metrics on hand-checked cases, and the tables against golden files."""

import json
import math
from pathlib import Path

import pytest

from utils import metrics
from utils.tables import domain_rows, oracle_rows, task_rows, task_scores, to_csv, to_latex, to_markdown

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("pred,target,expected", [
    (" Positive.", "positive\n\nignored after the blank line", 1.0),
    ("negative", "positive", 0.0),
    ("Yes", "yes.", 1.0),
    ("U.S.A", "usa", 1.0),
    ("positive\n\nmore text", "positive", 0.0),  # only the target is cut at its blank line
    ("", "", 1.0),
])
def test_em(pred, target, expected):
    assert metrics.em(pred, target) == expected


def test_paper_bleu_hand_checked():
    # precisions 5/6, 3/5, 2/4, 1/3; equal lengths so no brevity penalty
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert metrics.paper_bleu("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(expected, abs=1e-9)
    assert metrics.paper_bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)
    assert metrics.paper_bleu("the cat", "the cat sat on the mat") == pytest.approx(0.0, abs=1e-9)  # no smoothing
    assert metrics.paper_bleu("", "the cat") == 0.0


def test_paper_rouge_hand_checked():
    s, note = metrics.paper_rouge("the cat sat", "the cat sat on the mat")
    assert note is None
    # the rouge package counts distinct n-grams: 3 of 5 unigrams (P=1, R=3/5), 2 of 5 bigrams (P=1, R=2/5)
    assert s["rouge1"] == pytest.approx(100 * 2 * 0.6 / 1.6, abs=1e-4)
    assert s["rouge2"] == pytest.approx(100 * 2 * 0.4 / 1.4, abs=1e-4)
    assert 0 < s["rougeL"] <= 100


@pytest.mark.parametrize("pred", ["", "   ", "...", "?!"])
def test_paper_rouge_messy_predictions_do_not_raise(pred):
    s, note = metrics.paper_rouge(pred, "the cat sat")
    assert s == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0} and "scored 0" in note


def test_long_and_non_ascii_texts():
    long = " ".join(f"wörd{i % 97}" for i in range(3000))
    s, note = metrics.paper_rouge(long, "wörd1 wörd2 wörd3 ünïcödé")
    assert note is None and s["rouge1"] > 0
    assert metrics.paper_bleu("naïve café au lait", "naïve café au lait") == pytest.approx(100.0)


def test_extra_metrics():
    assert metrics.rouge_score_l("the cat sat", "the cat sat on the mat") == pytest.approx(100 * 2 * 1 * 0.5 / 1.5)
    assert metrics.corpus_sacrebleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)


def rows_for(run_preds):
    base = [
        ("sst2", "sentiment", "em", "positive"), ("sst2", "sentiment", "em", "negative"),
        ("imdb", "sentiment", "em", "positive"),
        ("e2e", "struct to text", "rouge", "the cat sat on the mat"),
        ("wmt", "translation", "bleu", "the cat sat on a mat"),
    ]
    out = []
    for (task, dom, metric, target), pred in zip(base, run_preds):
        if pred is not None:
            out.append({"inputs": "x", "targets": target, "task": task, "domain": dom, "metric": metric, "predicted_answer": pred})
    return out


def golden_runs():
    return {
        "base": rows_for(["Positive.", "positive", "negative", "the cat sat", "the cat sat on the mat"]),
        "mixture": rows_for(["positive", "negative", "positive", "", "the cat sat on a mat"]),
        "partial": rows_for(["positive", "negative", None, "the cat sat on the mat", None]),  # no imdb, no wmt rows
    }


def build_tables():
    runs = golden_runs()
    names = list(runs)
    per_run = {n: task_scores(r, n) for n, r in runs.items()}
    return names, per_run, domain_rows(per_run, names), task_rows(per_run, names)


def test_domain_scores_hand_checked():
    names, per_run, dom, _ = build_tables()
    table = dict(dom)
    assert table["sentiment (EM)"][0] == pytest.approx((50.0 + 0.0) / 2)  # sst2 1/2, imdb 0/1: mean of task scores
    assert table["sentiment (EM)"][1] == pytest.approx(100.0)
    assert table["sentiment (EM)"][2] is None  # imdb missing: missing, never 0
    assert table["translation (BLEU)"][2] is None
    assert table["struct to text (ROUGE-1)"][1] == 0.0  # empty prediction scores 0, row kept
    assert table["Average"][2] is None
    assert per_run["mixture"]["e2e"]["n"] == 1


@pytest.mark.parametrize("kind", ["md", "tex", "csv"])
def test_tables_match_golden(kind):
    names, _, dom, tasks = build_tables()
    render = {"md": to_markdown, "tex": to_latex, "csv": to_csv}[kind]
    got = render(dom, names) + "\n" + render(tasks, names, "Task [domain] (metric)")
    path = GOLDEN / f"tables.{kind}"
    assert got == path.read_text(encoding="utf-8")


def test_unknown_metric_and_missing_prediction_are_reported(caplog):
    rows = [{"inputs": "x", "targets": "a", "task": " t1 ", "domain": "d", "metric": "em"},
            {"inputs": "x", "targets": "a", "task": "t2", "domain": "d", "metric": "f1", "predicted_answer": "a"}]
    with caplog.at_level("INFO"):
        out = task_scores(rows, "run")
    assert list(out) == ["t1"] and out["t1"]["scores"]["em"] == 0.0
    assert "scored as empty predictions" in caplog.text and "unknown metric" in caplog.text and "stripped white space" in caplog.text


def test_summarize_cli(tmp_path):
    import summarize_results

    runs = golden_runs()
    for name, rows in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"settings": {}, "rows": rows}))
    (tmp_path / "runs.txt").write_text("mixture\nbase\n")
    (tmp_path / "notes.json").write_text('{"not": "results"}')
    assert summarize_results.main(["--results_dir", str(tmp_path), "--out_dir", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "domain.md").read_text()
    assert md.splitlines()[0] == "| Domain (metric) | mixture | base | partial |"  # runs.txt order, then the rest sorted
    for f in ("domain.tex", "domain.csv", "tasks.md", "tasks.tex", "tasks.csv", "scores.json", "charts/sentiment.png"):
        assert (tmp_path / "out" / f).is_file(), f
    assert (tmp_path / "out" / "charts" / "sentiment.png").read_bytes()[:4] == b"\x89PNG"
    # the paper's own results format (a plain list of rows) is read too
    (tmp_path / "paper").mkdir()
    (tmp_path / "paper" / "run.json").write_text(json.dumps(runs["base"]))
    assert summarize_results.main(["--results_dir", str(tmp_path / "paper"), "--no_charts"]) == 0


def oracle_tables():
    runs = golden_runs()
    runs = {"best_selection": runs["mixture"], "base": runs["base"], "partial": runs["partial"]}
    names = list(runs)
    per_run = {n: task_scores(r, n) for n, r in runs.items()}
    dom = domain_rows(per_run, names)
    return names, dom, oracle_rows(dom, names)


def test_percent_of_oracle_rows_hand_checked_and_against_golden():
    names, dom, rows = oracle_tables()
    table = dict(rows)
    assert table["% of oracle: sentiment (EM)"] == pytest.approx([100.0, 25.0, None], nan_ok=False)  # 25 / 100
    assert table["% of oracle: translation (BLEU)"][1] == pytest.approx(53.73, abs=0.01)  # 53.73 / 100
    assert table["% of oracle: struct to text (ROUGE-1)"] == [None, None, None]  # the oracle scored 0: no ratio
    assert table["% of oracle: Average"][:2] == pytest.approx([100.0, 100 * 57.17 / 40.0], abs=0.02)
    assert oracle_rows(dom, ["base", "mixture", "partial"]) == []  # no oracle run, no rows
    for kind, render in (("md", to_markdown), ("tex", to_latex), ("csv", to_csv)):
        assert render(dom + rows, names) == (GOLDEN / f"oracle.{kind}").read_text(encoding="utf-8"), kind


def test_summary_has_oracle_rows_and_the_overview_chart(tmp_path):
    import summarize_results

    runs = golden_runs()
    for name, rows in (("best_selection", runs["mixture"]), ("mixture", runs["mixture"]), ("mixture_ood", runs["base"]),
                       ("base", runs["base"])):
        (tmp_path / f"{name}.json").write_text(json.dumps({"settings": {}, "rows": rows}))
    assert summarize_results.main(["--results_dir", str(tmp_path), "--out_dir", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "domain.md").read_text()
    assert "| % of oracle: Average |" in md and "% of oracle" in (tmp_path / "out" / "domain.csv").read_text()
    assert (tmp_path / "out" / "charts" / "oracle_overview.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "out" / "charts" / "of_oracle_sentiment.png").exists()  # no per-domain chart of the % rows
    names = ["best_selection", "mixture", "mixture_ood", "base"]
    from utils.charts import oracle_pairs

    assert oracle_pairs(names, [100, 90, 70, 50]) == [("mixture", 90, 70), ("base", 50, None)]
