"""End to end on the real embedded default: SmolLM2-135M-Instruct (from its wheel) and all-MiniLM-L6-v2."""

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_loras(tmp_path_factory):
    """Three r=4 LoRAs on SmolLM2 made with init_lora_weights=False (not trained, but not no-ops)."""
    from peft import LoraConfig, get_peft_model

    from utils.model_loading import load_base_model

    d = tmp_path_factory.mktemp("real_loras")
    paths = {}
    for i, (name, targets) in enumerate((("snarks", ["q_proj", "v_proj"]), ("winowhy", ["v_proj"]), ("qa_wikidata", ["q_proj", "o_proj"]))):
        base = load_base_model("embedded:smollm2-135m-instruct")
        torch.manual_seed(i)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8 * (i + 1), target_modules=targets, init_lora_weights=False))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.05)  # keep the untrained deltas small enough for sensible text
        model.save_pretrained(d / name)
        paths[name] = d / name
    return paths


def test_main_on_embedded_default(tmp_path, real_loras):
    import main as main_mod

    suite = json.loads((ROOT / "config" / "bigbench_pool.json").read_text())
    pool = [dict(e, path=str(real_loras[e["model_name"]])) for e in suite if e["model_name"] in real_loras]
    suite_rows = json.loads((ROOT / "data" / "bigbench" / "combined_test.json").read_text())
    rows = [r for t in real_loras for r in [x for x in suite_rows if x["task"] == t][:2]]  # 2 rows per task
    (tmp_path / "pool.json").write_text(json.dumps(pool))
    (tmp_path / "data.json").write_text(json.dumps(rows))
    for extra in (["--eval_type", "mixture", "--lora_num", "2"], ["--eval_type", "fusion", "--lora_num", "2", "--ood"], ["--best_selection"]):
        res = tmp_path / "res.json"
        code = main_mod.main(["--data_path", str(tmp_path / "data.json"), "--config_path", str(tmp_path / "pool.json"),
                              "--res_path", str(res), "--max_new_tokens", "6", "--batch_size", "4", "--device", "cpu", *extra])
        assert code == 0
        out = json.loads(res.read_text())
        assert out["settings"]["base_model"] == "embedded:smollm2-135m-instruct"
        assert len(out["rows"]) == len(rows)
        for row in out["rows"]:
            assert isinstance(row["predicted_answer"], str)
            k = 1 if "--best_selection" in extra else 2
            assert len(row["adapters"]) == k
            if "--ood" in extra:
                assert row["task"] not in row["adapters"]


def test_selection_matches_peft_on_smollm2(real_loras):
    from utils.adapter_pool import AdapterPool
    from utils.composition import compose
    from utils.data import PoolEntry
    from utils.model_loading import load_base_model, load_tokenizer

    from peft import PeftModel

    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    pool = AdapterPool(load_base_model("embedded:smollm2-135m-instruct"),
                       [PoolEntry(n, "d", ["x"], str(p)) for n, p in real_loras.items()], show_progress=False)
    names = list(real_loras)
    ref = PeftModel.from_pretrained(load_base_model("embedded:smollm2-135m-instruct"), str(real_loras[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        ref.load_adapter(str(real_loras[n]), adapter_name=n)
    enc = tok(["Is this sarcastic?", "The genre of Queen is"], return_tensors="pt", padding=True)
    for name in real_loras:
        ref.set_adapter(name)
        with torch.no_grad():
            expected = ref(**enc).logits
            with compose(pool, pool.indices([[name]] * 2), torch.ones(2, 1)) as m:
                got = m(**enc).logits
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_real_retriever_finds_own_tasks():
    from utils.data import load_pool_config, load_rows
    from utils.retrieval import Embedder, LoraRetriever

    pool = load_pool_config(ROOT / "config" / "bigbench_pool.json", check_paths=False)
    rows = load_rows(ROOT / "data" / "bigbench" / "combined_test.json")
    retriever = LoraRetriever(Embedder("embedded:all-minilm-l6-v2"), [e.name for e in pool], [e.samples for e in pool])
    names, _ = retriever.search([r["inputs"] for r in rows], 3)
    top1 = sum(r["task"] == n[0] for r, n in zip(rows, names)) / len(rows)
    assert top1 > 0.5  # far above chance (1/13) on the suite's test rows
