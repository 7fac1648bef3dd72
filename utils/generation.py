"""Stage: generation. Greedy decoding of a left-padded batch with its attention mask."""

from __future__ import annotations

import torch


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Row indices grouped into batches of similar length (longest first); callers restore input order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int = 50, max_input_tokens: int | None = None) -> tuple[list[str], list[int]]:
    """Greedy continuations of ``prompts``.

    The batch is left-padded and passed with its attention mask; prompts longer than
    ``max_input_tokens`` keep their last tokens (the instruction's end and the response marker).
    Returns (texts, number of generated tokens per row, up to the first EOS).
    """
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True)
    if max_input_tokens is not None and enc["input_ids"].shape[1] > max_input_tokens:
        enc = {k: v[:, -max_input_tokens:] for k, v in enc.items()}
    enc = {k: v.to(device) for k, v in enc.items()}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    new = out[:, enc["input_ids"].shape[1]:].cpu()
    texts, counts = [], []
    for row in new:
        ids = row.tolist()
        n = len(ids)
        if tokenizer.eos_token_id in ids:
            n = ids.index(tokenizer.eos_token_id) + 1
        counts.append(n)
        texts.append(tokenizer.decode(row[:n], skip_special_tokens=True).strip())
    return texts, counts
