"""Tiny in-process models, tokenizers and LoRAs for fast CPU tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Response: OPTIONS: - negative - positive - yes - no - entailment - neutral - contradiction",
    "How would the sentiment of this sentence be perceived? The movie was great and the actors were wonderful.",
    "Translate to French: the cat sits on the mat. Summarize the text. Question: who wrote the book? Answer:",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}-_/\\@#$%^&*+=<>|~`",
]


def make_tokenizer(save_dir: Path | None = None):
    """A small byte-level BPE tokenizer trained in-process, with eos/pad tokens and left padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", padding_side="left")
    if save_dir is not None:
        fast.save_pretrained(save_dir)
    return fast


def make_tiny_llama(save_dir: Path | None = None, vocab_size: int = 400, seed: int = 0):
    """A 2-layer Llama with hidden size 16 (random weights, fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=None, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    if save_dir is not None:
        model.save_pretrained(save_dir)
    return model


def make_lora(base_dir: Path, out_dir: Path, r: int = 4, alpha: int = 8, targets=("q_proj", "v_proj"), seed: int = 1,
              use_rslora: bool = False, scale: float = 3.0) -> Path:
    """A non-trivial LoRA (``init_lora_weights=False``) saved as a standard PEFT directory."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, lora_dropout=0.0,
                     use_rslora=use_rslora, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    with torch.no_grad():  # make the deltas large enough to change outputs clearly
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(scale)
    model.save_pretrained(out_dir)
    return Path(out_dir)


class FakeEmbedder:
    """Deterministic bag-of-words embedder with the :class:`utils.retrieval.Embedder` interface."""

    def __init__(self, dim: int = 64):
        self.dim = dim
        self.calls = 0

    def encode(self, texts, show_progress=False):
        self.calls += 1
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, hash_word(w) % self.dim] += 1.0
            n = np.linalg.norm(out[i])
            out[i] /= n if n else 1.0
        return out


def hash_word(w: str) -> int:
    h = 0
    for c in w.encode():
        h = (h * 131 + c) % 1_000_003
    return h


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    return path


def make_smollm_pool(d: Path, names=("snarks", "winowhy", "qa_wikidata")) -> Path:
    """r=4 LoRAs on the embedded SmolLM2 (``init_lora_weights=False``, lora_B scaled down: not trained, not no-ops),
    and a pool config with the embedded suite's entries (domains and samples) pointing at them."""
    from peft import LoraConfig, get_peft_model

    from utils.model_loading import load_base_model

    for i, name in enumerate(names):
        base = load_base_model("embedded:smollm2-135m-instruct")
        torch.manual_seed(i)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.05)
        model.save_pretrained(d / name)
    suite = json.loads((Path(__file__).resolve().parent.parent / "config" / "bigbench_pool.json").read_text())
    pool = [dict(e, path=str(d / e["model_name"])) for e in suite if e["model_name"] in names]
    return write_json(d / "pool.json", pool)


# A heterogeneous pool on the embedded SmolLM2: ranks, scalings (rsLoRA too) and target modules differ.
HETERO_LORAS = {
    "snarks": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "winowhy": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "qa_wikidata": dict(r=8, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]),
    "sports_understanding": dict(r=4, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "e2e_nlg": dict(r=8, lora_alpha=32, target_modules=["q_proj", "o_proj", "down_proj"]),
}


def make_hetero_smollm_pool(d: Path, scale: float = 0.05) -> Path:
    """:data:`HETERO_LORAS` on the embedded SmolLM2 (random factors, lora_B scaled by ``scale``), with the suite's
    cards for those tasks; returns the pool config."""
    from peft import LoraConfig, get_peft_model

    from utils.model_loading import load_base_model

    for i, (name, cfg) in enumerate(HETERO_LORAS.items()):
        if (d / name / "adapter_config.json").exists():
            continue
        base = load_base_model("embedded:smollm2-135m-instruct")
        torch.manual_seed(100 + i)
        model = get_peft_model(base, LoraConfig(init_lora_weights=False, **cfg))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.mul_(scale)
        model.save_pretrained(d / name)
    suite = json.loads((Path(__file__).resolve().parent.parent / "config" / "bigbench_pool.json").read_text())
    pool = [dict(e, path=str(d / e["model_name"])) for e in suite if e["model_name"] in HETERO_LORAS]
    return write_json(d / "pool.json", pool)


SERVE_TASKS = {
    "alpha": ("sentiment", ["the movie was great", "the actors were wonderful", "a great and wonderful film"]),
    "beta": ("translation", ["translate to french: the cat", "translate to french: the book", "translate to french: the mat"]),
    "gamma": ("closed_book QA", ["question: who wrote the book? answer:", "question: who sits on the mat?", "question: who is the cat?"]),
}


def tiny_engine(tiny_base, tiny_loras, d: Path, *extra: str):
    """A server :class:`Engine` over the tiny model and the three tiny LoRAs with carded samples, scheduler not started."""
    import serve as serve_mod
    from utils.serving.serving_engine import load_engine

    pool = [{"model_name": n, "domain": dom, "sample": [{"inputs": s, "targets": "x"} for s in ss], "path": str(tiny_loras[n])}
            for n, (dom, ss) in SERVE_TASKS.items()]
    args = serve_mod.build_parser().parse_args(
        ["--base_model", str(tiny_base), "--config_path", str(write_json(d / "pool.json", pool)), "--device", "cpu",
         "--max_new_tokens", "6", "--max_wait_ms", "30", "--max_tokens_cap", "64", *extra])
    serve_mod.validate(args)
    return load_engine(args)
