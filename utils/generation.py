"""Stage: generation. Greedy continuations of a batch of prompts, for evaluation and ``generate.py``."""

from __future__ import annotations


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Row indices grouped into batches of similar length (longest first); callers restore input order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int = 50, max_input_tokens: int | None = None,
                   composition=None, compositions: list[tuple[list[str], list[float], str]] | None = None) -> tuple[list[str], list[int]]:
    """Greedy continuations of ``prompts``, decoded as one batch by :class:`utils.decoding.BatchDecoder` (the
    decoding step every entry shares; the same tokens as ``model.generate`` on the same batch).

    Prompts longer than ``max_input_tokens`` keep their last tokens (the instruction's end and the response marker).
    With ``composition`` (an active :class:`utils.composition.LiveComposition` over the pool), row i is composed of
    ``compositions[i] = (adapter names, weights, mode)``; without, ``model`` is used as it is.
    Returns (texts, number of generated tokens per row, up to and including the first EOS).
    """
    from utils.decoding import BatchDecoder, Sequence

    ids = tokenizer(prompts, add_special_tokens=True).input_ids
    if max_input_tokens is not None:
        ids = [row[-max_input_tokens:] for row in ids]
    seqs = [Sequence(prompt_ids=row, max_new_tokens=max_new_tokens) for row in ids]
    if compositions is not None:
        for s, (names, weights, mode) in zip(seqs, compositions):
            s.adapters, s.adapter_w, s.mode = list(names), [float(w) for w in weights], mode
    BatchDecoder(model, tokenizer, composition, live_text=False).generate(seqs)
    texts = [s.text.strip() for s in seqs]
    counts = [len(s.generated) + (1 if s.finish_reason == "stop" else 0) for s in seqs]
    return texts, counts
