"""Stage: decoding. The one decoding step of every entry: a batch of sequences that gain and lose rows between steps.

Evaluation (``main.py``, ``eval_all.sh``), ``generate.py`` and the server all decode here. A server lets a new
request join the running batch between two decoding steps and lets a finished one leave (continuous batching), while
every row keeps its own LoRA composition; an evaluation batch is the same object, filled once and run until every row
has finished (:meth:`BatchDecoder.generate`), its finished rows leaving the batch so that the rest step faster.
:class:`BatchDecoder` holds that batch:

    rows      the :class:`Sequence` objects, one per request, in batch order
    cache     the model's KV cache: per layer keys/values [b, heads, T, head_dim], left-padded, views of buffers
              with spare rows and columns (:class:`SlabLayer`), so that a step writes one column in place, a
              joining request writes its own rows and a leaving one costs one row's copy (transformers'
              ``DynamicLayer`` concatenates at every step; merging and dropping rows used to copy every layer)
    mask      [b, T] attention mask (0 on the left padding of each row)

- :meth:`BatchDecoder.add` prefills new sequences together (left-padded among themselves), picks each one's
  first token, and merges their cache into the running one: the shorter side is left-padded with zeros in the
  keys, values and mask, and the new rows are written after the running ones. Keys were rotated at their true
  positions (position ids are ``cumsum(mask) - 1``), so padding on the left changes no row's attention.
- :meth:`BatchDecoder.step` feeds every row its last token, one forward for the whole batch; new sequences can join
  that forward (``step(joining)``, a mixed step: their prompts are packed after the running rows' tokens, unpadded,
  and attention is split per row, :class:`RaggedStep`), so that a join costs its prompt's compute but not a second
  read of the weights. With :attr:`BatchDecoder.max_prefill_tokens` a step takes at most that many prompt tokens,
  and a longer prompt is prefilled over several steps (chunked prefill) while the running rows go on decoding.
- :meth:`BatchDecoder.drop` removes rows (the last rows fill the places left empty: batch order is not kept) and
  trims the columns that have become padding in every row.

Per-row composition: before each forward, :class:`utils.composition.LiveComposition` gets the adapter
names, weights and mode of the rows of that forward (each row's factors are built once; they are restacked
only when the rows change). The decoder runs inside ``composition.active()``, entered by its owner. Under greedy
decoding a row therefore gets the same tokens alone or inside any batch, up to float rounding of the
batched matmuls, and the same tokens as ``model.generate`` on the composed model (tests/test_decoding.py).

Logprobs are the model's own (``log_softmax`` of the composed model's logits, before temperature and top-p, as
vLLM's default ``raw_logprobs``): a row with ``logprobs`` records them for each generated token, a row with
``prompt_logprobs`` for each prompt token from the logits of the same prefill (the first token has none). Such a
prefill keeps the logits of every position ([b, T, vocab]); callers keep those batches small.

Only full-attention KV caches can be padded and merged this way; a model with sliding-window or recurrent layers
is refused by :meth:`BatchDecoder.check_model` (and by the first prefill).
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

logger = logging.getLogger(__name__)

RAGGED = "lora_ragged"  # the attention implementation of a mixed step (:class:`RaggedStep`), registered below


class SlabLayer(DynamicLayer):
    """One layer's KV cache held in buffers with spare rows and spare columns on both sides.

    The buffers are [R, heads, C, head_dim]; the batch's b rows are buffer rows 0..b-1 and its T columns the window
    ``start..end`` (T = end - start), so ``keys``/``values`` (what attention reads) are the views
    ``buffer[:b, :, start:end]``. Every change of the batch touches only what changes:

    - :meth:`update` (a forward) writes its new columns at ``end`` in place: a decoding step copies one column;
    - :meth:`append_rows` writes a new group's rows at row b, left-padded with zeros to T columns; a group longer
      than T first widens the window to the left (zeros for the running rows), into the spare columns there;
    - :meth:`move_rows` copies a few rows into the places of rows that left (the decoder keeps rows 0..b-1 dense);
    - :meth:`trim` drops leading columns (padding in every row) by moving ``start``.

    Only when rows or columns run out are the buffers reallocated, with half as much room again (at least 64 columns
    on the right and 32 on the left, at least 4 rows), copying the window once."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._k = self._v = None
        self.rows = self.start = self.end = 0

    @property
    def length(self) -> int:
        return self.end - self.start

    def _views(self) -> None:
        self.keys = self._k[:self.rows, :, self.start:self.end]
        self.values = self._v[:self.rows, :, self.start:self.end]

    def _reserve(self, rows: int, left: int, right: int, like: torch.Tensor) -> None:
        """Room for ``rows`` rows, ``left`` more columns before ``start`` and ``right`` more after ``end``."""
        if (self._k is not None and rows <= self._k.shape[0] and left <= self.start
                and self.end + right <= self._k.shape[2]):
            return
        t = self.length
        spare_left = max(32, (t + left) // 4) + left
        spare_right = max(64, (t + right) // 2) + right
        r = max(rows, 4) if self._k is None else max(rows, self._k.shape[0] + self._k.shape[0] // 2)
        shape = (r, like.shape[1], spare_left + t + spare_right, like.shape[3])
        # Not zeroed: every column enters the window written (update, the appends) or zeroed (left padding), and
        # zero-filling a long prompt's new buffers (first-touch page faults) cost 1.1 s for 1.3 GB.
        k, v = like.new_empty(shape), like.new_empty(shape)
        if self._k is not None and self.rows and t:
            k[:self.rows, :, spare_left:spare_left + t] = self._k[:self.rows, :, self.start:self.end]
            v[:self.rows, :, spare_left:spare_left + t] = self._v[:self.rows, :, self.start:self.end]
        self._k, self._v = k, v
        self.start, self.end = spare_left, spare_left + t

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._k is None:
            self.rows = key_states.shape[0]
        elif key_states.shape[0] != self.rows:
            raise RuntimeError(f"SlabLayer holds {self.rows} rows; a forward of {key_states.shape[0]} cannot update it.")
        t = key_states.shape[-2]
        self._reserve(self.rows, 0, t, key_states)
        self._k[:self.rows, :, self.end:self.end + t] = key_states
        self._v[:self.rows, :, self.end:self.end + t] = value_states
        self.end += t
        self._views()
        return self.keys, self.values

    def _open_rows(self, n: int, longest: int, shortest: int, like: torch.Tensor) -> int:
        """Room for ``n`` new rows whose keys end at ``end``, the longest ``longest`` columns (the window widens to the
        left for it, with zeros for the rows already there), their left padding zeroed up to the shortest's start;
        returns the first new row (the caller writes the keys, then counts the rows)."""
        wider = max(longest - self.length, 0)
        self._reserve(self.rows + n, wider, 0, like)
        if wider:  # the running rows get zeros (masked) in the new leading columns
            self._k[:self.rows, :, self.start - wider:self.start] = 0
            self._v[:self.rows, :, self.start - wider:self.start] = 0
            self.start -= wider
        rows = slice(self.rows, self.rows + n)
        self._k[rows, :, self.start:self.end - shortest] = 0  # the new rows' left padding; stale rows may lie there
        self._v[rows, :, self.start:self.end - shortest] = 0
        return self.rows

    def append_rows(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add rows whose keys/values [n, heads, t, head_dim] end at the same position as the running rows'."""
        n, t = keys.shape[0], keys.shape[-2]
        first = self._open_rows(n, t, t, keys)
        self._k[first:first + n, :, self.end - t:self.end] = keys.to(self._k.device)
        self._v[first:first + n, :, self.end - t:self.end] = values.to(self._v.device)
        self.rows += n
        self._views()

    def append_spans(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Add one row per prompt, keys/values [1, heads, L_i, head_dim] each (a mixed step's joining prompts), each
        ending at the same position as the running rows': :meth:`append_rows` for rows of different lengths, with
        one reservation for them all."""
        lengths = [k.shape[2] for k in keys]
        first = self._open_rows(len(keys), max(lengths), min(lengths), keys[0])
        for j, (k, v) in enumerate(zip(keys, values)):
            self._k[first + j, :, self.end - k.shape[2]:self.end] = k[0]
            self._v[first + j, :, self.end - v.shape[2]:self.end] = v[0]
        self.rows += len(keys)
        self._views()

    def move_rows(self, moves: list[tuple[int, int]], rows: int) -> None:
        """Copy row ``src`` over row ``dst`` for each (src, dst), then keep the first ``rows`` rows."""
        for src, dst in moves:
            self._k[dst, :, self.start:self.end] = self._k[src, :, self.start:self.end]
            self._v[dst, :, self.start:self.end] = self._v[src, :, self.start:self.end]
        self.rows = rows
        self._views()

    def trim(self, columns: int) -> None:
        """Drop the first ``columns`` columns of the window."""
        self.start += columns
        self._views()

    def reset(self) -> None:
        self._k = self._v = None
        self.rows = self.start = self.end = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SlabLayer is the decoder's own cache; it is not cropped.")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("SlabLayer is the decoder's own cache; its rows change through BatchDecoder only.")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("SlabLayer is the decoder's own cache; its rows change through BatchDecoder only.")


@dataclass
class Chunk:
    """A joining prompt's tokens in a mixed step: ``length`` tokens from ``offset`` in the packed sequence.

    ``past`` holds, per layer, the keys and values [1, kv_heads, P, hd] of the prompt's earlier chunks (None for its
    first). A ``final`` chunk ends the prompt: its row's keys join the cache; any other chunk's keys so far are left
    in ``kept`` (per layer) for the next one."""

    offset: int
    length: int
    past: dict | None = None
    final: bool = True
    kept: dict = field(default_factory=dict)


class RaggedStep:
    """One forward that decodes the running rows and prefills joining sequences together (a mixed step).

    The forward's tokens are packed in one sequence [1, N] with no padding: the b running rows' last tokens first
    (token i is row i's), then each joining prompt's tokens for this step (a :class:`Chunk`: the whole prompt, or a
    part of a long one when the step's prompt tokens are capped). Every layer's linear maps, norms and LoRA deltas run
    once over the N tokens, so the step's weights are read once for both kinds of rows (a separate prefill reads them
    again: about 40 of a 66 ms step at 16 rows on the embedded model). Attention is the only part that needs rows:
    :meth:`attend` (called by the model's attention layers through the ``lora_ragged`` implementation, with this
    object as the ``ragged`` keyword) splits it:

        running rows:  q [b, heads, 1, hd] against the cache's rows 0..b-1 after writing their new column, under
                       the decoder's mask [b, T + 1]: what a decoding step computes;
        chunk j:       q [1, heads, L_j, hd] against its prompt's keys so far [1, kv_heads, P_j + L_j, hd], causal
                       (query i sees keys 0..P_j + i): what its prefill alone computes. The keys and values of the
                       prompts that end here are then appended to the cache as new rows
                       (:meth:`SlabLayer.append_spans`).

    Both call transformers' own SDPA attention, so each row's attention is the same operation as in a separate step
    or prefill (up to float rounding of the packed matmuls). The decoding thread owns the model: the model's config
    names the ``lora_ragged`` implementation for the length of this forward only."""

    def __init__(self, cache, running: int, mask: torch.Tensor | None, chunks: list[Chunk]):
        self.cache, self.running, self.chunks = cache, running, chunks
        self.mask = None if mask is None else mask.bool()[:, None, None, :]  # [b, 1, 1, T + 1]: True where a row attends

    def attend(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None):
        i, b = module.layer_idx, self.running
        layer = self.cache.layers[i]
        out = query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])  # [1, N, heads, hd]
        if b:
            keys, values = layer.update(key[0, :, :b, None].transpose(0, 1), value[0, :, :b, None].transpose(0, 1))
            out[0, :b] = sdpa_attention_forward(module, query[0, :, :b, None].transpose(0, 1), keys, values, self.mask,
                                                scaling=scaling)[0][:, 0]
        elif not layer.is_initialized:  # a cache of no rows yet (a prefill with no running rows)
            layer.lazy_initialization(key, value)
        ending = []
        for c in self.chunks:
            o, n = c.offset, c.length
            k, v = key[:, :, o:o + n], value[:, :, o:o + n]
            if c.past is None:
                mask, causal = None, True
            else:  # the prompt's earlier chunks first: query i (position P + i) sees keys 0..P + i
                pk, pv = c.past[i]
                k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
                seen = torch.arange(k.shape[2], device=k.device)[None, :]
                mask = (seen <= torch.arange(k.shape[2] - n, k.shape[2], device=k.device)[:, None])[None, None]
                causal = False
            out[0, o:o + n] = sdpa_attention_forward(module, query[:, :, o:o + n], k, v, mask, scaling=scaling,
                                                     is_causal=causal)[0][0]
            if c.final:
                ending.append((k, v))
            else:
                c.kept[i] = (k, v)
        if ending:
            layer.append_spans([k for k, _ in ending], [v for _, v in ending])
        return out, None


def _ragged_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, ragged=None, **kwargs):
    if ragged is None:
        raise RuntimeError("The lora_ragged attention runs only inside BatchDecoder's mixed step (it needs its rows).")
    return ragged.attend(module, query, key, value, scaling)


AttentionInterface.register(RAGGED, _ragged_attention)


def kv_cache(model) -> DynamicCache:
    """An empty cache of :class:`SlabLayer` for ``model``, or a ValueError when a layer is not full attention."""
    cache = DynamicCache(config=model.config)
    kinds = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer})
    if kinds:
        raise ValueError(f"The decoder needs a full-attention KV cache in every layer; this model's cache has {kinds}. "
                         "Use a model with full attention in every layer.")
    if cache.layers:
        cache.layers = [SlabLayer() for _ in cache.layers]
    else:
        cache.layer_class_to_replicate = SlabLayer
    return cache


def compaction(keep: list[bool]) -> tuple[list[int], list[tuple[int, int]]]:
    """Where the kept rows of a batch go when the others leave: (order, moves). ``order[p]`` is the old index of the
    row now at place p; ``moves`` are the (src, dst) copies that bring it there: a kept row beyond the new size fills
    an emptied place, the last first, and every other kept row stays where it is."""
    n = sum(keep)
    holes = [i for i in range(n) if not keep[i]]
    movers = [i for i in range(len(keep) - 1, n - 1, -1) if keep[i]]
    order = list(range(n))
    moves = list(zip(movers, holes))
    for src, dst in moves:
        order[dst] = src
    return order, moves


@dataclass
class Sampling:
    """Decoding of one sequence: greedy when ``temperature`` is 0, else softmax sampling with nucleus ``top_p``."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(eq=False)
class Sequence:
    """One request's row: its prompt, limits, composition, and what has been generated so far.

    ``adapters``/``adapter_w`` are the row's adapter names and weights (empty for the base model); ``mode`` is its
    composition, ``mixture`` or ``fusion``.
    """

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    adapter_w: list[float] = field(default_factory=list)
    mode: str = "mixture"
    ignore_eos: bool = False  # generate max_new_tokens whatever the model says (benchmarks)
    logprobs: int | None = None  # record each generated token's logprob and this many top alternatives (None: none)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens, from the prefill's logits (None: none)
    # state, written by the decoder
    generated: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)  # of each generated token (with ``logprobs``)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # its top alternatives, best first
    prompt_token_logprobs: list[float | None] = field(default_factory=list)  # of each prompt token; the first is None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    serial: int = -1  # unique within the decoder: identifies the rows of a batch (object ids can be reused)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def stable_text(self) -> str:
        """The text that can be sent: without a trailing partial UTF-8 character or a possible start of a stop string."""
        text = self.text
        if self.finished:
            return text
        if text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return text[: len(text) - hold]


class JoinFailed(RuntimeError):
    """Sequences joining a step could not be set up (their adapters' composition); the running rows are untouched."""


class BatchDecoder:
    """The running batch of a server (module docstring). Not thread-safe: one thread drives it.

    Args:
        model: the base causal LM (the pool's composition hooks its modules; nothing is injected).
        tokenizer: its tokenizer (decoding only; callers tokenize prompts). ``tokenizer_lock`` guards it when
            other threads use the same tokenizer.
        composition: a :class:`LiveComposition` over the pool, or None for a model without adapters.
        eos_ids: token ids that end a sequence.
        context_length: the model's maximum sequence length; a row reaching it ends with ``length``.
        live_text: keep each row's ``text`` decoded as it grows (what streaming and stop strings read); without it,
            a row's text is decoded once, when it finishes (a batch run: one tokenizer call per row, not per step).
    """

    def __init__(self, model, tokenizer, composition=None, eos_ids: set[int] | None = None,
                 context_length: int | None = None, tokenizer_lock: threading.Lock | None = None, live_text: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.composition = composition
        self.eos_ids = set(eos_ids or ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))
        self.context_length = context_length
        self.lock = tokenizer_lock or threading.Lock()
        self.live_text = live_text
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.rows: list[Sequence] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # [b, T]
        self.last: torch.Tensor | None = None  # [b] the last token of each row
        self._serials = itertools.count()
        # Mixed steps (joining rows prefilled inside a decoding step, :class:`RaggedStep`) split attention through
        # transformers' SDPA function, so they are used where the model attends with it; :meth:`check_model` tries one.
        self.mixed_steps = getattr(model.config, "_attn_implementation", None) == "sdpa"
        self._no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)  # a 4D mask: transformers builds none
        self.max_prefill_tokens: int | None = None  # prompt tokens per mixed step at most (None: whole prompts)
        self.prefilling: list[Sequence] = []  # prompts prefilled over several steps, in order; not rows yet
        self._partial: dict[int, tuple[int, dict]] = {}  # serial -> (prompt tokens done, per layer keys/values so far)

    # -- composition of the rows of one forward -------------------------------------------------------------
    def _live(self, seqs: list[Sequence]):
        """The composition for a forward of ``seqs`` (None: a decoder without adapters), checked usable."""
        if self.composition is None:
            if any(s.adapters for s in seqs):
                raise RuntimeError("A sequence asks for adapters but this decoder has no adapter pool.")
            return None
        if not self.composition.is_active:
            raise RuntimeError("BatchDecoder needs its LiveComposition active: run it inside `with decoder.composition.active():`.")
        return self.composition

    def _set_composition(self, seqs: list[Sequence]) -> None:
        if self._live(seqs) is None:
            return
        if any(s.adapters for s in seqs):
            self.composition.set_rows([(s.serial, s.adapters, s.adapter_w, s.mode) for s in seqs])
        else:  # a forward of base rows only: no hooks' work at all
            self.composition.set_base()

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache, all_logits: bool = False):
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                         logits_to_keep=0 if all_logits else 1)
        if all_logits:
            return out.logits[:, -1, :].float(), out.past_key_values, out.logits
        return out.logits[:, -1, :].float(), out.past_key_values

    # -- public API ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def add(self, seqs: list[Sequence]) -> None:
        """Prefill ``seqs`` together, pick their first tokens and merge them into the running batch."""
        if seqs:
            self._begin(seqs)
            self._prefill(seqs)

    def _prefill(self, seqs: list[Sequence]) -> None:
        length = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, length - len(s.prompt_ids):] = torch.as_tensor(s.prompt_ids, dtype=torch.long)
            mask[i, length - len(s.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        self._set_composition(seqs)
        cache = kv_cache(self.model)
        if any(s.prompt_logprobs is not None for s in seqs):
            logits, cache, every = self._forward(ids, mask, cache, all_logits=True)
            self._prompt_logprobs(seqs, every, length)
            del every
        else:
            logits, cache = self._forward(ids, mask, cache)
        tokens = self._pick(logits, seqs)
        for s in seqs:
            if s.max_new_tokens == 0:  # scoring only (echo with max_tokens 0): nothing is generated
                s.finish_reason = "length"
        self._merge(seqs, cache, mask, tokens)
        self._record(seqs, tokens, logits)

    @torch.inference_mode()
    def step(self, joining: list[Sequence] = ()) -> None:
        """One decoding step: every unfinished row gets its next token, and the ``joining`` sequences (new ones) are
        prefilled and get their first token (:meth:`add`'s result). Where :attr:`mixed_steps` allows, they are
        prefilled in the same forward (:class:`RaggedStep`; with no running rows, one unpadded prefill of them all),
        and with :attr:`max_prefill_tokens` a step takes at most that many prompt tokens: a longer prompt is prefilled
        over several steps (chunks), in arrival order, and its row joins the batch with its last chunk (until then it
        is in :attr:`prefilling`). Raises :class:`JoinFailed` when the joining rows' composition cannot be built (the
        running batch is untouched then)."""
        joining = list(joining)
        apart = [s for s in joining if s.prompt_logprobs is not None] if self.mixed_steps else joining
        packed = [s for s in joining if s.prompt_logprobs is None] if self.mixed_steps else []
        if packed or self.prefilling:
            self._mixed(packed)
        elif self.rows:
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
            self._set_composition(self.rows)
            logits, self.cache = self._forward(self.last[:, None], self.mask, self.cache)
            tokens = self._pick(logits, self.rows)
            self.last = tokens.to(self.device)
            self._record(self.rows, tokens, logits)
        if apart:  # rows that keep every prompt position's logits: a prefill of their own
            self._begin(apart)
            try:
                self._prefill(apart)
            except Exception as err:
                if any(s in self.rows for s in apart):  # failed after its merge: the running batch goes with it
                    raise
                self._forget(apart)
                raise JoinFailed(str(err)) from err

    def _mixed(self, joining: list[Sequence]) -> None:
        """:meth:`step` with joining rows (and the chunks of those still prefilling) in one packed forward."""
        b = len(self.rows)
        try:
            self._begin(joining)
            live = self._live(self.rows + joining)
            if live is not None:
                live.prepare([(s.serial, s.adapters, s.adapter_w, s.mode) for s in joining])
            self.prefilling.extend(joining)
            budget = self.max_prefill_tokens or sum(len(s.prompt_ids) for s in self.prefilling)
            taken: list[tuple[Sequence, int, int]] = []  # (sequence, prompt tokens done before, tokens now)
            for s in self.prefilling:
                done = self._partial[s.serial][0] if s.serial in self._partial else 0
                n = min(len(s.prompt_ids) - done, budget)
                if n <= 0:
                    break
                taken.append((s, done, n))
                budget -= n
            lengths = [n for _, _, n in taken]
            offsets = list(itertools.accumulate([b] + lengths[:-1]))
            if live is not None:
                live.set_ragged([(s.serial, s.adapters, s.adapter_w, s.mode) for s in self.rows],
                                [(s.serial, s.adapters, s.adapter_w, s.mode) for s, _, _ in taken], offsets, lengths)
        except Exception as err:
            self._forget(joining)
            self.prefilling = [s for s in self.prefilling if s not in joining]
            raise JoinFailed(str(err)) from err
        chunks = [Chunk(o, n, self._partial[s.serial][1] if done else None, done + n == len(s.prompt_ids))
                  for o, (s, done, n) in zip(offsets, taken)]
        prompts = torch.as_tensor([t for s, done, n in taken for t in s.prompt_ids[done:done + n]], dtype=torch.long)
        ids = torch.cat([self.last.cpu(), prompts]) if b else prompts
        arange = [torch.arange(done, done + n) for _, done, n in taken]
        pos = torch.cat([self.mask.sum(dim=1).cpu()] + arange) if b else torch.cat(arange)  # a running row's next position
        ending = [(s, c) for (s, _, _), c in zip(taken, chunks) if c.final]
        keep = torch.as_tensor(list(range(b)) + [c.offset + c.length - 1 for _, c in ending], dtype=torch.long)
        if b:
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        cache = self.cache if b else kv_cache(self.model)  # no running rows: a prefill of the joining ones, unpadded
        plan = RaggedStep(cache, b, self.mask if b else None, chunks)
        config = self.model.config
        usual = config._attn_implementation
        config._attn_implementation = RAGGED
        try:
            out = self.model(input_ids=ids[None].to(self.device), position_ids=pos[None].to(self.device),
                             attention_mask=self._no_mask, use_cache=False, logits_to_keep=keep.to(self.device),
                             ragged=plan)
        finally:
            config._attn_implementation = usual
        # (a failure above leaves the running rows' cache half written: the caller fails them, reset())
        for (s, done, n), c in zip(taken, chunks):
            if not c.final:
                self._partial[s.serial] = (done + n, c.kept)
        finished = [s for s, _ in ending]
        for s in finished:
            self._partial.pop(s.serial, None)
        self.prefilling = [s for s in self.prefilling if all(s is not f for f in finished)]
        if not b and not finished:  # only chunks of prompts that go on: no rows yet
            return
        logits = out.logits[0].float()  # [b + len(finished), V]
        tokens = self._pick(logits, self.rows + finished)
        for s in finished:
            if s.max_new_tokens == 0:
                s.finish_reason = "length"
        self.cache = cache
        width = cache.layers[0].length
        pad = torch.nn.functional.pad
        self.mask = torch.cat(([pad(self.mask, (width - self.mask.shape[1], 0))] if b else [])
                              + [pad(torch.ones(1, len(s.prompt_ids), dtype=torch.long, device=self.device),
                                     (width - len(s.prompt_ids), 0)) for s in finished])
        self.last = tokens.to(self.device)
        running = self.rows
        self.rows = running + finished
        self._record(running, tokens[:b], logits[:b])
        self._record(finished, tokens[b:], logits[b:])

    @torch.inference_mode()
    def drop(self, seqs) -> None:
        """Remove ``seqs`` from the batch (finished, cancelled or failed) and trim all-padding columns.

        The rows that stay keep the first places: each place left empty among them takes one of the last rows (its
        cache row copied once), so a row leaving costs one row's copy, not the whole cache's."""
        gone = {id(s) for s in seqs}
        self._forget(seqs)
        if self.prefilling:  # a prompt still being prefilled (a cancelled request): its chunks so far go
            for s in self.prefilling:
                if id(s) in gone:
                    self._partial.pop(s.serial, None)
            self.prefilling = [s for s in self.prefilling if id(s) not in gone]
        keep = [id(s) not in gone for s in self.rows]
        if all(keep):
            return
        if not any(keep):  # the batch is empty (prompts still being prefilled stay)
            self.rows, self.cache, self.mask, self.last = [], None, None, None
            return
        order, moves = compaction(keep)
        index = torch.as_tensor(order, dtype=torch.long, device=self.device)
        self.mask = self.mask.index_select(0, index)
        self.last = self.last.index_select(0, index)
        self.rows = [self.rows[i] for i in order]
        trim = int(self.mask.argmax(dim=1).min().item())  # leading columns that are padding in every row
        for layer in self.cache.layers:
            layer.move_rows(moves, len(order))
            if trim:
                layer.trim(trim)
        self.mask = self.mask[:, trim:]

    def reset(self) -> None:
        """Forget every row (after a failed forward the cache may be inconsistent)."""
        self._forget(self.rows + self.prefilling)
        self.rows, self.cache, self.mask, self.last = [], None, None, None
        self.prefilling, self._partial = [], {}

    def check_model(self) -> None:
        """Run a 2-token prefill and check that the model's cache can be merged (full attention)."""
        probe = Sequence(prompt_ids=[self.pad_id, self.pad_id], max_new_tokens=1)
        self.add([probe])
        self.reset()
        if not self.mixed_steps:
            return
        # A mixed step needs the model's attention layers to call the attention function with the forward's keywords
        # (all of transformers' own models do); a model that does not keeps separate prefills.
        alone = Sequence(prompt_ids=[self.pad_id] * 3, max_new_tokens=1)
        self.add([alone])
        self.reset()
        joined = Sequence(prompt_ids=[self.pad_id] * 3, max_new_tokens=1)
        cap, self.max_prefill_tokens = self.max_prefill_tokens, None
        try:
            self.add([Sequence(prompt_ids=[self.pad_id, self.pad_id], max_new_tokens=2)])
            self.step([joined])
            ok = joined.generated == alone.generated and all(layer.rows == 2 for layer in self.cache.layers)
            problem = "its first token differs from a separate prefill's"
        except Exception as err:  # noqa: BLE001 -- any failure means: no mixed steps for this model
            ok, problem = False, f"{type(err).__name__}: {err}"
        finally:
            self.reset()
            self.max_prefill_tokens = cap
        if not ok:
            logger.warning("Mixed decoding steps are off for this model (a probe failed: %s); joining requests are "
                           "prefilled apart from the running batch's step.", problem)
            self.mixed_steps = False

    def generate(self, seqs: list[Sequence]) -> list[Sequence]:
        """Decode ``seqs`` as one batch until every row has finished (greedy rows: what ``model.generate`` gives
        them); finished rows leave the batch after each step. The decoder must hold no other rows."""
        if self.rows:
            raise RuntimeError("BatchDecoder.generate runs a batch of its own; this decoder already holds rows.")
        try:
            self.add(seqs)
            self.drop([s for s in self.rows if s.finished])
            while self.rows:
                self.step()
                self.drop([s for s in self.rows if s.finished])
        finally:
            self.reset()
        return seqs

    # -- internals -----------------------------------------------------------------------------------------
    def _forget(self, seqs: list[Sequence]) -> None:
        if self.composition is not None:
            self.composition.forget([s.serial for s in seqs])

    def _begin(self, seqs: list[Sequence]) -> None:
        """A serial (and a seeded generator for sampled rows) for sequences entering the batch."""
        for s in seqs:
            s.serial = next(self._serials)
            if s.sampling.temperature > 0 and s.generator is None:
                s.generator = torch.Generator(device="cpu")
                s.generator.manual_seed(s.sampling.seed if s.sampling.seed is not None else int(torch.randint(0, 2**62, ()).item()))

    def _merge(self, seqs, cache, mask, tokens) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask, self.last = list(seqs), cache, mask, tokens.to(self.device)
            return
        t_run, t_new = self.mask.shape[1], mask.shape[1]
        length = max(t_run, t_new)
        for run_layer, new_layer in zip(self.cache.layers, cache.layers):
            run_layer.append_rows(new_layer.keys, new_layer.values)
        pad = torch.nn.functional.pad  # the masks, left-padded to ``length`` columns
        self.mask = torch.cat([pad(self.mask, (length - t_run, 0)), pad(mask, (length - t_new, 0))], 0)
        self.last = torch.cat([self.last, tokens.to(self.device)], 0)
        self.rows = self.rows + list(seqs)

    @staticmethod
    def _pick(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Next token per row from logits [b, V]: argmax, or a sample from the tempered, nucleus-cut softmax."""
        tokens = logits.argmax(dim=-1).cpu()
        for i, s in enumerate(seqs):
            if s.sampling.temperature <= 0:
                continue
            probs = torch.softmax(logits[i].cpu() / s.sampling.temperature, dim=-1)
            if s.sampling.top_p < 1.0:
                sorted_p, order = torch.sort(probs, descending=True)
                keep = sorted_p.cumsum(0) - sorted_p < s.sampling.top_p  # the smallest prefix whose mass reaches top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            tokens[i] = torch.multinomial(probs, 1, generator=s.generator)[0]
        return tokens

    @staticmethod
    def _top(lp: torch.Tensor, n: int) -> list[tuple[int, float]]:
        if n <= 0:
            return []
        values, ids = torch.topk(lp, n)
        return list(zip(ids.tolist(), values.tolist()))

    def _prompt_logprobs(self, seqs: list[Sequence], every: torch.Tensor, length: int) -> None:
        """Prompt-token logprobs of the rows that ask for them, from the prefill's logits [b, T, V] (left-padded)."""
        for i, s in enumerate(seqs):
            if s.prompt_logprobs is None:
                continue
            n = len(s.prompt_ids)
            lp = torch.log_softmax(every[i, length - n:length - 1].float(), dim=-1)  # position c predicts token c + 1
            targets = torch.as_tensor(s.prompt_ids[1:], dtype=torch.long, device=lp.device)
            chosen = lp.gather(1, targets[:, None])[:, 0].tolist() if n > 1 else []
            s.prompt_token_logprobs = [None] + chosen
            s.prompt_top_logprobs = [None] + [self._top(lp[c], s.prompt_logprobs) for c in range(n - 1)]

    def _record(self, seqs: list[Sequence], tokens: torch.Tensor, logits: torch.Tensor | None = None) -> None:
        for i, (s, t) in enumerate(zip(seqs, tokens.tolist())):
            if s.finished:
                continue
            if t in self.eos_ids and not s.ignore_eos:
                s.finish_reason = "stop"
                if s.logprobs is None:
                    self._final_text(s)
                    continue
                # with logprobs the end-of-sequence token is an output token too, as vLLM returns it (its text is "")
            if s.logprobs is not None and logits is not None:
                lp = torch.log_softmax(logits[i].float(), dim=-1)  # the raw distribution, before temperature / top-p
                s.token_logprobs.append(float(lp[t]))
                s.top_logprobs.append(self._top(lp, s.logprobs))
            s.generated.append(t)
            if s.finished:
                self._final_text(s)
                continue
            if self.live_text or s.stop:
                with self.lock:
                    s.text = self.tokenizer.decode(s.generated, skip_special_tokens=True)
            cut = min((s.text.find(x) for x in s.stop if x and x in s.text), default=-1)
            if cut >= 0:
                s.text = s.text[:cut]
                s.finish_reason = "stop"
            elif len(s.generated) >= s.max_new_tokens:
                s.finish_reason = "length"
            elif self.context_length is not None and len(s.prompt_ids) + len(s.generated) >= self.context_length:
                s.finish_reason = "length"
            if s.finished:
                self._final_text(s)

    def _final_text(self, s: Sequence) -> None:
        if not self.live_text and not s.stop:
            with self.lock:
                s.text = self.tokenizer.decode(s.generated, skip_special_tokens=True)
