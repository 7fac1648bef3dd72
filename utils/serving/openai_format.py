"""Stage: the OpenAI wire formats of logprobs, for completions (the legacy format) and for chat.

Completions (``logprobs: N``, and with ``echo`` the prompt's tokens first; the first prompt token has no logprob):

    {"tokens": [str], "token_logprobs": [float | None], "top_logprobs": [{str: float} | None], "text_offset": [int]}

``top_logprobs[i]`` holds the N most likely tokens at position i and the token itself (as vLLM returns them, so that a
client can tell whether the token was the most likely one); ``text_offset[i]`` is where token i's text starts in the
choice's ``text``.

Chat (``logprobs: true``, ``top_logprobs: N``):

    {"content": [{"token": str, "logprob": float, "bytes": [int], "top_logprobs": [{"token", "logprob", "bytes"}]}]}

Token strings are each token decoded alone.
"""

from __future__ import annotations


class TokenText:
    """Each token id decoded alone, cached (the tokenizer is used under ``lock``)."""

    def __init__(self, tokenizer, lock):
        self.tokenizer = tokenizer
        self.lock = lock
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            with self.lock:
                text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text


def completion_logprobs(token_text: TokenText, ids: list[int], lps: list, tops: list, start_offset: int = 0) -> dict:
    """The legacy completions ``logprobs`` object of tokens ``ids`` with logprobs ``lps`` and alternatives ``tops``."""
    tokens, offsets, top_dicts, offset = [], [], [], start_offset
    for t, lp, top in zip(ids, lps, tops):
        s = token_text(t)
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
        if top is None:
            top_dicts.append(None)
            continue
        d = {token_text(i): v for i, v in top}
        if lp is not None:
            d.setdefault(s, lp)
        top_dicts.append(d)
    return {"tokens": tokens, "token_logprobs": list(lps), "top_logprobs": top_dicts, "text_offset": offsets}


def merge_completion_logprobs(a: dict | None, b: dict) -> dict:
    """``a`` followed by ``b`` (prompt then completion), with ``b``'s offsets already counted from the same text."""
    if a is None:
        return b
    return {key: a[key] + b[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def chat_logprobs(token_text: TokenText, ids: list[int], lps: list, tops: list) -> dict:
    def entry(t, lp):
        s = token_text(t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {"content": [dict(entry(t, lp), top_logprobs=[entry(i, v) for i, v in (top or [])]) for t, lp, top in zip(ids, lps, tops)]}
