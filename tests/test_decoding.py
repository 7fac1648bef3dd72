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


def alone(pool, tok, prompts, comps, max_new_tokens):
    """Each prompt's greedy tokens alone on its composed model (comps: (names, weights, mode); no names: the base)."""
    want = []
    for prompt, (names, weights, mode) in zip(prompts, comps):
        if names:
            with compose(pool, [names], torch.tensor([weights]), mode) as composed:
                want += reference(composed, tok, [prompt], max_new_tokens)
        else:
            want += reference(pool.model, tok, [prompt], max_new_tokens)
    return want


def decoded(tok, rows):
    return [tok.decode(r, skip_special_tokens=True).strip() for r in rows]


def test_base_rows_get_model_generates_tokens(tiny_base, tok):
    model = load_base(tiny_base)
    want = reference(model, tok, PROMPTS, 80)  # 80 new tokens: past the cache's first reallocation
    texts, counts = generate_batch(model, tok, PROMPTS, 80)
    assert counts == [len(r) for r in want]
    assert texts == decoded(tok, want)


@pytest.mark.parametrize("grouped", [False, True], ids=["per_row", "grouped"])
def test_composed_rows_mixed_in_one_batch_get_each_rows_own_tokens(tiny_base, tiny_loras, tok, grouped):
    """Per-row kernel, and the grouped kernel (whose batches without a fused row share one product per module)."""
    pool = make_pool(tiny_base, tiny_loras, ["alpha", "beta", "gamma"])
    rows = [(["alpha", "beta"], [0.5, 0.5], "mixture"), (["gamma"], [1.0], "mixture"),
            ([], [], "mixture"), (["beta", "gamma", "alpha"], [0.2, 0.3, 0.5], "fusion")]
    want = alone(pool, tok, PROMPTS, rows, 16)
    live = LiveComposition(pool, grouped=grouped)
    with live.active() as model:
        texts, counts = generate_batch(model, tok, PROMPTS, 16, composition=live, compositions=rows)
    assert texts == decoded(tok, want)
    assert counts == [len(r) for r in want]
    assert not pool.pinned()  # the finished rows released their adapters
    # the next batch on the same composition (an evaluation run's next batch) gets its own rows' factors; without a
    # fused row of several adapters (a fusion of one is a selection), the grouped kernel shares one product per module
    swapped = [rows[1], rows[0], rows[2], (["alpha"], [1.0], "fusion")]
    with live.active() as model:
        again, _ = generate_batch(model, tok, PROMPTS, 16, composition=live, compositions=swapped)
    assert (live.shared_forwards > 0) == grouped
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
    decoder.step = lambda joining=(): (steps.append(len(decoder.rows)), real_step(joining))[1]
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


def test_compaction_fills_emptied_places_with_the_last_rows():
    from utils.decoding import compaction

    assert compaction([True, False, True, True, False]) == ([0, 3, 2], [(3, 1)])
    assert compaction([False, False, True, True]) == ([3, 2], [(3, 0), (2, 1)])
    assert compaction([True, True, False]) == ([0, 1], [])


def test_rows_joining_and_leaving_a_running_batch_keep_their_own_tokens(tiny_base, tok):
    """Continuous batching on the slab cache: groups join with shorter and longer prompts than the running window
    (widening it to the left, past its spare columns), rows leave from the middle (the last rows move into their
    places), and the rows outgrow the buffer's spare rows; every row gets the tokens it gets alone."""
    model = load_base(tiny_base)
    prompts = PROMPTS + ["a much longer prompt than any of the others, so that the running window must widen " * 3,
                         "short", "seven eight nine ten", "the mat sat on the cat", "x y"]
    want = [reference(model, tok, [p], 12)[0] for p in prompts]
    ids = tok(prompts).input_ids
    seqs = [Sequence(prompt_ids=row, max_new_tokens=n) for row, n in zip(ids, (12, 4, 12, 4, 12, 12, 2, 12, 12))]
    decoder = BatchDecoder(model, tok, live_text=False)

    def run(steps):
        for _ in range(steps):
            decoder.step()
            decoder.drop([s for s in decoder.rows if s.finished])

    decoder.add(seqs[:3])
    run(2)
    decoder.add([seqs[3]])
    decoder.add(seqs[4:6])  # longer than the running window
    assert decoder.cache.layers[0].keys.shape[0] == 6 and len(decoder.rows) == 6
    run(3)  # rows 1 and 3 (4 tokens each) leave from the middle
    assert seqs[1] not in decoder.rows and seqs[3] not in decoder.rows
    decoder.add(seqs[6:])
    run(20)
    assert not decoder.rows
    for s, n, ref_row in zip(seqs, (12, 4, 12, 4, 12, 12, 2, 12, 12), want):
        assert s.generated == ref_row[:n], s.prompt_ids


def test_the_slab_widens_in_place_and_moves_single_rows():
    layer = SlabLayer()
    k = torch.randn(2, 2, 5, 4)
    layer.update(k, k + 1)
    buffer, start = layer._k, layer.start
    assert start >= 2 and layer._k.shape[0] >= 3
    new = torch.randn(1, 2, 7, 4)  # two columns longer than the window: it widens into the left spare columns
    layer.append_rows(new, new + 1)
    assert layer._k is buffer and layer.start == start - 2 and layer.keys.shape == (3, 2, 7, 4)
    assert torch.equal(layer.keys[:2, :, 2:], k) and torch.equal(layer.keys[:2, :, :2], torch.zeros(2, 2, 2, 4))
    assert torch.equal(layer.keys[2], new[0]) and torch.equal(layer.values[2], new[0] + 1)
    layer.move_rows([(2, 0)], 2)  # row 0 left: the last row takes its place
    assert layer._k is buffer and torch.equal(layer.keys[0], new[0]) and torch.equal(layer.keys[1, :, 2:], k[1])
    layer.trim(2)
    assert torch.equal(layer.keys[1], k[1]) and layer.get_seq_length() == 5


def test_live_composition_rewrites_only_the_rows_that_changed(tiny_base, tiny_loras):
    """Through joins, leaves, rows moved into emptied places, prefill groups in between, rows of other widths and
    targets, and serials coming back after being forgotten, the factors the hooks use are each row's own factors,
    exactly, zero-padded; a batch change that keeps most rows rewrites only the others."""
    pool = make_pool(tiny_base, tiny_loras, ["alpha", "beta", "gamma"])
    kinds = [(["alpha", "beta"], [0.5, 0.5], "mixture"), (["gamma"], [1.0], "mixture"), ([], [], "mixture"),
             (["beta", "gamma", "alpha"], [0.2, 0.3, 0.5], "fusion"), (["beta"], [1.0], "mixture")]
    spec = {s: kinds[s % len(kinds)] for s in range(12)}
    live = LiveComposition(pool)

    def check(key):
        live.set_rows([(s, *spec[s]) for s in key])
        kept = [live._rows[s] for s in key]  # each row's own factors, built once when it joined
        assert set(live._factors) == {m for row in kept for m in row}
        for m, (At, Bt, _) in live._factors.items():
            for p, row in enumerate(kept):  # the stack as built afresh: each row zero-padded to the stack's width
                r = row[m][0].shape[1] if m in row else 0
                if r:
                    assert torch.equal(At[p, :, :r], row[m][0]) and torch.equal(Bt[p, :r], row[m][1])
                assert not At[p, :, r:].any() and not Bt[p, r:].any()

    check((0, 1, 2, 3))
    check((4, 5))  # a prefill group between two steps of the running batch
    running = live._stacks[0] if live._stacks[0].serials[:4] == [0, 1, 2, 3] else live._stacks[1]
    check((0, 1, 2, 3, 4, 5))
    live.forget([1])
    assert running.serials == [0, None, 2, 3, 4, 5]  # of the next batch's places, only the emptied one differs
    buffers = {m: At.data_ptr() for m, (At, _) in running.buffers.items()}
    check((0, 5, 2, 3, 4))  # row 1 left; the last row took its place
    assert running.serials == [0, 5, 2, 3, 4]
    assert all(At.data_ptr() == buffers[m] for m, (At, _, _) in live._factors.items())  # the running stack, in place
    check((0, 5, 2, 3, 4, 6, 7, 8, 9))  # more rows than the buffers held: they grow
    live.forget([0, 2, 3])
    check((9, 5, 8, 4, 6, 7))
    live.forget(list(range(12)))
    spec[5] = kinds[3]  # a serial that comes back (a new decoder) with other adapters
    check((5, 4))
    assert not pool.pinned() or set(pool.pinned()) <= {"alpha", "beta", "gamma"}
    live.forget([5, 4])
    assert not pool.pinned()


@pytest.mark.parametrize("grouped", [False, True], ids=["per_row", "grouped"])
def test_a_mixed_step_prefills_joining_rows_inside_the_running_batchs_forward(tiny_base, tiny_loras, tok, grouped):
    """Joining rows (shorter and longer than the running window, composed and base; at first with no running rows)
    are prefilled in the running batch's decoding forward (one forward per step, no separate prefill) and every row, running or joining, gets the
    greedy tokens it gets alone on its composed model; a group whose adapters cannot be composed fails alone."""
    from utils.decoding import JoinFailed

    pool = make_pool(tiny_base, tiny_loras, ["alpha", "beta", "gamma"])
    prompts = PROMPTS + ["a much longer prompt than any of the others, so that the running window widens " * 3, "x y"]
    comps = [(["alpha", "beta"], [0.5, 0.5], "mixture"), ([], [], "mixture"), (["gamma"], [1.0], "mixture"),
             (["beta", "gamma", "alpha"], [0.2, 0.3, 0.5], "fusion"), ([], [], "mixture"), (["beta"], [1.0], "mixture")]
    want = alone(pool, tok, prompts, comps, 10)
    ids = tok(prompts).input_ids
    seqs = [Sequence(prompt_ids=p, max_new_tokens=10, adapters=n, adapter_w=w, mode=m) for p, (n, w, m) in zip(ids, comps)]
    live = LiveComposition(pool, grouped=grouped)
    decoder = BatchDecoder(pool.model, tok, live, live_text=False)
    assert decoder.mixed_steps  # transformers' SDPA attention: mixed steps are on
    forwards = []
    hook = pool.model.register_forward_pre_hook(lambda *a: forwards.append(1))

    def run(steps, joining=()):
        for i in range(steps):
            decoder.step(joining if i == 0 else ())
            decoder.drop([s for s in decoder.rows if s.finished])

    with live.active():
        decoder.check_model()
        forwards.clear()
        decoder.step(seqs[:2])  # no running rows: one unpadded prefill of the two
        assert decoder.cache.layers[0].rows == 2 and len(forwards) == 1
        run(2)
        run(1, seqs[2:5])  # three rows join one step: one longer than the window, one base, one fused
        assert len(decoder.rows) == 5 and len(forwards) == 4  # the prefill, two steps and one mixed step
        bad = Sequence(prompt_ids=ids[0], max_new_tokens=4, adapters=["nobody"], adapter_w=[1.0])
        with pytest.raises(JoinFailed):
            decoder.step([bad])
        assert bad not in decoder.rows and len(decoder.rows) == 5
        run(3, [seqs[5]])
        run(20)
    hook.remove()
    assert (live.shared_forwards > 0) == grouped
    assert not decoder.rows and not pool.pinned()
    for s, ref_row in zip(seqs, want):
        assert s.generated == ref_row, s.prompt_ids


@pytest.mark.parametrize("grouped", [False, True], ids=["per_row", "grouped"])
def test_a_long_prompt_is_prefilled_in_chunks_while_the_batch_decodes(tiny_base, tiny_loras, tok, grouped):
    """With ``max_prefill_tokens``, a prompt longer than the cap is prefilled over several steps (each chunk attends
    to the prompt's earlier chunks), while the running rows get a token at every step; its row joins with its last
    chunk and every row gets its own greedy tokens. A prompt cancelled while it is being prefilled leaves nothing."""
    pool = make_pool(tiny_base, tiny_loras, ["alpha", "beta", "gamma"])
    long_prompt = "a much longer prompt than any of the others, so that it takes several chunks " * 3
    prompts = [PROMPTS[0], PROMPTS[2], long_prompt, PROMPTS[3], long_prompt]
    comps = [(["alpha", "beta"], [0.5, 0.5], "mixture"), ([], [], "mixture"), (["gamma"], [1.0], "mixture"),
             (["beta", "gamma", "alpha"], [0.2, 0.3, 0.5], "fusion"), (["beta"], [1.0], "mixture")]
    want = alone(pool, tok, prompts, comps, 24)
    ids = tok(prompts).input_ids
    assert len(ids[2]) > 3 * 7
    seqs = [Sequence(prompt_ids=p, max_new_tokens=24, adapters=n, adapter_w=w, mode=m) for p, (n, w, m) in zip(ids, comps)]
    live = LiveComposition(pool, grouped=grouped)
    decoder = BatchDecoder(pool.model, tok, live, live_text=False)
    decoder.max_prefill_tokens = 1
    with live.active():
        decoder.check_model()  # its probe of a mixed step is not cut into chunks
    assert decoder.mixed_steps and decoder.max_prefill_tokens == 1
    decoder.max_prefill_tokens = 7
    with live.active():
        decoder.step(seqs[:2])  # 2 prompts of more than 7 tokens together: chunked too
        while len(decoder.rows) < 2:
            decoder.step()
        before = [len(s.generated) for s in seqs[:2]]
        decoder.step(seqs[2:5])
        steps = 1
        while seqs[2] not in decoder.rows:
            assert seqs[2] in decoder.prefilling and not seqs[2].generated
            # the running rows decode meanwhile, a token per step until they finish
            assert all(len(s.generated) == n + steps or s.finished for s, n in zip(seqs[:2], before))
            assert not all(s.finished for s in seqs[:2])
            if steps == 2:
                decoder.drop([seqs[4]])  # cancelled while it waits for its chunks
                assert seqs[4] not in decoder.prefilling and seqs[4].serial not in decoder._partial
            decoder.step()
            steps += 1
        assert steps >= 3
        while decoder.rows or decoder.prefilling:
            decoder.step()
            decoder.drop([s for s in decoder.rows if s.finished])
    assert not pool.pinned()
    assert (live.shared_forwards > 0) == grouped
    for s, ref_row in zip(seqs[:4], want):
        assert s.generated == ref_row, s.prompt_ids
    assert not seqs[4].generated
    # Every running row finishes and leaves while a prompt is still being prefilled: the prompt goes on.
    short = Sequence(prompt_ids=ids[0], max_new_tokens=2, adapters=comps[0][0], adapter_w=comps[0][1])
    longer = Sequence(prompt_ids=ids[2], max_new_tokens=3, adapters=comps[2][0], adapter_w=comps[2][1])
    with live.active():
        decoder.step([short])
        decoder.step([longer])
        for _ in range(40):
            decoder.drop([s for s in decoder.rows if s.finished])
            if not decoder.rows and not decoder.prefilling:
                break
            decoder.step()
    assert short.generated == want[0][:2] and longer.generated == want[2][:3]
    assert not pool.pinned()
