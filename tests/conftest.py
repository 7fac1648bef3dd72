import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """Directory holding a tiny Llama and its tokenizer."""
    from tests.helpers import make_tiny_llama, make_tokenizer

    d = tmp_path_factory.mktemp("tiny_base")
    tok = make_tokenizer(d)
    make_tiny_llama(d, vocab_size=len(tok))
    return d


@pytest.fixture(scope="session")
def tiny_loras(tiny_base, tmp_path_factory):
    """Three LoRAs on the tiny model with different ranks, alphas and targets."""
    from tests.helpers import make_lora

    d = tmp_path_factory.mktemp("tiny_loras")
    return {
        "alpha": make_lora(tiny_base, d / "alpha", r=4, alpha=8, seed=1),
        "beta": make_lora(tiny_base, d / "beta", r=2, alpha=16, seed=2, targets=("q_proj", "v_proj", "o_proj")),
        "gamma": make_lora(tiny_base, d / "gamma", r=8, alpha=4, seed=3, targets=("v_proj", "down_proj")),
    }


@pytest.fixture(scope="session")
def equal_loras(tiny_base, tmp_path_factory):
    """Three LoRAs of one rank and one set of targets (what PEFT's Arrow can route over), and a fourth, general one."""
    from tests.helpers import make_lora

    d = tmp_path_factory.mktemp("equal_loras")
    return {name: make_lora(tiny_base, d / name, r=4, alpha=8, seed=seed)
            for name, seed in (("alpha", 11), ("beta", 12), ("gamma", 13), ("general", 14))}
