"""generate.py, train_lora.py and eval_all.sh on the tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import write_json

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def pool_file(tmp_path, tiny_loras):
    pool = [{"model_name": n, "domain": n + "_dom", "sample": [{"inputs": f"{n} example {i}", "targets": "x"} for i in range(3)],
             "path": str(p)} for n, p in tiny_loras.items()]
    return write_json(tmp_path / "pool.json", pool)


def test_generate_named_adapters(pool_file, tiny_base, capsys):
    import generate

    code = generate.main(["--prompt", "the cat sits", "--adapters", "alpha=0.7,gamma=0.8", "--base_model", str(tiny_base),
                          "--config_path", str(pool_file), "--max_new_tokens", "3"])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "adapters: alpha (weight 0.700), gamma (weight 0.800)"


def test_generate_retrieval_and_stdin_loop(pool_file, tiny_base, capsys, monkeypatch):
    import io

    import generate

    monkeypatch.setattr(sys, "stdin", io.StringIO("beta example 1\n\ngamma example\n"))
    code = generate.main(["--lora_num", "2", "--base_model", str(tiny_base), "--config_path", str(pool_file),
                          "--max_new_tokens", "3", "--eval_type", "fusion"])
    assert code == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("adapters:")]
    assert len(lines) == 2
    assert lines[0].startswith("adapters: beta (similarity ") and "weight 0.500" in lines[0]


def test_generate_through_tasks(pool_file, tiny_base, capsys, tmp_path):
    import generate

    code = generate.main(["--prompt", "beta example 1", "--eval_type", "lorauter", "--lorauter_k", "2", "--base_model", str(tiny_base),
                          "--config_path", str(pool_file), "--max_new_tokens", "3", "--task_scores", str(tmp_path / "s.json")])
    assert code == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("adapters: ") and "weight" in line and "similarity" not in line  # weights from the two nearest tasks
    assert (tmp_path / "s.json").is_file()


def test_train_lora_refuses_a_task_without_training_rows(tmp_path, tiny_base):
    import train_lora

    (tmp_path / "train").mkdir()
    write_json(tmp_path / "train" / "empty.json", [])
    pool = write_json(tmp_path / "pool.json", [])
    with pytest.raises(SystemExit, match="holds no rows"):
        train_lora.main(["--config_path", str(pool), "--train_dir", str(tmp_path / "train"), "--adapter_dir", str(tmp_path / "loras"),
                         "--base_model", str(tiny_base), "--task", "empty", "--settings", str(tmp_path / "none.yaml")])
    assert json.loads(pool.read_text()) == []  # nothing registered


def test_generate_unknown_adapter(pool_file, tiny_base, caplog):
    import generate

    code = generate.main(["--prompt", "x", "--adapters", "nosuch=1", "--base_model", str(tiny_base), "--config_path", str(pool_file)])
    assert code == 2 and "'nosuch' is not in the pool" in caplog.text


def test_train_lora_writes_registers_reuses_and_inspects(tmp_path, tiny_base, capsys):
    import train_lora

    rows = [{"inputs": f"question {i}: is {i} even?\n\nOPTIONS:\n- yes\n- no", "targets": "yes" if i % 2 == 0 else "no",
             "task": "parity", "domain": "math", "metric": "em"} for i in range(12)]
    (tmp_path / "train").mkdir()
    write_json(tmp_path / "train" / "parity.json", rows)
    pool = write_json(tmp_path / "pool.json", [])
    args = ["--config_path", str(pool), "--train_dir", str(tmp_path / "train"), "--adapter_dir", str(tmp_path / "loras"),
            "--base_model", str(tiny_base), "--steps", "2", "--batch_size", "2", "--r", "2", "--lora_alpha", "4",
            "--settings", str(tmp_path / "none.yaml")]
    assert train_lora.main(args) == 0
    out = tmp_path / "loras" / "parity"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    record = json.loads((out / "training.json").read_text())
    assert len(record["losses"]) == 2
    entry = json.loads(pool.read_text())[0]
    assert entry["model_name"] == "parity" and entry["domain"] == "math" and len(entry["sample"]) == 12
    assert (pool.parent / entry["path"]).resolve() == out.resolve()
    mtime = (out / "adapter_model.safetensors").stat().st_mtime_ns
    assert train_lora.main(args) == 0  # reused, not retrained
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    capsys.readouterr()
    assert train_lora.main(["--inspect", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["peft_type"] == "LORA" and info["r"] == 2 and info["lora_alpha"] == 4
    assert info["parameters"] == record["trainable_parameters"]


def test_loss_covers_only_the_response():
    from tests.helpers import make_tokenizer
    from utils.prompter import Prompter, encode_supervised

    tok = make_tokenizer()
    ids, labels = encode_supervised(tok, Prompter("alpaca"), "the cat", "positive", 512)
    n_resp = len(tok("positive", add_special_tokens=False).input_ids) + 1
    assert labels[:-n_resp] == [-100] * (len(ids) - n_resp)
    assert labels[-n_resp:] == ids[-n_resp:] and ids[-1] == tok.eos_token_id


SWEEP_RUNS = ["base", "best_selection", "selection", "selection_ood", "mixture", "mixture_ood", "fusion", "fusion_ood",
              "mixture_softmax", "mixture_softmax_ood", "soup", "soup_ood", "lorahub", "lorahub_task", "lorahub_task_ood",
              "lorauter", "lorauter_ood", "arrow", "arrow_ood"]


def test_eval_all_sweep_on_tiny_model(tmp_path, tiny_base, equal_loras, tiny_loras):
    pool = [{"model_name": n, "domain": d, "sample": [{"inputs": f"{n} example {i}", "targets": "x"} for i in range(3)],
             "path": str(equal_loras[n])} for n, d in (("alpha", "one"), ("beta", "one"), ("gamma", "two"))]
    pool_file = write_json(tmp_path / "pool.json", pool)
    rows = [{"inputs": f"{t} example 9", "targets": "x", "task": t, "domain": d, "metric": m}
            for t, d, m in (("alpha", "one", "em"), ("beta", "one", "bleu"), ("gamma", "two", "rouge"))]
    data = write_json(tmp_path / "data.json", rows)
    out = tmp_path / "res"
    env = dict(os.environ, PYTHON=sys.executable, DATA=str(data), OUT=str(out),
               EXTRA_ARGS=f"--base_model {tiny_base} --config_path {pool_file} --max_new_tokens 3 --lora_num 1 --device cpu "
                          "--instruction 'Find the task: ' --arrow_top_k 1")
    # --lora_num 1 and --arrow_top_k 1 (given last) keep k within the 3-adapter pool for the OOD runs
    done = subprocess.run(["bash", str(ROOT / "eval_all.sh"), "embedded"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = (out / "runs.txt").read_text().split()
    assert runs == SWEEP_RUNS
    for r in runs:
        settings = json.loads((out / f"{r}.json").read_text())["settings"]
        assert settings["instruction"] == "Find the task: "
        assert ("lorahub_budget" in settings) == r.startswith("lorahub")
    assert json.loads((out / "lorahub.json").read_text())["settings"]["lorahub_budget"] == 20  # from the embedded profile
    assert (out / "summary" / "domain.tex").is_file()
    assert done.stdout.splitlines()[0].startswith("| Domain (metric) | base | best_selection |")
    assert "| lorahub | lorahub_task | lorahub_task_ood | lorauter | lorauter_ood | arrow | arrow_ood |" in done.stdout.splitlines()[0]
    again = subprocess.run(["bash", str(ROOT / "eval_all.sh"), "embedded"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 0 and again.stderr.count("skipping") == len(SWEEP_RUNS)
    # A pool of mixed ranks: Arrow refuses it before any run starts, and SKIP leaves its rows out.
    mixed = write_json(tmp_path / "mixed.json", [dict(e, path=str(tiny_loras[e["model_name"]])) for e in pool])
    env.update(EXTRA_ARGS=env["EXTRA_ARGS"].replace(str(pool_file), str(mixed)), OUT=str(tmp_path / "mixed"))
    refused = subprocess.run(["bash", str(ROOT / "eval_all.sh"), "embedded"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert refused.returncode == 2 and "Run 'arrow'" in refused.stderr and "SKIP" not in refused.stdout
    assert not (tmp_path / "mixed" / "base.json").exists()
    env["SKIP"] = "arrow arrow_ood"
    skipped = subprocess.run(["bash", str(ROOT / "eval_all.sh"), "embedded"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert (tmp_path / "mixed" / "runs.txt").read_text().split() == SWEEP_RUNS[:-2]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["infonce", "triplet"])
def test_train_retriever_saves_a_loadable_model(tmp_path, loss):
    import train_retriever
    from utils.retrieval import Embedder

    topics = {"sports": "the team won the match", "cooking": "stir the soup and add salt", "weather": "rain and wind tomorrow",
              "music": "the band played a song", "math": "two plus two equals four"}
    pool = [{"model_name": t, "domain": t, "sample": [f"{s} number {i}" for i in range(8)], "path": "."} for t, s in topics.items()]
    cfg = write_json(tmp_path / "pool.json", pool)
    out = tmp_path / "retriever"
    assert train_retriever.main(["--config_path", str(cfg), "--train_dir", str(tmp_path / "none"), "--train_fraction", "0.6",
                                 "--per_task", "8", "--batch_size", "8", "--loss", loss, "--steps", "12", "--learning_rate", "1e-4",
                                 "--out", str(out)]) == 0
    split = json.loads((out / "task_split.json").read_text())
    assert len(split["train"]) == 3 and len(split["held_out"]) == 2 and not set(split["train"]) & set(split["held_out"])
    emb = Embedder(str(out)).encode(["the team won"])
    assert emb.shape == (1, 384)
    if loss == "infonce":  # the contrastive loss goes down on these easily separated tasks
        losses = split["settings"]["losses"]
        assert len(losses) == 12 and sum(losses[-4:]) < sum(losses[:4])


def test_task_split_is_seeded():
    from train_retriever import split_tasks

    names = [f"t{i}" for i in range(13)]
    a, b = split_tasks(names, 0.4, 0), split_tasks(names, 0.4, 0)
    assert a == b and len(a[0]) == 5 and len(a[1]) == 8
    assert split_tasks(names, 0.4, 1) != a
