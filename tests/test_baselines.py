"""The comparison rows: PEFT's Arrow, LoraHub, Adapter Soup, and their runs in the sweep with resume."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import main as main_mod
from utils import evaluation, evaluation_engines
from tests.helpers import write_json
from utils.data import InputError, PoolEntry

TASKS = {
    "alpha": ("sentiment", ["the movie was great", "the actors were wonderful", "a great and wonderful film"]),
    "beta": ("translation", ["translate to french: the cat", "translate to french: the book", "translate to french: the mat"]),
    "gamma": ("sentiment", ["how would the sentiment be perceived?", "the movie was wonderful", "the cat was great"]),
}


@pytest.fixture()
def workspace(tmp_path, tiny_base, equal_loras):
    pool = [{"model_name": name, "domain": dom, "sample": [{"inputs": s, "targets": "positive"} for s in samples],
             "path": str(equal_loras[name])} for name, (dom, samples) in TASKS.items()]
    rows = [{"inputs": s + " please", "targets": "positive", "task": name, "domain": dom, "metric": "em"}
            for name, (dom, samples) in TASKS.items() for s in samples[:2]]
    return {"dir": tmp_path, "pool": write_json(tmp_path / "pool.json", pool), "data": write_json(tmp_path / "data.json", rows),
            "rows": rows, "base": str(tiny_base), "loras": equal_loras}


def argv(ws, *extra, res="res.json"):
    return ["--data_path", str(ws["data"]), "--config_path", str(ws["pool"]), "--res_path", str(ws["dir"] / res),
            "--base_model", ws["base"], "--retriever", "embedded:all-minilm-l6-v2", "--max_new_tokens", "4",
            "--batch_size", "4", "--device", "cpu", "--lorahub_budget", "8", *extra]


def input_ids(n=3, t=9, seed=0):
    return torch.randint(2, 300, (n, t), generator=torch.Generator().manual_seed(seed))


# --- Arrow -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("general", [False, True])
def test_arrow_gives_peft_arrow_logits_and_unloads(tiny_base, equal_loras, general):
    """The project's Arrow (Session.arrow) is PEFT's Arrow: same logits as create_arrow_model called directly."""
    from peft import ArrowConfig, create_arrow_model
    from transformers import AutoModelForCausalLM

    from utils.session import Session

    names = ("alpha", "beta", "gamma")
    gen = [str(equal_loras["general"])] if general else None
    ids = input_ids()
    direct = create_arrow_model(AutoModelForCausalLM.from_pretrained(tiny_base), [str(equal_loras[n]) for n in names],
                                ArrowConfig(top_k=2, router_temperature=0.5, use_gks=general, rng_seed=7), general_adapter_paths=gen)
    with torch.no_grad():
        expected = direct(input_ids=ids).logits
    session = Session()
    _, base = session.base(str(tiny_base), "float32", "cpu", None)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        with session.arrow([PoolEntry(n, "d", ["x"], str(equal_loras[n])) for n in names], 2, 0.5, gen, 7) as model:
            got = model(input_ids=ids).logits
        after = base(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, base_logits, atol=1e-3)  # the routing changed the output
    assert torch.equal(after, base_logits)  # leaving Arrow restored the plain base model


def test_arrow_run_predicts_what_peft_arrow_generates(workspace):
    """main.py --eval_type arrow writes the greedy continuations of PEFT's own Arrow model."""
    from peft import ArrowConfig, create_arrow_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils.generation import generate_batch
    from utils.prompter import Prompter

    assert main_mod.main(argv(workspace, "--eval_type", "arrow", "--arrow_top_k", "2", "--seed", "3")) == 0
    data = json.loads((workspace["dir"] / "res.json").read_text())
    assert data["settings"]["arrow_top_k"] == 2 and "lorahub_budget" not in data["settings"]
    tok = AutoTokenizer.from_pretrained(workspace["base"])
    model = create_arrow_model(AutoModelForCausalLM.from_pretrained(workspace["base"]), [str(workspace["loras"][n]) for n in TASKS],
                               ArrowConfig(top_k=2, router_temperature=1.0, rng_seed=3))
    prompts = [Prompter("alpaca").generate_prompt(r["inputs"]) for r in workspace["rows"]]
    texts = []
    for p in prompts:  # one at a time: no padding at all
        texts += generate_batch(model, tok, [p], 4)[0]
    assert [r["predicted_answer"] for r in data["rows"]] == texts


def test_arrow_ood_routes_without_the_rows_own_adapter(workspace, monkeypatch):
    from utils import session as session_mod

    built = []
    real = session_mod.Session.arrow

    def spy(self, entries, *a, **k):
        built.append(sorted(e.name for e in entries))
        return real(self, entries, *a, **k)

    monkeypatch.setattr(session_mod.Session, "arrow", spy)
    assert main_mod.main(argv(workspace, "--eval_type", "arrow", "--ood", "--arrow_top_k", "2")) == 0
    rows = json.loads((workspace["dir"] / "res.json").read_text())["rows"]
    assert sorted(built) == [["alpha", "beta"], ["alpha", "gamma"], ["beta", "gamma"]]  # one model per left-out task
    assert all(r["arrow_left_out"] == r["task"] for r in rows)


def test_arrow_refuses_mixed_ranks_before_loading(tmp_path, tiny_base, tiny_loras, caplog):
    from utils.baselines.arrow import check_arrow_pool

    entries = [PoolEntry(n, "d", ["x"], str(p)) for n, p in tiny_loras.items()]
    with pytest.raises(InputError, match="one rank and one set of target modules.*mixture / fusion"):
        check_arrow_pool(entries, 2)
    with pytest.raises(InputError, match="--arrow_top_k 4 is larger than the 3"):
        check_arrow_pool(entries[:1] * 3, 4)
    with pytest.raises(InputError, match="--arrow_general_adapters .*nowhere does not exist or has no adapter_config.json"):
        check_arrow_pool(entries[:1], 1, [str(tmp_path / "nowhere")])
    with pytest.raises(InputError, match="general adapter"):  # a general LoRA of another rank than the pool's
        check_arrow_pool(entries[:1], 1, [str(tiny_loras["beta"])])


# --- LoraHub -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("right", ["beta", "gamma"])
def test_lorahub_learns_the_largest_weight_for_the_right_adapter(tmp_path, tiny_base, right):
    """Examples whose targets are what one adapter alone generates: the search gives that adapter the largest weight."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers import make_lora
    from utils.adapter_pool import AdapterPool
    from utils.composition import compose
    from utils.generation import generate_batch
    from utils.baselines.lorahub import FewShotLoss, learn_weights
    from utils.prompter import Prompter

    names = ("alpha", "beta", "gamma")
    paths = {n: make_lora(tiny_base, tmp_path / n, seed=s, scale=8.0) for n, s in zip(names, (11, 12, 13))}
    tok = AutoTokenizer.from_pretrained(tiny_base)
    pool = AdapterPool(AutoModelForCausalLM.from_pretrained(tiny_base), [PoolEntry(n, "d", ["x"], str(paths[n])) for n in names],
                       show_progress=False)
    prompter = Prompter("alpaca")
    inputs = ["the movie was great", "translate to french: the cat", "question: who wrote the book?", "the actors were wonderful",
              "summarize the text"]
    j = pool.index[right]
    with compose(pool, torch.full((len(inputs), 1), j), torch.ones(len(inputs), 1), "mixture") as model:
        targets, _ = generate_batch(model, tok, [prompter.generate_prompt(x) for x in inputs], max_new_tokens=8)
    loss = FewShotLoss(pool, tok, prompter, list(zip(inputs, targets)))
    learned = learn_weights(loss, list(names), pool.index, budget=40, seed=0)
    assert learned.adapters == list(names)
    assert int(np.argmax(learned.weights)) == names.index(right), learned
    assert learned.loss < learned.base_loss
    assert learned.evaluations == 41  # the base model's loss, then the budget


def test_compose_shared_equals_compose_with_identical_rows(tiny_base, equal_loras):
    """LoraHub's one-vector composition (factors built once, no batch dimension) is compose() with every row alike."""
    from transformers import AutoModelForCausalLM

    from utils.adapter_pool import AdapterPool
    from utils.composition import compose, compose_shared

    names = ("alpha", "beta", "gamma")
    pool = AdapterPool(AutoModelForCausalLM.from_pretrained(tiny_base), [PoolEntry(n, "d", ["x"], str(equal_loras[n])) for n in names],
                       show_progress=False)
    ids, w = input_ids(n=4), [0.7, -0.4, 1.2]
    for mode in ("fusion", "mixture"):
        with torch.no_grad():
            with compose(pool, torch.tensor([[0, 1, 2]] * 4), torch.tensor([w] * 4), mode) as model:
                expected = model(input_ids=ids).logits
            with compose_shared(pool, [0, 1, 2], w, mode) as model:
                got = model(input_ids=ids).logits
            base = pool.model(input_ids=ids).logits  # hooks removed on exit: the bare base model
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, base, atol=1e-3)


def test_lorahub_search_and_rows_do_not_depend_on_the_thread_count(workspace):
    """The same LoraHub run in two processes, OMP_NUM_THREADS=1 and 2: identical vectors, losses and rows."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    got = {}
    for threads in ("1", "2"):
        res = f"threads{threads}.json"
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        done = subprocess.run([sys.executable, str(root / "main.py"), *argv(workspace, "--eval_type", "lorahub", "--lorahub_scope", "task",
                                                                             "--log_level", "WARNING", res=res)],
                              cwd=root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        got[threads] = json.loads((workspace["dir"] / res).read_text())
    one, two = got["1"], got["2"]
    vec = lambda d: {k: (v["weights"], v["loss"], v["base_loss"]) for k, v in d["meta"]["lorahub"]["vectors"].items()}
    assert vec(one) == vec(two) and len(vec(one)) == 3
    assert one["rows"] == two["rows"]


def test_lorahub_run_records_the_learned_weights_and_applies_them(workspace):
    assert main_mod.main(argv(workspace, "--eval_type", "lorahub")) == 0
    data = json.loads((workspace["dir"] / "res.json").read_text())
    vec = data["meta"]["lorahub"]["vectors"]["all"]
    assert vec["adapters"] == list(TASKS) and len(vec["weights"]) == 3 and vec["examples"] == 9
    for row in data["rows"]:
        assert row["adapters"] == vec["adapters"] and row["weights"] == vec["weights"] and row["lorahub_scope"] == "all"
    assert not Path(str(workspace["dir"] / "res.json") + ".lorahub.json").exists()  # the resume store is gone


def test_lorahub_task_scope_ood_leaves_each_tasks_adapter_out(workspace):
    assert main_mod.main(argv(workspace, "--eval_type", "lorahub", "--lorahub_scope", "task", "--ood")) == 0
    data = json.loads((workspace["dir"] / "res.json").read_text())
    vectors = data["meta"]["lorahub"]["vectors"]
    assert sorted(vectors) == sorted(TASKS)
    for task, vec in vectors.items():
        assert task not in vec["adapters"] and len(vec["adapters"]) == 2 and vec["examples"] == 3
    for row in data["rows"]:
        assert row["lorahub_scope"] == row["task"] and row["task"] not in row["adapters"]


def test_lorahub_retrieved_candidates_are_the_top_k_for_the_examples(workspace):
    """--lorahub_candidates retrieved: the --lora_num adapters nearest to the mean embedding of the scope's examples."""
    from utils.retrieval import PAPER_INSTRUCTION, Embedder

    assert main_mod.main(argv(workspace, "--eval_type", "lorahub", "--lorahub_scope", "task", "--ood",
                              "--lorahub_candidates", "retrieved", "--lora_num", "1", "--lorahub_examples", "2")) == 0
    vectors = json.loads((workspace["dir"] / "res.json").read_text())["meta"]["lorahub"]["vectors"]
    emb = Embedder("embedded:all-minilm-l6-v2", PAPER_INSTRUCTION)
    means = {n: emb.encode(samples).mean(0) for n, (_, samples) in TASKS.items()}
    for task, (_, samples) in TASKS.items():
        centre = emb.encode(samples[:2]).mean(0)
        centre /= np.linalg.norm(centre)
        others = {n: float(centre @ (m / np.linalg.norm(m))) for n, m in means.items() if n != task}
        assert vectors[task]["adapters"] == [max(others, key=others.get)]


def test_lorahub_resume_reuses_the_stored_weights(workspace):
    """An interrupted LoraHub run keeps its learned vectors beside the results file; the rerun applies them unsearched."""
    from utils.baselines.lorahub import LearnedWeights, WeightStore
    from utils.results import fingerprint

    args = argv(workspace, "--eval_type", "lorahub", "--lorahub_dtype", "bfloat16")
    plan = evaluation.prepare(main_mod.parse_settings(args))
    stored = LearnedWeights(adapters=["gamma", "alpha"], weights=[0.25, -0.5], loss=1.0, base_loss=2.0, evaluations=9,
                            seconds=0.1, examples=9)
    WeightStore(workspace["dir"] / "res.json", fingerprint(plan.settings)).put("all", stored)
    assert main_mod.main(args) == 0
    data = json.loads((workspace["dir"] / "res.json").read_text())
    assert data["settings"]["lorahub_dtype"] == "bfloat16"
    assert all(r["adapters"] == ["gamma", "alpha"] and r["weights"] == [0.25, -0.5] for r in data["rows"])
    assert data["meta"]["lorahub"]["vectors"]["all"]["evaluations"] == 9


@pytest.mark.parametrize("extra,message", [
    (["--lorahub_scope", "all", "--ood"], "one vector serves every row"),
    (["--lorahub_budget", "0"], "--lorahub_budget must be at least 1"),
    (["--lorahub_l1", "-1"], "--lorahub_l1 must be 0 or more"),
])
def test_lorahub_bad_flags_are_refused(workspace, extra, message, caplog):
    assert main_mod.main(argv(workspace, "--eval_type", "lorahub", *extra)) == 2
    assert message in caplog.text


def test_lorahub_needs_labelled_samples(workspace, caplog):
    pool = json.loads(workspace["pool"].read_text())
    pool[1]["sample"] = [s["inputs"] for s in pool[1]["sample"]]  # plain strings: no targets
    write_json(workspace["pool"], pool)
    assert main_mod.main(argv(workspace, "--eval_type", "lorahub")) == 2
    assert "samples of adapter 'beta' have no 'targets'" in caplog.text


# --- Adapter Soup ------------------------------------------------------------------------------------------------

def test_nearest_domain_picks_the_closest_centroid_and_honours_exclusion():
    from utils.baselines.soup import nearest_domain

    vectors = np.array([[1, 0, 0], [0.8, 0.6, 0], [0, 0, 1]], dtype=np.float32)
    retr = SimpleNamespace(names=["a", "b", "c"], vectors=vectors, adapter_vector="mean")
    q = np.array([[0.6, 0.8, 0], [0, 0.1, 0.99]], dtype=np.float32)
    chosen, domains, scores = nearest_domain(retr, q, ["d1", "d1", "d2"])
    assert chosen == [["a", "b"], ["c"]] and domains == ["d1", "d2"]
    assert scores[0] == pytest.approx(0.6 * 0.9 + 0.8 * 0.3)  # <q, mean of a and b>
    chosen, domains, _ = nearest_domain(retr, q, ["d1", "d1", "d2"], exclude=["a", "c"])
    assert chosen == [["b"], ["a", "b"]] and domains == ["d1", "d1"]  # d2 is empty without c


def merged_logits(base_dir, lora_dirs, weights, ids):
    """Logits of the base model with W + (sum_j w_j s_j B_j)(sum_j w_j A_j) written into its weights by hand."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    A, B = {}, {}
    for d, w in zip(lora_dirs, weights):
        cfg = json.loads((Path(d) / "adapter_config.json").read_text())
        s = cfg["lora_alpha"] / cfg["r"]
        for key, t in load_file(Path(d) / "adapter_model.safetensors").items():
            module = key.replace("base_model.model.", "", 1).rsplit(".lora_", 1)[0]
            if ".lora_A." in key:
                A[module] = A.get(module, 0) + w * t
            else:
                B[module] = B.get(module, 0) + w * s * t
    with torch.no_grad():
        for module, a in A.items():
            model.get_submodule(module).weight += B[module] @ a
        return model(input_ids=ids).logits


def test_soup_equals_fusion_of_the_chosen_adapters(workspace):
    """A soup row's composition is the uniform parameter average of its domain's adapters (merged by hand here)."""
    from utils.composition import LiveComposition
    from utils.session import Session

    args = main_mod.parse_settings(argv(workspace, "--eval_type", "soup", "--ood"))
    plan = evaluation.prepare(args)
    session = Session()
    tok, _ = session.base(args.base_model, "float32", "cpu", None)
    pool = session.adapter_pool(plan.pool)
    routing = evaluation.route(plan, session, pool, tok, "cpu")
    assert set(routing.modes) == {"fusion"}
    ids = input_ids(len(plan.rows))
    live = LiveComposition(pool)  # what evaluation composes with: rows of different lengths in one batch
    live.set_rows([(i, routing.adapters[i], routing.weights[i], routing.modes[i]) for i in range(len(plan.rows))])
    with torch.no_grad(), live.active() as model:
        got = model(input_ids=ids).logits
    for i, row in enumerate(plan.rows):
        assert row["task"] not in routing.adapters[i]  # OOD
        assert routing.extra[i]["soup_domain"] == TASKS[routing.adapters[i][0]][0]
        assert routing.weights[i] == pytest.approx([1 / len(routing.adapters[i])] * len(routing.adapters[i]))
        want = merged_logits(workspace["base"], [workspace["loras"][n] for n in routing.adapters[i]], routing.weights[i], ids[i:i + 1])
        assert torch.allclose(got[i:i + 1], want, atol=1e-5)


def test_soup_all_and_domain_choices(workspace):
    assert main_mod.main(argv(workspace, "--eval_type", "soup", "--soup", "all")) == 0
    rows = json.loads((workspace["dir"] / "res.json").read_text())["rows"]
    assert all(r["adapters"] == list(TASKS) for r in rows)
    assert main_mod.main(argv(workspace, "--eval_type", "soup", "--no_resume")) == 0
    rows = json.loads((workspace["dir"] / "res.json").read_text())["rows"]
    for r in rows:
        assert set(r["adapters"]) == {n for n, (d, _) in TASKS.items() if d == r["soup_domain"]}


def test_soup_without_domains_is_refused(workspace, caplog):
    pool = json.loads(workspace["pool"].read_text())
    pool[0]["domain"] = ""
    write_json(workspace["pool"], pool)
    assert main_mod.main(argv(workspace, "--eval_type", "soup")) == 2
    assert "--soup all" in caplog.text


# --- The sweep, with resume --------------------------------------------------------------------------------------

SWEEP = ["mixture_softmax --eval_type mixture --lora_num 2 --weighting softmax",
         "mixture_softmax_ood --eval_type mixture --lora_num 2 --weighting softmax --ood",
         "soup --eval_type soup", "soup_ood --eval_type soup --ood",
         "lorahub --eval_type lorahub", "lorahub_task --eval_type lorahub --lorahub_scope task",
         "lorahub_task_ood --eval_type lorahub --lorahub_scope task --ood",
         "arrow --eval_type arrow --arrow_top_k 2", "arrow_ood --eval_type arrow --arrow_top_k 2 --ood",
         "after_arrow --eval_type mixture --lora_num 2 --weighting softmax"]


@pytest.mark.slow
def test_each_baseline_runs_in_the_sweep_and_resumes(workspace):
    """Every new row in one sweep process; then each run cut after its first rows resumes to the same file."""
    from utils.results import Checkpoint

    ws = workspace
    common = ["--data_path", str(ws["data"]), "--config_path", str(ws["pool"]), "--base_model", ws["base"],
              "--retriever", "embedded:all-minilm-l6-v2", "--max_new_tokens", "4", "--batch_size", "2", "--device", "cpu",
              "--lorahub_budget", "8"]
    full, cut = ws["dir"] / "full", ws["dir"] / "cut"
    assert main_mod.main([*common, "--res_dir", str(full), "--runs", *SWEEP]) == 0
    names = [s.split()[0] for s in SWEEP]
    for name in names:
        data = json.loads((full / f"{name}.json").read_text())
        (cut / name).parent.mkdir(parents=True, exist_ok=True)
        # An interrupted run: the checkpoint holds the first batch's rows and no results file exists yet.
        ck = Checkpoint(cut / f"{name}.json", dict(data["settings"], res_path=str(cut / f"{name}.json")))
        ck.start({i: dict(row, index=i) for i, row in enumerate(data["rows"][:2])})
    assert main_mod.main([*common, "--res_dir", str(cut), "--runs", *SWEEP]) == 0
    for name in names:
        a, b = (json.loads((d / f"{name}.json").read_text()) for d in (full, cut))
        assert a["rows"] == b["rows"], name
        learned = [{k: {f: v for f, v in vec.items() if f != "seconds"} for k, vec in d["meta"].get("lorahub", {}).get("vectors", {}).items()}
                   for d in (a, b)]
        assert learned[0] == learned[1], name  # the search, redone on resume, learns the same weights
        assert not list(cut.glob(f"{name}.json.*")), name  # no checkpoint or weight store left behind
    # After Arrow has unloaded its layers, the pool loads on the same base model and predicts as before Arrow.
    first, after = (json.loads((full / f"{n}.json").read_text())["rows"] for n in ("mixture_softmax", "after_arrow"))
    assert first == after
