"""The one decoding step (utils/decoding.py) against transformers' ``model.generate``: same greedy tokens for base
rows, for composed rows mixed in one batch, for rows that leave the batch early, and past the KV cache's first
reallocation."""

import pytest
import torch

from tests.test_composition import load_base, make_pool
from utils.composition import LiveComposition, compose
from utils.decoding import BatchDecoder, Sequence, SlabLayer, kv_cache
from utils.generation import generate_batch

PROMPTS = ["the cat sat on the mat", "a", "which answer is correct here and why not", "one two three four"]


@pytest.fixture(scope="module")
def tok(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def reference(model, tok, prompts, max_new_tokens):
    """model.generate's greedy tokens for a left-padded batch, each row cut after its first EOS."""
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    rows = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        rows.append(row[:row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    return rows


def decoded(tok, rows):
    return [tok.decode(r, skip_special_tokens=True).strip() for r in rows]


def test_base_rows_get_model_generates_tokens(tiny_base, tok):
    model = load_base(tiny_base)
    want = reference(model, tok, PROMPTS, 80)  # 80 new tokens: past the cache's first reallocation
    texts, counts = generate_batch(model, tok, PROMPTS, 80)
    assert counts == [len(r) for r in want]
    assert texts == decoded(tok, want)


def test_composed_rows_mixed_in_one_batch_get_each_rows_own_tokens(tiny_base, tiny_loras, tok):
    pool = make_pool(tiny_base, tiny_loras, ["alpha", "beta", "gamma"])
    rows = [(["alpha", "beta"], [0.5, 0.5], "mixture"), (["gamma"], [1.0], "mixture"),
            ([], [], "mixture"), (["beta", "gamma", "alpha"], [0.2, 0.3, 0.5], "fusion")]
    want = []
    for prompt, (names, weights, mode) in zip(PROMPTS, rows):
        if names:
            with compose(pool, [names], torch.tensor([weights]), mode) as composed:
                want += reference(composed, tok, [prompt], 16)
        else:
            want += reference(pool.model, tok, [prompt], 16)
    live = LiveComposition(pool)
    with live.active() as model:
        texts, counts = generate_batch(model, tok, PROMPTS, 16, composition=live, compositions=rows)
    assert texts == decoded(tok, want)
    assert counts == [len(r) for r in want]
    assert not pool.pinned()  # the finished rows released their adapters
    # the next batch on the same composition (an evaluation run's next batch) gets its own rows' factors
    swapped = rows[::-1]
    with live.active() as model:
        again, _ = generate_batch(model, tok, PROMPTS, 16, composition=live, compositions=swapped)
    for prompt, text, (names, weights, mode) in zip(PROMPTS, again, swapped):
        if names:
            with compose(pool, [names], torch.tensor([weights]), mode) as composed:
                assert [text] == decoded(tok, reference(composed, tok, [prompt], 16))
        else:
            assert [text] == decoded(tok, reference(pool.model, tok, [prompt], 16))


def test_rows_that_finish_early_leave_and_the_rest_keep_their_tokens(tiny_base, tok):
    model = load_base(tiny_base)
    want = reference(model, tok, PROMPTS, 20)
    if any(len(r) < 20 for r in want):
        pytest.skip("the tiny model ended a row early; this test needs rows that run to their limits")
    ids = tok(PROMPTS).input_ids
    seqs = [Sequence(prompt_ids=row, max_new_tokens=n, ignore_eos=True) for row, n in zip(ids, (20, 1, 7, 20))]
    decoder = BatchDecoder(model, tok, live_text=False)
    steps = []
    real_step = decoder.step
    decoder.step = lambda: (steps.append(len(decoder.rows)), real_step())[1]
    decoder.generate(seqs)
    for s, n, ref_row in zip(seqs, (20, 1, 7, 20), want):
        assert s.generated == ref_row[:n]
    assert steps[0] == 3 and steps[-1] == 2  # the one-token row left after the prefill, the 7-token row later
    assert decoder.rows == [] and decoder.cache is None


def test_the_cache_writes_in_place_and_refuses_sliding_windows(tiny_base):
    model = load_base(tiny_base)
    cache = kv_cache(model)
    assert all(isinstance(layer, SlabLayer) for layer in cache.layers)
    layer = cache.layers[0]
    k = torch.randn(2, 2, 5, 4)
    layer.update(k, k + 1)
    buffer = layer._k
    layer.update(torch.ones(2, 2, 1, 4), torch.ones(2, 2, 1, 4))
    assert layer._k is buffer and layer.get_seq_length() == 6  # written into the spare columns, not concatenated
    assert torch.equal(layer.keys[:, :, :5], k) and torch.equal(layer.values[:, :, 5:], torch.ones(2, 2, 1, 4))
    layer.update(torch.zeros(2, 2, 100, 4), torch.zeros(2, 2, 100, 4))
    assert layer.get_seq_length() == 106 and layer._k.shape[2] >= 106 and torch.equal(layer.keys[:, :, :5], k)

    from transformers import MistralConfig, MistralForCausalLM

    sliding = MistralForCausalLM(MistralConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, sliding_window=8))
    with pytest.raises(ValueError, match="full-attention KV cache"):
        kv_cache(sliding)
