"""Command-line flags shared by the entry points (``main.py``, ``generate.py``, ``serve.py``).

Each entry point builds its own ``argparse`` parser and adds the groups it needs from here, so that a flag
such as ``--lora_num`` or ``--base_model`` has one name, one default and one help text everywhere, and a
settings file (``--settings config/paper_llama2_7b.json``) means the same thing to every entry point.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from utils.data import InputError

DEFAULT_BASE_MODEL = "embedded:smollm2-135m-instruct"
DEFAULT_RETRIEVER = "embedded:all-minilm-l6-v2"
DEFAULT_POOL = "config/bigbench_pool.json"
PAPER_INSTRUCTION = "Represent the sentence for similar task retrieval: "
DTYPE_CHOICES = ("float32", "float16", "bfloat16")
LINEAR_KERNEL_CHOICES = ("auto", "onednn", "torch")  # utils/linear_kernels.py
ENGINES = ("local", "vllm")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the --max-lora-rank values vLLM accepts
# Settings-file keys that only main.py (an evaluation run) has flags for: a profile such as config/embedded.json
# may carry them, and generate.py / serve.py read the same profile without them.
MAIN_ONLY_KEYS = ("batch_size", "data_path", "res_path", "max_input_tokens", "limit", "seed", "device_map", "ood",
                  "best_selection", "runs", "res_dir", "force", "no_resume", "soup", "arrow_top_k", "arrow_temperature",
                  "arrow_general_adapters", "lorahub_scope", "lorahub_examples", "lorahub_budget", "lorahub_candidates",
                  "lorahub_optimizer", "lorahub_l1", "lorahub_dtype")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` of every entry point: the description's examples keep their line breaks, and each flag shows its default.

    A flag whose help already names its default (``(default: ...)``), or whose default is unset or off, is left as written.
    """

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.default in (None, False, argparse.SUPPRESS) or "default" in text
                or action.help == argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


class _DeprecatedAlias(argparse.Action):
    """An old spelling of a flag: it sets the new flag's value and logs a one-line deprecation warning."""

    def __init__(self, option_strings, dest, target: argparse.Action = None, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.target = target
        self.warned = False  # a parser may parse the same command line twice (settings files): one warning

    def __call__(self, parser, namespace, values, option_string=None):
        import logging

        new = self.target.option_strings[-1]
        if not self.warned:
            logging.getLogger("flags").warning("%s is deprecated and will be removed; use %s, which means the same.",
                                               option_string, new)
            self.warned = True
        self.target(parser, namespace, values, new)


def add_deprecated_alias(p: argparse.ArgumentParser, old: str, new: str) -> None:
    """Keep ``old`` working as an alias of the existing flag ``new`` (hidden from ``--help``; docs/cli.md lists it)."""
    target = next((a for a in p._actions if new in a.option_strings), None)
    if target is None:
        raise ValueError(f"add_deprecated_alias: {new} is not a flag of this parser; add it before its alias {old}.")
    p.add_argument(old, action=_DeprecatedAlias, target=target, dest=target.dest, nargs=target.nargs, type=target.type,
                   choices=target.choices, metavar=target.metavar, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def deprecated_aliases(p: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """(old, new) spellings of ``p``'s deprecated aliases."""
    return [(a.option_strings[0], a.target.option_strings[-1]) for a in p._actions if isinstance(a, _DeprecatedAlias)]


def add_model_flags(p: argparse.ArgumentParser, device_default: str | None = None) -> None:
    """--base_model, --device, --dtype, --linear_kernels."""
    p.add_argument("--base_model", default=DEFAULT_BASE_MODEL, help="causal LM: hub id, local dir or embedded:NAME")
    p.add_argument("--device", default=device_default, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--linear_kernels", default="auto", choices=LINEAR_KERNEL_CHOICES,
                   help="CPU kernel of the linear layers: onednn multiplies from weights packed once at load, q/k/v and "
                        "gate/up each as one product (faster; as much memory again as the linears' weights), torch is "
                        "PyTorch's F.linear; auto: onednn where it fits in a quarter of the available memory "
                        "(docs/benchmarks.md)")


def add_pool_flags(p: argparse.ArgumentParser) -> None:
    """--config_path, --adapter_pattern, --max_loras, --max_cpu_loras, --eager_load."""
    p.add_argument("--config_path", default=DEFAULT_POOL, help="LoRA pool config: JSON list of {model_name, domain, sample, path?}")
    p.add_argument("--adapter_pattern", default=None,
                   help="adapter location for pool entries without 'path', e.g. loras/{name} or a hub pattern owner/prefix-{name}")
    p.add_argument("--max_loras", type=int, default=64,
                   help="adapters resident on the compute device at most (a batch is formed to use at most this many; as vLLM's --max-loras)")
    p.add_argument("--max_cpu_loras", type=int, default=None,
                   help="adapters kept in host memory at most, least recently used evicted first (default: --max_loras, as vLLM's "
                        "--max-cpu-loras); the rest are read from disk when retrieved again")
    p.add_argument("--eager_load", action="store_true",
                   help="read every adapter at start-up to check the whole pool (default: each one when it is first retrieved)")


def add_retrieval_flags(p: argparse.ArgumentParser) -> None:
    """--retriever, --instruction, --exclude_prompt_from_pooling, --adapter_vector, --embedding_cache."""
    p.add_argument("--retriever", default=DEFAULT_RETRIEVER, help="sentence-transformers model: id, local dir or embedded:NAME")
    p.add_argument("--instruction", default=PAPER_INSTRUCTION, help="retrieval instruction given as the embedding prompt")
    p.add_argument("--exclude_prompt_from_pooling", default="auto", choices=("auto", "yes", "no"),
                   help="INSTRUCTOR-style pooling without the instruction tokens (auto: for ids naming instructor/lora_retriever)")
    p.add_argument("--adapter_vector", default="normalized_mean", choices=("normalized_mean", "mean"),
                   help="an adapter's vector: the normalised mean of its sample embeddings (cosine), or their plain mean "
                        "(the paper's code, whose norm favours adapters with tightly clustered samples)")
    p.add_argument("--embedding_cache", default=None,
                   help="folder caching embeddings across runs (default: <cache>/embeddings; 'none' disables)")


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """--engine and the vLLM engine's flags (:mod:`utils.vllm_engine`)."""
    g = p.add_argument_group("generation engine: this process (local) or a vLLM server (vllm)")
    a = g.add_argument
    a("--engine", default="local", choices=ENGINES,
      help="local: generate in this process; vllm: route and compose here, generate on the vLLM server at --vllm_url")
    a("--vllm_url", action="append", default=None,
      help="a vLLM server (default http://127.0.0.1:8100; bench/start_vllm.sh starts one for a pool); repeat it for several "
           "servers: each composition always goes to the same one (adapter affinity)")
    a("--vllm_api_key", default=None, help="vLLM's --api-key, if it has one (default: $VLLM_API_KEY)")
    a("--vllm_model", default=None, help="the name vLLM serves the base model under (default: the first base model it lists)")
    a("--vllm_max_lora_rank", type=int, default=32,
      help="vLLM's --max-lora-rank: compositions of higher rank are refused (a mixture's rank is the sum of its adapters' ranks; "
           "3 adapters of rank 8 need 32)")
    a("--vllm_timeout", type=float, default=300.0, help="seconds a request waits for vLLM's next output before it fails (503)")
    a("--composed_dir", default=None,
      help="where compositions are written as PEFT adapters for vLLM (default: <cache>/composed/<base model>)")
    a("--max_composed", type=int, default=256,
      help="compositions kept registered with vLLM at most; past it the least recently used one not in use is unloaded")


def check_engine(args) -> None:
    """Ranges of the engine flags (before any model loads)."""
    if getattr(args, "engine", "local") != "vllm":
        return
    if args.vllm_max_lora_rank not in VLLM_RANKS:
        raise InputError(f"--vllm_max_lora_rank {args.vllm_max_lora_rank} is not a rank vLLM accepts ({', '.join(map(str, VLLM_RANKS))}); "
                         "give the --max-lora-rank the vLLM server was started with.")
    if args.max_composed < 1:
        raise InputError(f"--max_composed must be at least 1 (got {args.max_composed}).")
    if args.vllm_timeout <= 0:
        raise InputError(f"--vllm_timeout must be above 0 (got {args.vllm_timeout}).")
    args.vllm_url = list(args.vllm_url or ["http://127.0.0.1:8100"])
    for url in args.vllm_url:
        if not str(url).startswith(("http://", "https://")):
            raise InputError(f"--vllm_url {url!r} must start with http:// or https://, e.g. http://127.0.0.1:8100.")
    if args.vllm_api_key is None:
        import os

        args.vllm_api_key = os.environ.get("VLLM_API_KEY") or None


def add_composition_flags(p: argparse.ArgumentParser, eval_types: tuple[str, ...]) -> None:
    """--eval_type, --lora_num, --weighting, --temperature."""
    extra = {"base": "base (no adapter)", "soup": "soup (Adapter Soup)", "arrow": "arrow (PEFT's Arrow)", "lorahub": "lorahub (LoraHub)",
             "lorauter": "lorauter (routing through tasks)"}
    others = [extra[t] for t in eval_types if t in extra]
    p.add_argument("--eval_type", default="mixture", choices=eval_types,
                   help="mixture / fusion of the top-k adapters" + (f"; or {', '.join(others)}" if others else ""))
    p.add_argument("--lora_num", type=int, default=3, help="k, the number of adapters retrieved per input (1 = selection)")
    p.add_argument("--weighting", default="uniform", choices=("uniform", "softmax"),
                   help="composition weights: uniform 1/k (paper) or softmax of similarities")
    p.add_argument("--temperature", type=float, default=0.1, help="softmax temperature for --weighting softmax (> 0)")


def add_task_routing_flags(p: argparse.ArgumentParser) -> None:
    """LoRAuter's flags: the task library, its scoring and the routing's K and temperature."""
    g = p.add_argument_group("routing through tasks (LoRAuter, --eval_type lorauter)")
    a = g.add_argument
    a("--task_library", default=None, metavar="FILE",
      help="more tasks (JSON list of {name, domain, metric, rows: [{inputs, targets}]}) beside the pool entries' cards")
    a("--lorauter_k", type=int, default=3, help="tasks each input is routed through (K)")
    a("--lorauter_temperature", type=float, default=0.2, help="softmax temperature over the K tasks' similarities (tau)")
    a("--task_scorer", default="loglik", choices=("loglik", "metric"),
      help="how an adapter is scored on a task: mean log-likelihood of the targets (one forward per row), or the task's "
           "metric on greedy answers")
    a("--task_search", default="halving", choices=("halving", "full"),
      help="score every adapter on every row of every task (full), or narrow the candidates by successive halving")
    a("--task_rows", type=int, default=None, help="validation rows per task scored at most (default: all)")
    a("--task_candidates", type=int, default=0,
      help="narrow each task's candidates by embedding first: the N adapters whose cards embed nearest to the task, plus "
           "every adapter without a card (0: every adapter is a candidate)")
    a("--task_scores", default=None, metavar="FILE",
      help="the score cache (default: <cache>/task_scores.json; 'none': no cache)")


def add_prompt_flags(p: argparse.ArgumentParser, max_new_tokens: int = 50) -> None:
    """--template, --max_new_tokens."""
    p.add_argument("--template", default="alpaca", help="prompt template name under templates/ or a .json path")
    p.add_argument("--max_new_tokens", type=int, default=max_new_tokens, help="tokens generated per input (greedy)")


def add_settings_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--settings", default=None,
                   help="JSON or YAML file of flag defaults (e.g. config/paper_llama2_7b.json); flags override it")


def parse_with_settings(parser: argparse.ArgumentParser, argv: list[str] | None = None,
                        ignore_keys: tuple[str, ...] = ()) -> argparse.Namespace:
    """Parse ``argv`` with defaults from ``--settings FILE`` when given; unknown flags and keys are errors.

    ``ignore_keys`` are settings-file keys this entry point accepts but has no flag for (a profile written for
    ``main.py`` carries ``batch_size``, which the server does not use).
    """
    pre, _ = parser.parse_known_args(argv)
    if getattr(pre, "settings", None):
        values = read_settings_file(pre.settings, parser, ignore_keys)
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def read_settings_file(path: str, parser: argparse.ArgumentParser, ignore_keys: tuple[str, ...] = ()) -> dict:
    """The flag defaults of a JSON or YAML settings file (keys are flag names without dashes; ``_...`` keys are comments)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"Settings file {path} does not exist; see config/ for examples.")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"Settings file {path} is not UTF-8 text (byte {err.start}); re-save it as UTF-8.") from err
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as err:  # json.JSONDecodeError or yaml.YAMLError: both are syntax errors of the file
        raise InputError(f"Settings file {path} is not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'JSON'} "
                         f"({str(err).splitlines()[0]}); fix its syntax.") from err
    if not isinstance(values, dict):
        raise InputError(f"Settings file {path} holds a {type(values).__name__}, not an object of flag names and values.")
    actions = {action.dest: action for action in parser._actions}
    unknown = sorted(str(k) for k in set(values) - set(actions) - set(ignore_keys) if not str(k).startswith("_"))
    if unknown:
        raise InputError(f"Settings file {path} has unknown keys {unknown}; use flag names without dashes.")
    out = {}
    for key, value in values.items():
        if str(key).startswith("_") or key not in actions:
            continue
        out[key] = _checked_value(actions[key], value, f"Settings file {path}: {key!r}")
    return out


def _checked_value(action: argparse.Action, value, where: str):
    """A settings-file value checked against its flag's type and choices (a file cannot bypass the parser's checks)."""
    if value is None:
        if action.default is None:
            return None  # the flag's own "not given"
        raise InputError(f"{where} cannot be null; give a value or leave the key out (default {action.default!r}).")
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise InputError(f"{where} must be true or false (got {value!r}).")
        return value
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        if not isinstance(value, list):
            raise InputError(f"{where} must be a list (got a {type(value).__name__}).")
        return [_checked_scalar(action, v, where) for v in value]
    return _checked_scalar(action, value, where)


def _checked_scalar(action: argparse.Action, value, where: str):
    kind = action.type
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        raise InputError(f"{where} must be a {getattr(kind, '__name__', 'string')} (got {value!r}).")
    if kind in (int, float):
        if isinstance(value, str):
            try:
                value = kind(value)
            except ValueError:
                raise InputError(f"{where} must be a number (got {value!r}).") from None
        if not isinstance(value, (int, float)) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise InputError(f"{where} must be a{'n integer' if kind is int else ' number'} (got {value!r}).")
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{where} must be a finite number (got {value!r}).")
        value = kind(value)
    elif not isinstance(value, str):
        raise InputError(f"{where} must be a string (got {value!r}).")
    if action.choices is not None and value not in action.choices:
        raise InputError(f"{where} must be one of {', '.join(map(str, action.choices))} (got {value!r}).")
    return value


def check_pool_tiers(args) -> None:
    """--max_loras / --max_cpu_loras against each other and against --lora_num."""
    if args.max_loras < 1:
        raise InputError(f"--max_loras must be at least 1 (got {args.max_loras}).")
    if args.max_cpu_loras is not None and args.max_cpu_loras < args.max_loras:
        raise InputError(f"--max_cpu_loras {args.max_cpu_loras} is below --max_loras {args.max_loras}; the host tier holds the "
                         "device tier, so raise --max_cpu_loras or lower --max_loras.")
    k = getattr(args, "lora_num", 1)
    if k > args.max_loras:
        raise InputError(f"--max_loras {args.max_loras} is below --lora_num {k}: one input's adapters must fit on the device "
                         f"together; raise --max_loras to at least {k}.")


def check_shared(args: argparse.Namespace) -> None:
    """Range checks of the composition and prompt flags every entry point shares (before any model loads)."""
    if args.lora_num < 1:
        raise InputError(f"--lora_num must be at least 1 (got {args.lora_num}).")
    if args.max_new_tokens < 1:
        raise InputError(f"--max_new_tokens must be at least 1 (got {args.max_new_tokens}).")
    if args.temperature <= 0:
        raise InputError(f"--temperature must be above 0 (got {args.temperature}); a negative temperature would invert the ranking "
                         "(the least similar adapter would weigh most).")
    if hasattr(args, "max_loras"):
        check_pool_tiers(args)
    check_engine(args)


def default_dtype(device: str) -> str:
    """The model dtype when --dtype is not given: bfloat16 on a GPU, float32 elsewhere."""
    return "bfloat16" if device.startswith("cuda") else "float32"


def resolve_device(device: str | None) -> str:
    """The torch device to use: ``device`` checked against what this machine has, or cuda when there is one.

    An unknown name (``tpu9``) or a device this machine lacks (``cuda`` without a GPU) is an :class:`InputError`
    naming what is available, raised before any model loads.
    """
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise InputError(f"--device {device!r} is not a device name ({str(err).splitlines()[0]}); use cpu, cuda, cuda:N or mps.") from err
    if dev.type == "cpu":
        return device
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise InputError(f"--device {device}: this machine has no usable CUDA GPU; use --device cpu.")
        if dev.index is not None and dev.index >= n:
            raise InputError(f"--device {device}: this machine has {n} CUDA GPU(s) (cuda:0 to cuda:{n - 1}); pick one of them.")
        return device
    if dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise InputError(f"--device {device}: MPS is not available on this machine; use --device cpu.")
        return device
    raise InputError(f"--device {device}: {dev.type} devices are not supported here; use cpu, cuda, cuda:N or mps.")
