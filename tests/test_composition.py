"""Composition math against stock peft and against the formulas computed directly from A and B."""

import copy

import pytest
import torch

from utils.adapter_pool import AdapterPool
from utils.composition import build_composed, compose
from utils.data import PoolEntry


def load_base(tiny_base):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_base).eval()


def make_pool(tiny_base, loras, names):
    entries = [PoolEntry(name=n, domain="d", samples=["x"], path=str(loras[n])) for n in names]
    return AdapterPool(load_base(tiny_base), entries, show_progress=False)


def batch_inputs(batch=3, length=7, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, length), generator=g)


def lora_weights(peft_model, name):
    """{module path in the base model: (A, B, scaling)} of one adapter, read from the peft layers."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for path, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            base_path = path.replace("base_model.model.", "", 1)
            out[base_path] = (module.lora_A[name].weight.detach(), module.lora_B[name].weight.detach(), float(module.scaling[name]))
    return out


def merged_reference(tiny_base, deltas):
    """A plain (peft-free) copy of the base model with W <- W + delta for each {module path: delta}."""
    model = load_base(tiny_base)
    with torch.no_grad():
        for path, delta in deltas.items():
            model.get_submodule(path).weight += delta
    return model


def peft_reference(base, loras, names):
    """Stock peft with ``names`` loaded the usual way (injected LoRA layers): the reference the pool must match."""
    from peft import PeftModel

    ref = PeftModel.from_pretrained(base, loras[names[0]], adapter_name=names[0])
    for n in names[1:]:
        ref.load_adapter(loras[n], adapter_name=n)
    return ref.eval()


@pytest.fixture(scope="module")
def pool(tiny_base, tiny_loras):
    return make_pool(tiny_base, tiny_loras, ["alpha", "beta", "gamma"])


@pytest.fixture(scope="module")
def ref(tiny_base, tiny_loras):
    return peft_reference(load_base(tiny_base), tiny_loras, ["alpha", "beta", "gamma"])


def test_pool_injects_nothing_and_reads_on_first_use(pool):
    from peft.tuners.lora import LoraLayer

    assert not any(isinstance(m, LoraLayer) for m in pool.model.modules())
    assert type(pool.model).__name__ != "PeftModel"


def test_selection_equals_stock_peft(pool, ref):
    ids = batch_inputs()
    for name in pool.names:
        ref.set_adapter(name)
        with torch.no_grad():
            expected = ref(input_ids=ids).logits
            idx = pool.indices([[name]] * ids.shape[0])
            with compose(pool, idx, torch.ones(ids.shape[0], 1), "mixture") as m:
                got = m(input_ids=ids).logits
            with compose(pool, idx, torch.ones(ids.shape[0], 1), "fusion") as m:
                got_fusion = m(input_ids=ids).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(got_fusion, expected, atol=1e-5, rtol=0)
        with ref.disable_adapter(), torch.no_grad():
            assert not torch.allclose(ref(input_ids=ids).logits, expected, atol=1e-3), f"adapter {name} is a no-op"


def test_hooks_removed_after_context(pool):
    ids = batch_inputs()
    with torch.no_grad():
        before = pool.model(input_ids=ids).logits
    idx = pool.indices([["alpha", "beta"]] * 3)
    with compose(pool, idx, torch.full((3, 2), 0.5), "mixture"):
        assert any(m._forward_hooks for m in pool.model.modules())
    with torch.no_grad():
        after = pool.model(input_ids=ids).logits
    torch.testing.assert_close(before, after)
    assert all(not m._forward_hooks for m in pool.model.modules())
    assert not pool.pinned(), "the block's pins are released on exit"


def test_mixture_equals_peft_cat(tiny_base, tiny_loras, pool):
    from peft import PeftModel

    names, w = ["alpha", "beta", "gamma"], [0.5, 0.3, 0.2]
    ref = PeftModel.from_pretrained(load_base(tiny_base), tiny_loras["alpha"], adapter_name="alpha")
    for n in names[1:]:
        ref.load_adapter(tiny_loras[n], adapter_name=n)
    ref.add_weighted_adapter(names, w, adapter_name="cat", combination_type="cat")
    ref.set_adapter("cat")
    ids = batch_inputs()
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        with compose(pool, pool.indices([names] * 3), torch.tensor([w] * 3), "mixture") as m:
            got = m(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_mixture_uses_each_adapters_own_scaling(tiny_base, pool, ref):
    """Adapters of different r and alpha: delta W = sum_j w_j s_j B_j A_j with s_j = alpha_j / r_j."""
    names, w = ["beta", "gamma"], [0.6, 0.4]  # beta: r=2, alpha=16 (s=8); gamma: r=8, alpha=4 (s=0.5)
    deltas, wrong = {}, {}
    last_scaling = None
    for n, wj in zip(names, w):
        for path, (A, B, s) in lora_weights(ref, n).items():
            deltas[path] = deltas.get(path, 0) + wj * s * (B @ A)
            wrong[path] = wrong.get(path, 0) + wj * (B @ A)
            last_scaling = s
    assert {8.0, 0.5} == {s for n in names for (_, _, s) in lora_weights(ref, n).values()}
    ids = batch_inputs()
    with torch.no_grad():
        expected = merged_reference(tiny_base, deltas)(input_ids=ids).logits
        paper_bug = merged_reference(tiny_base, {p: last_scaling * d for p, d in wrong.items()})(input_ids=ids).logits
        with compose(pool, pool.indices([names] * 3), torch.tensor([w] * 3), "mixture") as m:
            got = m(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(got, paper_bug, atol=1e-3)


def test_fusion_equals_formula(tiny_base, tiny_loras, tmp_path):
    """fusion: delta W = (sum_j w_j s_j B_j)(sum_j w_j A_j), cross terms included (same-rank adapters)."""
    from tests.helpers import make_lora

    extra = make_lora(tiny_base, tmp_path / "delta", r=4, alpha=2, seed=7)
    loras = dict(tiny_loras, delta=extra)
    pool = make_pool(tiny_base, loras, ["alpha", "delta"])
    w = [0.7, 0.3]
    reference = peft_reference(load_base(tiny_base), loras, ["alpha", "delta"])
    per = [lora_weights(reference, n) for n in ("alpha", "delta")]
    deltas = {}
    for path in per[0]:
        B_f = sum(wj * p[path][2] * p[path][1] for wj, p in zip(w, per))
        A_f = sum(wj * p[path][0] for wj, p in zip(w, per))
        deltas[path] = B_f @ A_f
    ids = batch_inputs()
    with torch.no_grad():
        expected = merged_reference(tiny_base, deltas)(input_ids=ids).logits
        with compose(pool, pool.indices([["alpha", "delta"]] * 3), torch.tensor([w] * 3), "fusion") as m:
            got = m(input_ids=ids).logits
        with compose(pool, pool.indices([["alpha", "delta"]] * 3), torch.tensor([w] * 3), "mixture") as m:
            mixture = m(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(got, mixture, atol=1e-4), "fusion must differ from mixture (cross terms)"


def test_build_composed_shapes():
    N, R, d_in, d_out, b, k = 5, 3, 6, 4, 2, 2
    A, B = torch.randn(N, R, d_in), torch.randn(N, d_out, R)
    idx, w = torch.tensor([[0, 3], [4, 1]]), torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    At, Bt = build_composed(A, B, idx, w, "mixture")
    assert At.shape == (b, d_in, k * R) and Bt.shape == (b, k * R, d_out)
    x = torch.randn(b, d_in)
    got = torch.einsum("bi,bir,bro->bo", x, At, Bt)
    want = torch.stack([sum(w[i, j] * (B[idx[i, j]] @ A[idx[i, j]] @ x[i]) for j in range(k)) for i in range(b)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    At, Bt = build_composed(A, B, idx, w, "fusion")
    assert At.shape == (b, d_in, R) and Bt.shape == (b, R, d_out)
    with pytest.raises(ValueError, match="Unknown composition mode"):
        build_composed(A, B, idx, w, "average")


def test_live_rows_factors_are_compose_selecteds_bit_for_bit(pool):
    """:func:`compose_selected`'s mixture, written in one pass into each layout, is the layout's definition bit for bit
    (the slots side by side, the weights folded into B; rows of fewer adapters than k, zero slots, included), and the
    live composition's per-row factors (one stack per module shape) are :func:`mixed_selected`'s exactly, with and
    without a fused row."""
    from utils.composition import LiveComposition, compose_selected, mixed_selected

    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 2, 4, 6, generator=g), torch.randn(3, 2, 5, 4, generator=g)
    A[2, 1], B[2, 1] = 0, 0  # a row with one adapter: its second slot is zeros
    w = torch.tensor([[0.5, 0.5], [1 / 3, 2 / 3], [0.7, 0.0]])
    b, k, R, d_in = A.shape
    want_At = A.reshape(b, k * R, d_in).transpose(1, 2)  # At[b, :, j*R + p] = A_bj[p, :]
    want_Bt = (B * w[:, :, None, None]).permute(0, 1, 3, 2).reshape(b, k * R, -1)  # Bt[b, j*R + p, :] = w_bj B_bj[:, p]
    for got, want in zip(compose_selected(A, B, w, "mixture"), (want_At, want_Bt)):
        assert got.shape == want.shape and torch.equal(got, want) and got.is_contiguous()

    rows = [(0, ["alpha", "beta"], [0.5, 0.5], "mixture"), (1, ["gamma"], [1.0], "mixture"),
            (2, ["beta", "gamma"], [0.2, 0.8], "mixture")]
    for fused_row in (False, True):
        if fused_row:
            rows[2] = (2, ["beta", "gamma"], [0.2, 0.8], "fusion")
        live = LiveComposition(pool)
        live._pin(rows)
        live._build(rows)
        names = [r[1] for r in rows]
        weights = torch.tensor([r[2] + [0.0] * (2 - len(r[2])) for r in rows])
        fusion = torch.tensor([r[3] == "fusion" for r in rows])
        for m, _, A_sel, B_sel in pool.gather(names, 2):
            want = mixed_selected(A_sel, B_sel, weights, fusion)
            for i in range(3):
                assert torch.equal(live._rows[i][m][0], want[0][i]) and torch.equal(live._rows[i][m][1], want[1][i]), (m, i)
        live.forget([0, 1, 2])


def test_mixed_batch_equals_rows_alone(tiny_base, pool):
    """Rows of one left-padded batch using different adapters give what each row gives alone."""
    from tests.helpers import make_tokenizer

    tok = make_tokenizer()
    prompts = ["The cat sits on the mat.", "Translate to French: the book", "Question: who wrote the book? Answer: the actors were wonderful"]
    chosen = [["alpha", "beta"], ["gamma", "alpha"], ["beta", "gamma"]]
    weights = torch.tensor([[0.5, 0.5], [0.8, 0.2], [0.3, 0.7]])

    def run(rows, mode):
        enc = tok([prompts[i] for i in rows], return_tensors="pt", padding=True)
        with compose(pool, pool.indices([chosen[i] for i in rows]), weights[rows], mode) as m, torch.no_grad():
            out = m.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=None, output_scores=True, return_dict_in_generate=True)
        return out.sequences[:, enc["input_ids"].shape[1]:], torch.stack(out.scores, 1)

    assert len({len(tok(p).input_ids) for p in prompts}) == 3, "prompts must differ in length to exercise padding"
    for mode in ("mixture", "fusion"):
        seqs, scores = run([0, 1, 2], mode)
        for i in range(3):
            s1, sc1 = run([i], mode)
            assert torch.equal(seqs[i], s1[0]), (mode, i)
            torch.testing.assert_close(scores[i], sc1[0], atol=1e-4, rtol=1e-4)


def test_grouped_kernel_equals_per_row_composition(pool):
    """LiveComposition's grouped kernel (one product per module for the batch's distinct adapters, each row's
    weights as a mask) gives each row's own mixture: adapters of different ranks and targets, a repeated adapter,
    a selection, a one-adapter fusion and a base row in one batch, prefill and a decoding step, within 1e-5 of
    :func:`compose`; a fused row of several adapters sends the batch to the per-row kernel."""
    from utils.composition import LiveComposition

    rows = [(0, ["alpha", "beta", "gamma"], [0.5, 0.3, 0.2], "mixture"), (1, ["gamma", "gamma"], [0.4, 0.6], "mixture"),
            (2, ["beta"], [1.0], "mixture"), (3, [], [], "mixture"), (4, ["alpha"], [0.7], "fusion"),
            (5, ["beta", "alpha"], [0.9, 0.1], "mixture")]
    ids, step = batch_inputs(batch=len(rows), length=7, seed=3), batch_inputs(batch=len(rows), length=1, seed=4)
    expected = []
    with torch.no_grad():
        for _, names, w, mode in rows:
            full = torch.cat([ids[len(expected)], step[len(expected)]])[None]
            if names:
                with compose(pool, [names], torch.tensor([w]), mode) as m:
                    expected.append(m(input_ids=full).logits[0])
            else:
                expected.append(pool.model(input_ids=full).logits[0])
        live = LiveComposition(pool, grouped=True)
        with live.active() as m:
            live.set_rows(rows)
            assert live.shared_forwards == 1
            out = m(input_ids=ids, use_cache=True)
            got = torch.cat([out.logits, m(input_ids=step, past_key_values=out.past_key_values).logits], 1)
            torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=0)
            fused = rows[:5] + [(6, ["beta", "alpha"], [0.9, 0.1], "fusion")]
            live.set_rows(fused)
            assert live.shared_forwards == 1 and live._factors is not None  # the per-row kernel
        live.forget([r[0] for r in rows] + [6])
    assert not pool.pinned()


def test_grouped_kernel_reuses_its_slots_as_the_batchs_adapters_change(pool):
    """Batches whose adapters change: a new adapter is copied into a free slot, or into the slot of one no row uses any
    more (the stack is not rebuilt); a stack much wider than its batch's ranks, or too narrow for a new rank, is rebuilt;
    every batch's logits stay within 1e-5 of each row's own composition."""
    from utils.composition import LiveComposition

    live = LiveComposition(pool, grouped=True)
    ids = batch_inputs(batch=8, length=5, seed=5)
    # per batch: row i uses names[i % len]; ranks gamma 8, alpha 4, beta 2
    batches = [["gamma"], ["gamma", "alpha"], ["alpha"], ["alpha", "beta"], ["beta"], ["gamma"]]
    stacks, outputs = [], []
    serial = 0
    with torch.no_grad(), live.active() as m:
        for names in batches:
            rows = []
            for i in range(8):
                rows.append((serial, [names[i % len(names)]], [0.5 + 0.1 * i], "mixture"))
                serial += 1
            live.set_rows(rows)
            stacks.append(live._shared)
            outputs.append((rows, m(input_ids=ids).logits))
            live.forget([r[0] for r in rows])
    with torch.no_grad():
        for rows, got in outputs:
            for i, (_, n, w, mode) in enumerate(rows):
                with compose(pool, [n], torch.tensor([w]), mode) as c:
                    torch.testing.assert_close(got[i], c(input_ids=ids[i:i + 1]).logits[0], atol=1e-5, rtol=0)
    assert live.shared_forwards == len(batches)
    assert stacks[0] is stacks[1] is stacks[2] is stacks[3]  # alpha into a free slot, then beta into gamma's
    assert [w.name for w in stacks[3].slots] == ["beta", "alpha"]
    assert stacks[4] is not stacks[3] and stacks[4].rank == 2  # beta alone: rank 8 slots would read 4x its columns
    assert stacks[5] is not stacks[4] and stacks[5].rank == 8  # gamma does not fit rank-2 slots
    assert not pool.pinned()


def test_batch_size_mismatch_is_refused(pool):
    ids = batch_inputs(batch=2)
    with compose(pool, pool.indices([["alpha"]] * 3), torch.ones(3, 1)) as m:
        with pytest.raises(RuntimeError, match="batch of 3"):
            m(input_ids=ids)


def test_bf16_model_composes_in_bf16_close_to_peft(tiny_base, tiny_loras):
    """On a bf16 base model the stacks are bf16 (one fused op per layer) and selection stays close to peft,
    which computes the LoRA delta in float32; one token per row takes the CPU decoding-step path (float32)."""
    from transformers import AutoModelForCausalLM

    entries = [PoolEntry(name=n, domain="d", samples=["x"], path=str(tiny_loras[n])) for n in ("alpha", "beta")]
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).eval()
    pool = AdapterPool(base, entries, show_progress=False)
    pool.acquire(["alpha", "beta"])
    assert all(A.dtype == B.dtype == torch.bfloat16 for _, _, A, B in pool.gather([["alpha", "beta"]], 2))
    pool.release(["alpha", "beta"])
    reference = peft_reference(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).eval(), tiny_loras, ["alpha", "beta"])
    ids = batch_inputs()
    reference.set_adapter("beta")
    for inputs in (ids, ids[:, :1]):  # a whole prompt, then one decoding step
        with torch.no_grad():
            expected = reference(input_ids=inputs).logits.float()
            with compose(pool, pool.indices([["beta"]] * ids.shape[0]), torch.ones(ids.shape[0], 1)) as m:
                got = m(input_ids=inputs).logits.float()
            plain = pool.model(input_ids=inputs).logits.float()
        effect = (expected - plain).abs().max()
        assert effect > 0.01  # the adapter changes the logits ...
        assert (got - expected).abs().max() < 0.1 * effect  # ... and bf16 composition reproduces that change


@pytest.fixture(scope="module")
def wild_loras(tiny_base, tiny_loras, tmp_path_factory):
    """Adapters as peft accepts them in the wild: rank/alpha patterns, rsLoRA, the pickle format, a legacy config."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.helpers import make_lora

    d = tmp_path_factory.mktemp("wild_loras")

    def save(name, cfg, seed, safe=True):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.mul_(3.0)
        model.save_pretrained(d / name, safe_serialization=safe)
        return d / name

    out = dict(tiny_loras)
    out["pattern"] = save("pattern", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False,
                                                rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
                                                alpha_pattern={"up_proj": 3}, task_type="CAUSAL_LM"), 21)
    out["rslora"] = make_lora(tiny_base, d / "rslora", r=8, alpha=4, seed=22, use_rslora=True, targets=("k_proj", "o_proj"))
    out["pickled"] = save("pickled", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], init_lora_weights=False,
                                                task_type="CAUSAL_LM"), 23, safe=False)
    legacy = make_lora(tiny_base, d / "legacy", r=4, alpha=16, seed=24, targets=("q_proj", "v_proj"))
    # an old peft's config: few keys, one the current peft no longer knows
    (legacy / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 16, "lora_dropout": 0.0, "bias": "none",
        "target_modules": ["q_proj", "v_proj"], "fan_in_fan_out": False, "inference_mode": True, "enable_lora": None,
        "merge_weights": False, "modules_to_save": None, "base_model_name_or_path": str(tiny_base)}))
    out["legacy"] = legacy
    assert (out["pickled"] / "adapter_model.bin").is_file() and not (out["pickled"] / "adapter_model.safetensors").exists()
    return out


WILD = ["alpha", "beta", "gamma", "pattern", "rslora", "pickled", "legacy"]


def test_wild_pool_selection_mixture_fusion_equal_peft_and_formulas(tiny_base, wild_loras):
    """A heterogeneous pool (ranks, alphas, targets, patterns, rsLoRA, .bin, legacy config) against stock peft, fp32, 1e-5."""
    pool = make_pool(tiny_base, wild_loras, WILD)
    reference = peft_reference(load_base(tiny_base), wild_loras, WILD)
    ids = batch_inputs()
    b = ids.shape[0]
    per = {n: lora_weights(reference, n) for n in WILD}
    assert {A.shape[0] for A, _, _ in per["pattern"].values()} == {2, 4, 6}, "rank_pattern must give several ranks"
    with torch.no_grad():
        for name in WILD:  # selection = peft with that one adapter
            reference.set_adapter(name)
            expected = reference(input_ids=ids).logits
            with compose(pool, pool.indices([[name]] * b), torch.ones(b, 1)) as m:
                torch.testing.assert_close(m(input_ids=ids).logits, expected, atol=1e-5, rtol=0, msg=name)
        w = [0.3, 0.1, 0.2, 0.15, 0.1, 0.05, 0.1]
        # mixture = peft's "cat" merge of all seven (the rank-concatenated adapter)
        reference.add_weighted_adapter(WILD, w, adapter_name="cat", combination_type="cat")
        reference.set_adapter("cat")
        expected = reference(input_ids=ids).logits
        with compose(pool, pool.indices([WILD] * b), torch.tensor([w] * b), "mixture") as m:
            torch.testing.assert_close(m(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        # fusion = (sum_j w_j s_j B_j)(sum_j w_j A_j), each A_j / B_j zero-padded to the largest rank at the module
        deltas = {}
        for path in {p for n in WILD for p in per[n]}:
            here = [(wj, per[n][path]) for wj, n in zip(w, WILD) if path in per[n]]
            R = max(A.shape[0] for _, (A, _, _) in here)
            A_f = sum(wj * torch.nn.functional.pad(A, (0, 0, 0, R - A.shape[0])) for wj, (A, _, _) in here)
            B_f = sum(wj * s * torch.nn.functional.pad(B, (0, R - B.shape[1])) for wj, (_, B, s) in here)
            deltas[path] = B_f @ A_f
        expected = merged_reference(tiny_base, deltas)(input_ids=ids).logits
        with compose(pool, pool.indices([WILD] * b), torch.tensor([w] * b), "fusion") as m:
            torch.testing.assert_close(m(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_a_composition_written_as_a_peft_adapter_loads_in_stock_peft_with_the_same_logits(tiny_base, wild_loras, tmp_path):
    """Mixture and fusion of a heterogeneous pool, materialised as one standard LoRA directory, give in stock peft the
    logits of the per-sample composition, to 1e-5."""
    from peft import PeftModel

    from utils.composition import materialize

    pool = make_pool(tiny_base, wild_loras, WILD)
    ids = batch_inputs()
    names, w = ["beta", "pattern", "rslora", "legacy"], [0.4, 0.3, -0.2, 0.5]
    ranks = {}
    for mode in ("mixture", "fusion"):
        out, ranks[mode] = materialize(pool, names, w, mode, tmp_path / mode)
        assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "composition.json"]
        assert not list(tmp_path.glob(".*tmp")), "no temporary folder is left"
        with torch.no_grad():
            with compose(pool, pool.indices([names] * ids.shape[0]), torch.tensor([w] * ids.shape[0]), mode) as m:
                expected = m(input_ids=ids).logits
            got = PeftModel.from_pretrained(load_base(tiny_base), str(out)).eval()(input_ids=ids).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=mode)
    assert ranks["fusion"] == 8 and ranks["mixture"] > ranks["fusion"]  # the largest rank vs the ranks concatenated
    from utils.vllm_compositions import composition_rank

    # no zero padding is written: the mixture's rank is, at its widest module, the sum of the ranks there
    assert ranks["mixture"] == composition_rank(pool, names, "mixture") and ranks["fusion"] == composition_rank(pool, names, "fusion")
