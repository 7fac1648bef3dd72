"""main.py end to end on the tiny in-process model, and its refusals of bad input."""

import json
import shutil
from pathlib import Path

import pytest

import main as main_mod
from utils import evaluation, sweep
from tests.helpers import write_json

TASKS = {
    "alpha": ("sentiment", "em", ["the movie was great", "the actors were wonderful", "a great and wonderful film"]),
    "beta": ("translation", "bleu", ["translate to french: the cat", "translate to french: the book", "translate to french: the mat"]),
    "gamma": ("closed_book QA", "em", ["question: who wrote the book? answer:", "question: who sits on the mat?", "question: who is the cat?"]),
}


@pytest.fixture()
def workspace(tmp_path, tiny_base, tiny_loras):
    pool = [{"model_name": name, "domain": dom, "sample": [{"inputs": s, "targets": "x"} for s in samples],
             "path": str(tiny_loras[name])} for name, (dom, metric, samples) in TASKS.items()]
    rows = []
    for name, (dom, metric, samples) in TASKS.items():
        for s in samples[:2]:
            rows.append({"inputs": s + " please", "targets": "positive", "task": name, "domain": dom, "metric": metric})
    return {"dir": tmp_path, "pool": write_json(tmp_path / "pool.json", pool), "data": write_json(tmp_path / "data.json", rows),
            "rows": rows, "base": str(tiny_base), "loras": tiny_loras}


def run_main(ws, res_name="res.json", *extra):
    res = ws["dir"] / res_name
    argv = ["--data_path", str(ws["data"]), "--config_path", str(ws["pool"]), "--res_path", str(res),
            "--base_model", ws["base"], "--retriever", "embedded:all-minilm-l6-v2", "--max_new_tokens", "4",
            "--batch_size", "4", "--device", "cpu", *extra]
    return main_mod.main(argv), res


@pytest.mark.parametrize("extra,k", [(["--eval_type", "mixture", "--lora_num", "3"], 3),
                                     (["--eval_type", "fusion", "--lora_num", "2", "--ood"], 2),
                                     (["--eval_type", "mixture", "--lora_num", "1"], 1),
                                     (["--best_selection"], 1),
                                     (["--eval_type", "base"], 0)])
def test_main_writes_results(workspace, extra, k):
    code, res = run_main(workspace, "res.json", *extra)
    assert code == 0
    data = json.loads(res.read_text())
    assert data["format"] == "lora_retriever.results/1"
    assert data["settings"]["eval_type"] == (extra[1] if extra[0] == "--eval_type" else "mixture")
    assert data["meta"]["seed"] == 42 and "torch" in data["meta"]["versions"]
    rows = data["rows"]
    assert len(rows) == len(workspace["rows"])
    for row, src in zip(rows, workspace["rows"]):
        for key in ("inputs", "targets", "task", "domain", "metric"):
            assert row[key] == src[key]  # input order kept although batches are sorted by length
        assert isinstance(row["predicted_answer"], str)
        assert len(row["adapters"]) == k and len(set(row["adapters"])) == k
        if k:
            assert sum(row["weights"]) == pytest.approx(1.0)
        if "--ood" in extra:
            assert row["task"] not in row["adapters"]
        if "--best_selection" in extra:
            assert row["adapters"] == [row["task"]]
    assert not Path(str(res) + ".partial.jsonl").exists()


def test_runs_are_deterministic(workspace):
    _, r1 = run_main(workspace, "a.json", "--lora_num", "2")
    _, r2 = run_main(workspace, "b.json", "--lora_num", "2")
    p1 = [r["predicted_answer"] for r in json.loads(r1.read_text())["rows"]]
    p2 = [r["predicted_answer"] for r in json.loads(r2.read_text())["rows"]]
    assert p1 == p2


def test_resume_continues_and_matches(workspace):
    code, full = run_main(workspace, "full.json", "--lora_num", "2", "--batch_size", "2")
    assert code == 0
    expected = json.loads(full.read_text())["rows"]
    # A crashed run: its checkpoint holds the header and the first two finished rows, the last line torn.
    res = workspace["dir"] / "resumed.json"
    args = main_mod.parse_settings(["--data_path", str(workspace["data"]), "--config_path", str(workspace["pool"]),
                                    "--res_path", str(res), "--base_model", workspace["base"], "--retriever", "embedded:all-minilm-l6-v2",
                                    "--max_new_tokens", "4", "--batch_size", "2", "--device", "cpu", "--lora_num", "2"])
    from utils.results import Checkpoint

    ck = Checkpoint(res, evaluation.resolved_settings(args))
    ck.start({})
    planted = []
    for i in (0, 3):
        row = dict(expected[i], index=i, predicted_answer=f"PLANTED {i}")
        planted.append(row)
    ck.append(planted)
    with open(ck.path, "a") as f:
        f.write('{"index": 5, "torn')
    code, _ = run_main(workspace, "resumed.json", "--lora_num", "2", "--batch_size", "2")
    assert code == 0
    got = json.loads(res.read_text())["rows"]
    assert [r["predicted_answer"] for r in got] == [f"PLANTED 0" if i == 0 else f"PLANTED 3" if i == 3 else r["predicted_answer"]
                                                   for i, r in enumerate(expected)]


def test_resume_with_other_settings_is_refused(workspace, caplog):
    res = workspace["dir"] / "r.json"
    from utils.results import Checkpoint

    Checkpoint(res, {"eval_type": "fusion"}).start({})
    code, _ = run_main(workspace, "r.json", "--lora_num", "2")
    assert code == 2
    assert "other settings" in caplog.text and not res.exists()


def bad(ws, name, content):
    p = ws["dir"] / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return p


CASES = {
    "missing data file": (lambda ws: ["--data_path", str(ws["dir"] / "nope.json")], "does not exist"),
    "not json": (lambda ws: ["--data_path", str(bad(ws, "x.json", "{not json\n[also not"))], "neither JSON nor JSON Lines"),
    "empty data": (lambda ws: ["--data_path", str(bad(ws, "e.json", ""))], "is empty"),
    "empty list": (lambda ws: ["--data_path", str(bad(ws, "l.json", "[]"))], "holds no rows"),
    "wrong top-level": (lambda ws: ["--data_path", str(bad(ws, "d.json", '{"a": 1}'))], "not a list of rows"),
    "missing field": (lambda ws: ["--data_path", str(bad(ws, "m.json", json.dumps([{"inputs": "a", "targets": "b", "task": "alpha", "domain": "d"}])))], "lacks the field 'metric'"),
    "wrong field type": (lambda ws: ["--data_path", str(bad(ws, "t.json", json.dumps([{"inputs": 3, "targets": "b", "task": "alpha", "domain": "d", "metric": "em"}])))], "field 'inputs' is a int"),
    "unknown metric": (lambda ws: ["--data_path", str(bad(ws, "u.json", json.dumps([{"inputs": "a", "targets": "b", "task": "alpha", "domain": "d", "metric": "f1"}])))], "unknown metric 'f1'"),
    "not utf-8": (lambda ws: ["--data_path", str(bad(ws, "n.json", b'[{"inputs": "\xff\xfe"}]'))], "not UTF-8"),
    "k < 1": (lambda ws: ["--lora_num", "0"], "--lora_num must be at least 1"),
    "k too large": (lambda ws: ["--lora_num", "4"], "larger than the 3 candidate adapters"),
    "k too large after ood": (lambda ws: ["--lora_num", "3", "--ood"], "left after OOD exclusion"),
    "duplicate adapter": (lambda ws: ["--config_path", str(bad(ws, "p.json", json.dumps([{"model_name": "a", "sample": ["x"], "path": str(ws["loras"]["alpha"])}] * 2)))], "duplicate adapter name"),
    "no samples": (lambda ws: ["--config_path", str(bad(ws, "p.json", json.dumps([{"model_name": "a", "sample": [], "path": str(ws["loras"]["alpha"])}])))], "has a 'sample' card; add cards"),
    "missing adapter": (lambda ws: ["--config_path", str(bad(ws, "p.json", json.dumps([{"model_name": "a", "sample": ["x"], "path": str(ws["dir"] / "none")}])))], "does not exist or has no adapter_config.json"),
    "unknown template": (lambda ws: ["--template", "nosuch"], "Unknown template 'nosuch'"),
    "unwritable results": (lambda ws: ["--res_path", str(bad(ws, "file", "x") / "sub" / "r.json")], "not writable"),
    "empty inputs": (lambda ws: ["--data_path", str(bad(ws, "blank.json", json.dumps([{"inputs": " \n", "targets": "b", "task": "alpha", "domain": "d", "metric": "em"}])))],
                     "row 0 (task 'alpha'): 'inputs' is empty"),
    "negative temperature": (lambda ws: ["--weighting", "softmax", "--temperature", "-1"], "--temperature must be above 0"),
    "unknown device": (lambda ws: ["--device", "tpu9"], "--device 'tpu9' is not a device name"),
    "absent cuda": (lambda ws: ["--device", "cuda:7"] , "--device cuda:7"),
    "adapter config not json": (lambda ws: ["--config_path", str(bad(ws, "p.json", json.dumps([{"model_name": "a", "sample": ["x"], "path": str(adapter_dir(ws, "broken", "{peft_type"))}])))],
                                "adapter_config.json is not valid JSON"),
    "not a lora": (lambda ws: ["--config_path", str(bad(ws, "p.json", json.dumps([{"model_name": "a", "sample": ["x"], "path": str(adapter_dir(ws, "prefix", json.dumps({"peft_type": "PREFIX_TUNING"})))}])))],
                   "describes a 'PREFIX_TUNING' adapter, not a LoRA"),
    "bad adapter pattern": (lambda ws: ["--adapter_pattern", "loras/{task}", "--config_path", str(bad(ws, "p.json", json.dumps([{"model_name": "a", "sample": ["x"]}])))],
                            "is not a valid pattern"),
}


def adapter_dir(ws, name, config_text):
    d = ws["dir"] / name
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text(config_text, encoding="utf-8")
    return d


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_before_loading(workspace, case, caplog, monkeypatch):
    make_args, message = CASES[case]
    import utils.model_loading

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr(utils.model_loading, "load_base_model", no_load)
    extra = make_args(workspace)
    res = workspace["dir"] / "res.json"
    argv = ["--data_path", str(workspace["data"]), "--config_path", str(workspace["pool"]), "--res_path", str(res),
            "--base_model", workspace["base"]]
    code = main_mod.main(argv + extra)
    assert code == 2
    assert message in caplog.text
    assert not res.exists()


def test_adapter_that_does_not_fit_the_base_model(workspace, tmp_path, caplog):
    from tests.helpers import make_lora, make_tiny_llama, make_tokenizer

    other = tmp_path / "other_base"
    tok = make_tokenizer(other)
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    wrong = make_lora(other, tmp_path / "wrong", r=2)
    pool = json.loads(workspace["pool"].read_text())
    pool[1]["path"] = str(wrong)
    workspace["pool"].write_text(json.dumps(pool))
    code, res = run_main(workspace, "res.json")
    assert code == 2
    assert "'beta'" in caplog.text and "does not fit the base model" in caplog.text
    assert not res.exists()


def test_failed_run_keeps_existing_results(workspace, caplog):
    res = workspace["dir"] / "res.json"
    res.write_text('{"keep": true}')
    code, _ = run_main(workspace, "res.json", "--lora_num", "9")
    assert code == 2
    assert json.loads(res.read_text()) == {"keep": True}


def test_sigkill_mid_run_then_resume_equals_uninterrupted(workspace, tmp_path):
    """Kill a real main.py process with SIGKILL after some batches, rerun the same command, compare."""
    import os
    import signal
    import subprocess
    import sys
    import time

    rows = [dict(r, inputs=f"{r['inputs']} variant {i}") for i in range(8) for r in workspace["rows"]]  # 48 rows
    data = write_json(workspace["dir"] / "many.json", rows)
    root = Path(__file__).resolve().parent.parent

    def cmd(res):
        return [sys.executable, str(root / "main.py"), "--data_path", str(data), "--config_path", str(workspace["pool"]),
                "--res_path", str(res), "--base_model", workspace["base"], "--retriever", "embedded:all-minilm-l6-v2",
                "--max_new_tokens", "24", "--batch_size", "1", "--device", "cpu", "--lora_num", "2", "--log_level", "WARNING"]

    res = tmp_path / "killed.json"
    ck = Path(str(res) + ".partial.jsonl")
    proc = subprocess.Popen(cmd(res), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ck.exists() and len(ck.read_text().splitlines()) >= 6:  # header + at least 5 rows
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(ck.read_text().splitlines()) - 1
    assert not res.exists() and 5 <= done_before < len(rows)
    assert subprocess.run(cmd(res), cwd=root, capture_output=True).returncode == 0
    full = tmp_path / "full.json"
    assert subprocess.run(cmd(full), cwd=root, capture_output=True).returncode == 0
    got, want = json.loads(res.read_text()), json.loads(full.read_text())
    assert got["rows"] == want["rows"]
    assert {k: v for k, v in got["settings"].items() if k != "res_path"} == {k: v for k, v in want["settings"].items() if k != "res_path"}
    assert not ck.exists()


SWEEP = {"mix": ["--eval_type", "mixture", "--lora_num", "2"], "plain": ["--eval_type", "base"],
         "fus_ood": ["--eval_type", "fusion", "--lora_num", "2", "--ood"], "best": ["--best_selection"]}


def sweep_argv(ws, out, runs, *extra):
    argv = ["--data_path", str(ws["data"]), "--config_path", str(ws["pool"]), "--res_dir", str(out),
            "--base_model", ws["base"], "--retriever", "embedded:all-minilm-l6-v2", "--max_new_tokens", "4",
            "--batch_size", "4", "--device", "cpu", *extra]
    for name, flags in runs.items():
        argv += ["--runs", " ".join([name, *flags])]
    return argv


def without_meta(path):
    data = json.loads(Path(path).read_text())
    data["settings"].pop("res_path")
    return data["settings"], data["rows"]


def test_sweep_in_one_process_equals_separate_runs(workspace, monkeypatch):
    import utils.adapter_pool
    import utils.model_loading

    loads = {"base": 0, "pool": 0}
    real_load, real_pool_init = utils.model_loading.load_base_model, utils.adapter_pool.AdapterPool.__init__

    def counting_load(*a, **k):
        loads["base"] += 1
        return real_load(*a, **k)

    def counting_pool_init(self, *a, **k):
        loads["pool"] += 1
        real_pool_init(self, *a, **k)

    monkeypatch.setattr(utils.model_loading, "load_base_model", counting_load)
    monkeypatch.setattr(utils.adapter_pool.AdapterPool, "__init__", counting_pool_init)
    out = workspace["dir"] / "sweep"
    assert main_mod.main(sweep_argv(workspace, out, SWEEP)) == 0
    assert loads == {"base": 1, "pool": 1}  # the base run between pool runs reuses the model, adapters switched off
    for name, flags in SWEEP.items():
        code, res = run_main(workspace, f"{name}.json", *flags)
        assert code == 0
        assert without_meta(out / f"{name}.json") == without_meta(res), name


def test_sweep_with_another_pool_reloads_the_base_model(workspace):
    pool = json.loads(workspace["pool"].read_text())
    small = write_json(workspace["dir"] / "small_pool.json", pool[::-1][:2])  # other order, one adapter fewer
    runs = {"all": ["--lora_num", "2"], "small": ["--lora_num", "1", "--config_path", str(small)], "plain": ["--eval_type", "base"]}
    out = workspace["dir"] / "sweep"
    assert main_mod.main(sweep_argv(workspace, out, runs)) == 0
    for name, flags in runs.items():
        code, res = run_main(workspace, f"{name}.json", *flags)
        assert code == 0
        assert without_meta(out / f"{name}.json") == without_meta(res), name


def test_sweep_skips_finished_runs_unless_forced(workspace, caplog):
    out = workspace["dir"] / "sweep"
    runs = {"plain": ["--eval_type", "base"], "mix": ["--lora_num", "2"]}
    assert main_mod.main(sweep_argv(workspace, out, runs)) == 0
    (out / "mix.json").write_text('{"kept": true}')
    caplog.clear()
    caplog.set_level("INFO", logger="utils.sweep")
    assert main_mod.main(sweep_argv(workspace, out, runs)) == 0
    assert caplog.text.count("skipping") == 2 and json.loads((out / "mix.json").read_text()) == {"kept": True}
    assert main_mod.main(sweep_argv(workspace, out, runs, "--force")) == 0
    assert json.loads((out / "mix.json").read_text())["format"] == "lora_retriever.results/1"


@pytest.mark.parametrize("argv_change,message", [
    (lambda argv: argv + ["--res_path", "x.json"], "with --runs give --res_dir instead"),
    (lambda argv: [a for i, a in enumerate(argv) if "--res_dir" not in argv[i - 1: i + 1]], "--runs needs --res_dir"),
    (lambda argv: argv + ["--runs", "mix --lora_num 1"], "names 'mix' twice"),
    (lambda argv: argv + ["--runs", "--lora_num 1"], "start each run with its name"),
    (lambda argv: argv + ["--runs", "late --settings config/embedded.json"], "apply to the whole sweep"),
    (lambda argv: argv + ["--runs", "big --lora_num 9"], "Run 'big': --lora_num 9 is larger than the 3 candidate adapters"),
    (lambda argv: argv + ["--runs", "typo --lora_nums 2"], "Run 'typo': unknown flags ['--lora_nums', '2']"),
    (lambda argv: argv + ["--runs", "odd --eval_type merge"], "Run 'odd': argument --eval_type: invalid choice"),
    (lambda argv: argv + ["--runs", "quote --instruction 'unclosed"], "check the quotes of this run"),
])
def test_bad_sweeps_are_refused_before_any_run(workspace, caplog, monkeypatch, argv_change, message):
    import utils.model_loading

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before every run was checked")

    monkeypatch.setattr(utils.model_loading, "load_base_model", no_load)
    out = workspace["dir"] / "sweep"
    argv = argv_change(sweep_argv(workspace, out, {"mix": ["--lora_num", "2"]}))
    assert main_mod.main(argv) == 2
    assert message in caplog.text
    assert not (out / "mix.json").exists()


def test_res_dir_without_run_is_refused(workspace, caplog):
    code, _ = run_main(workspace, "r.json", "--force")
    assert code == 2 and "go with --run" in caplog.text


def test_results_files_follow_the_umask(workspace):
    import os

    old = os.umask(0o022)
    try:
        code, res = run_main(workspace, "umask.json", "--lora_num", "1")
    finally:
        os.umask(old)
    assert code == 0
    assert res.stat().st_mode & 0o777 == 0o644


def test_summarize_names_a_truncated_results_file(tmp_path, caplog):
    import summarize_results

    (tmp_path / "mixture.json").write_text('{"settings": {}, "rows": [{"inputs": "a"', encoding="utf-8")
    assert summarize_results.main(["--results_dir", str(tmp_path), "--no_charts"]) == 2
    assert "mixture.json is not valid JSON" in caplog.text and "No results files" not in caplog.text


def test_sweep_logs_its_place_and_the_time_left(workspace, caplog):
    out = workspace["dir"] / "paced"
    runs = {"plain": ["--eval_type", "base"], "mix": ["--lora_num", "2"], "fused": ["--eval_type", "fusion", "--lora_num", "2"]}
    caplog.set_level("INFO", logger="utils.sweep")
    assert main_mod.main(sweep_argv(workspace, out, runs)) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Sweep: run")]
    assert [line.split(";")[0] for line in lines] == ["Sweep: run 1 of 3, plain", "Sweep: run 2 of 3, mix", "Sweep: run 3 of 3, fused"]
    assert "estimated after the first run" in lines[0]
    assert all("min left" in line for line in lines[1:])


def test_sweep_pace_counts_rows_and_lorahub_evaluations():
    from types import SimpleNamespace

    def plan(eval_type, rows=10, done=0, **kw):
        args = SimpleNamespace(eval_type=eval_type, lorahub_examples=2, lorahub_budget=4, lorahub_scope=kw.get("scope", "all"))
        tasks = [{"task": f"t{i % 3}"} for i in range(rows)]
        return SimpleNamespace(args=args, rows=tasks, done=dict.fromkeys(range(done)), pool=[1, 2, 3, 4], seconds=kw.get("seconds", {}))

    assert sweep.work_units(plan("mixture", done=4)) == (6, 0)
    assert sweep.work_units(plan("lorahub")) == (10, 4 * 2 * 5)  # 4 adapters x 2 examples, budget + 1 evaluations
    assert sweep.work_units(plan("lorahub", scope="task")) == (10, 3 * 2 * 5)  # 3 tasks, 2 examples each
    pace = sweep.SweepPace()
    assert "after the first run" in pace.estimate([plan("mixture")])
    pace.record(plan("mixture", seconds={"generation": 60.0}), (10, 0))  # 6 s per row
    assert pace.estimate([plan("mixture"), plan("mixture")]) == "about 2 min left"
    assert pace.estimate([plan("lorahub")]).startswith("at least 1 min left (LoraHub")
    pace.record(plan("lorahub", seconds={"generation": 60.0, "search": 120.0}), (10, 40))  # 3 s per example-evaluation
    assert pace.estimate([plan("lorahub")]) == "about 3 min left"  # 10 rows x 6 s + 40 x 3 s
