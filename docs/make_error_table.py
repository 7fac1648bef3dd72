"""Regenerate docs/errors.md: every bad input tried on main.py and the one line it answers with.

    python docs/make_error_table.py

Each case runs ``main.main`` in-process on a tiny model in a temporary folder and records the exit status
and the error line (temporary paths are shortened to ``TMP``). tests/test_main_cli.py checks the same cases.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def main() -> int:
    import main as main_mod
    from tests.helpers import make_lora, make_tiny_llama, make_tokenizer

    tmp = Path(tempfile.mkdtemp())
    base = tmp / "base"
    tok = make_tokenizer(base)
    make_tiny_llama(base, vocab_size=len(tok))
    lora = make_lora(base, tmp / "lora_a")
    other = tmp / "other_base"
    from transformers import LlamaConfig, LlamaForCausalLM

    make_tokenizer(other)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    wrong = make_lora(other, tmp / "wrong", r=2)
    rank2 = make_lora(base, tmp / "lora_r2", r=2)
    row = {"inputs": "a", "targets": "b", "task": "a", "domain": "d", "metric": "em"}
    good_pool = [{"model_name": n, "domain": "d", "sample": ["x"], "path": str(lora)} for n in ("a", "b")]

    def f(name, content):
        p = tmp / name
        p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content, encoding="utf-8")
        return str(p)

    def adapter_dir(name, config_text):
        d = tmp / name
        d.mkdir()
        (d / "adapter_config.json").write_text(config_text, encoding="utf-8")
        return str(d)

    data = f("data.json", json.dumps([row]))
    pool = f("pool.json", json.dumps(good_pool))
    cases = [
        ("data file missing", ["--data_path", str(tmp / "missing.json")]),
        ("data file not JSON", ["--data_path", f("bad.json", "{oops")]),
        ("data file empty", ["--data_path", f("empty.json", "")]),
        ("data: wrong top-level type", ["--data_path", f("obj.json", '{"rows": []}')]),
        ("row missing a field", ["--data_path", f("m.json", json.dumps([{k: v for k, v in row.items() if k != "task"}]))]),
        ("field of the wrong type", ["--data_path", f("t.json", json.dumps([dict(row, targets=["b"])]))]),
        ("unknown metric", ["--data_path", f("u.json", json.dumps([dict(row, metric="accuracy")]))]),
        ("file not UTF-8", ["--data_path", f("latin1.json", '[{"inputs": "caf\u00e9"}]'.encode("latin-1"))]),
        ("duplicate adapter names", ["--config_path", f("dup.json", json.dumps([good_pool[0], good_pool[0]]))]),
        ("pool entry with no samples", ["--config_path", f("nos.json", json.dumps([dict(good_pool[0], sample=[])]))]),
        ("adapter path does not exist", ["--config_path", f("nop.json", json.dumps([dict(good_pool[0], path=str(tmp / "nowhere"))]))]),
        ("adapter does not fit the base model (read when a row retrieves it)",
         ["--config_path", f("fit.json", json.dumps([good_pool[0], dict(good_pool[1], path=str(wrong))])), "--lora_num", "2"]),
        ("adapter config not valid JSON", ["--config_path", f("badcfg.json", json.dumps([dict(good_pool[0], path=adapter_dir("badcfg", "{peft_type: LORA"))]))]),
        ("adapter that is not a LoRA (prefix tuning)", ["--config_path", f("prefix.json", json.dumps([dict(good_pool[0], path=adapter_dir(
            "prefix", json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 8})))]))]),
        ("row with empty inputs", ["--data_path", f("blank.json", json.dumps([row, dict(row, inputs="  ")]))]),
        ("softmax with a negative temperature", ["--weighting", "softmax", "--temperature", "-1"]),
        ("unknown device", ["--device", "tpu9"]),
        ("CUDA asked for on a machine without one", ["--device", "cuda"]),
        ("k < 1", ["--lora_num", "0"]),
        ("k larger than the pool", ["--lora_num", "3"]),
        ("k larger than the candidates after OOD", ["--lora_num", "2", "--ood"]),
        ("unknown template", ["--template", "vicuna"]),
        ("unwritable results path", ["--res_path", f("plainfile", "x") + "/r.json"]),
        ("--force without --runs", ["--force"]),
        ("sweep: --runs with --res_path", ["--runs", "a"]),
        ("Arrow over adapters of different ranks", ["--eval_type", "arrow", "--arrow_top_k", "1", "--config_path", f("ranks.json", json.dumps(
            [good_pool[0], dict(good_pool[1], path=str(rank2))]))]),
        ("LoraHub: pool samples without targets", ["--eval_type", "lorahub"]),
        ("LoraHub: one vector for all rows, with --ood", ["--eval_type", "lorahub", "--ood"]),
        ("Adapter Soup: pool entries without a domain", ["--eval_type", "soup", "--config_path", f("nodom.json", json.dumps(
            [dict(e, domain="") for e in good_pool]))]),
        ("--best_selection with a baseline", ["--eval_type", "soup", "--best_selection"]),
    ]
    sweep_dir = str(tmp / "sweep")
    sweep_cases = [  # a sweep (--runs) has no --res_path
        ("sweep: --runs without --res_dir", ["--runs", "a"]),
        ("sweep: a run without a name", ["--res_dir", sweep_dir, "--runs", "--lora_num 1"]),
        ("sweep: two runs of one name", ["--res_dir", sweep_dir, "--runs", "a", "a --ood"]),
        ("sweep: a run with its own --settings", ["--res_dir", sweep_dir, "--runs", "a --settings config/embedded.json"]),
        ("sweep: one bad run among good ones", ["--res_dir", sweep_dir, "--runs", "a", "b --lora_num 3"]),
    ]
    handler = Capture()
    logging.getLogger().addHandler(handler)
    lines = ["# Bad input and what main.py answers", "",
             "Every input is checked before any model loads (an adapter's weights: once the rows are routed, before any",
             "row is generated, for the adapters they retrieve); each answer is one line naming the culprit and the fix,",
             "with exit status 2 and no results file written. Generated by `python docs/make_error_table.py`",
             "(temporary paths shortened to `TMP`); `tests/test_main_cli.py` and `tests/test_baselines.py` test the same cases.", "",
             "| bad input | exit | message |", "|---|---|---|"]
    for label, extra in cases + sweep_cases:
        handler.lines.clear()
        res = [] if (label, extra) in sweep_cases else ["--res_path", str(tmp / "res.json")]
        argv = ["--data_path", data, "--config_path", pool, *res, "--base_model", str(base), "--lora_num", "1", *extra]
        code = main_mod.main(argv)
        msg = (handler.lines[-1] if handler.lines else "(no error)").replace(str(tmp), "TMP").replace(str(ROOT) + "/", "").replace("|", "\\|")
        lines.append(f"| {label} | {code} | {msg} |")
        assert not (tmp / "res.json").exists() and not list((tmp / "sweep").glob("*.json"))
    lines += ["", "`--device cuda` is refused like this only on a machine without a usable GPU.", "",
              "## Other entry points", "", "| bad input | exit | message |", "|---|---|---|"]
    import summarize_results

    results = tmp / "results"
    results.mkdir()
    (results / "mixture.json").write_text('{"settings": {}, "rows": [{"inputs": "a", "predicted_answer"', encoding="utf-8")
    handler.lines.clear()
    code = summarize_results.main(["--results_dir", str(results), "--no_charts"])
    msg = (handler.lines[-1] if handler.lines else "(no error)").replace(str(tmp), "TMP").replace(str(ROOT) + "/", "").replace("|", "\\|")
    lines.append(f"| summarize_results.py: the only results file is truncated JSON | {code} | {msg} |")
    lines += ["", "## Judgement calls", "",
              "- **A row with empty `inputs` is refused**, not kept with a warning: retrieval and generation on an empty prompt",
              "  still produce a prediction, and the metric scores it against the target, so one broken row would silently",
              "  lower a method's score. The fix (fill in or drop the row) is the user's to make.",
              "- **A negative or zero softmax temperature is refused**: it would invert the ranking (the least similar adapter",
              "  would weigh most) or divide by zero; no careful user means that.",
              "- **Written files follow the user's umask** (results files are no longer 0600): shared result folders on",
              "  clusters need group-readable files; a user who wants private files sets `umask 077`, as for any other tool.",
              ]
    (ROOT / "docs" / "errors.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
