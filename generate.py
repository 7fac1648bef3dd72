"""Generate for a person: one prompt, or an interactive loop, with retrieved or named LoRAs.

    python generate.py --prompt "Is this sarcastic? ..."                     # retrieve top-3, mixture
    python generate.py --prompt "..." --eval_type fusion --lora_num 2
    python generate.py --prompt "..." --adapters snarks=0.7,winowhy=0.8     # named adapters and weights
    python generate.py --prompt "..." --eval_type lorauter                 # through the nearest tasks (LoRAuter)
    python generate.py                                                     # interactive: one prompt per line

Retrieval shows the chosen adapters with their similarity and weight. Named adapters are applied with
the weights as given (not renormalised), as multi-LoRA servers do. Same models, pool and composition
code as main.py; the pool is loaded once for the whole session.
"""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger("generate")


def parse_adapters(spec: str) -> list[tuple[str, float]]:
    """``"a=0.7,b=0.3"`` -> [("a", 0.7), ("b", 0.3)]; a bare name gets weight 1."""
    from utils.data import InputError

    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, _, weight = part.partition("=")
        try:
            out.append((name.strip(), float(weight) if weight else 1.0))
        except ValueError as err:
            raise InputError(f"--adapters: weight {weight!r} of {name!r} is not a number; write name=0.7,other=0.3.") from err
    if not out:
        raise InputError("--adapters is empty; write name=0.7,other=0.3.")
    return out


class Generator:
    """Models, pool and retriever loaded once; :meth:`answer` handles one prompt."""

    def __init__(self, args):
        from utils.data import load_pool_config
        from utils.pool import build_pool
        from utils.prompter import Prompter
        from utils.session import Session

        self.args = args
        self.prompter = Prompter(args.template)
        self.pool_entries = [] if args.no_adapters else load_pool_config(args.config_path, args.adapter_pattern)
        session = Session()
        self.tokenizer, self.model = session.base(args.base_model, args.dtype, args.device, None, args.linear_kernels)
        self.loras = build_pool(session, self.pool_entries, args, device=args.device, retrieval=not args.adapters)
        self.pool, self.router = self.loras.adapters, self.loras.router
        if args.eval_type == "lorauter" and not args.adapters and self.pool is not None:
            from utils.retrieval import embedding_cache_dir
            from utils.task_scores import build_task_index

            self.router.tasks, _, _ = build_task_index(session, self.pool_entries, args, self.pool, self.tokenizer, self.prompter,
                                                       args.device, embedding_cache_dir(args.embedding_cache))
        self.named = parse_adapters(args.adapters) if args.adapters else None
        if self.named and self.pool is not None:
            self.pool.indices([[n for n, _ in self.named]])  # unknown names fail here, before any prompt

    def answer(self, text: str) -> tuple[str, list[tuple[str, float | None, float]]]:
        """(response, [(adapter, similarity or None, weight)])."""
        from utils.composition import LiveComposition
        from utils.generation import generate_batch
        from utils.routing import Route

        prompt = self.prompter.generate_prompt(text)
        if self.pool is None:
            out, _ = generate_batch(self.model, self.tokenizer, [prompt], self.args.max_new_tokens)
            return out[0], []
        a = self.args
        if self.named:
            route = Route("mix", mix=tuple(self.named), mode="mixture" if a.eval_type == "lorauter" else a.eval_type)
        elif a.eval_type == "lorauter":
            route = Route("lorauter", k=a.lorauter_k, temperature=a.lorauter_temperature)
        else:
            route = Route("auto", k=a.lora_num, weighting=a.weighting, temperature=a.temperature, mode=a.eval_type)
        routing = self.router.route([text], [route])
        names, weights = routing.adapters[0], routing.weights[0]
        live = LiveComposition(self.pool)
        with live.active() as model:
            out, _ = generate_batch(model, self.tokenizer, [prompt], self.args.max_new_tokens, composition=live,
                                    compositions=[(names, weights, routing.modes[0])])
        return out[0], list(zip(names, routing.similarities[0] or [None] * len(names), weights))


def show(response: str, used) -> str:
    lines = []
    if used:
        lines.append("adapters: " + ", ".join(
            f"{n} (similarity {s:.3f}, weight {w:.3f})" if s is not None else f"{n} (weight {w:.3f})" for n, s, w in used))
    lines.append(response)
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    from utils import flags

    p = argparse.ArgumentParser(description=__doc__, formatter_class=flags.HelpFormatter)
    p.add_argument("--prompt", default=None, help="the instruction to answer (default: read prompts from stdin, one per line)")
    p.add_argument("--adapters", default=None, help="named adapters and weights, e.g. snarks=0.7,winowhy=0.8 (default: retrieve)")
    p.add_argument("--no_adapters", action="store_true", help="the base model alone (no pool, no retrieval)")
    flags.add_composition_flags(p, ("mixture", "fusion", "lorauter"))
    flags.add_task_routing_flags(p)
    flags.add_model_flags(p)
    flags.add_pool_flags(p)
    flags.add_retrieval_flags(p)
    flags.add_prompt_flags(p, max_new_tokens=64)
    flags.add_settings_flag(p)
    flags.add_deprecated_alias(p, "--no_adapter", "--no_adapters")
    return p


def main(argv=None) -> int:
    from utils.data import InputError
    from utils.flags import MAIN_ONLY_KEYS, check_shared, default_dtype, parse_with_settings, resolve_device

    p = build_parser()
    try:
        # a profile written for main.py may carry its run flags; they mean nothing here
        args = parse_with_settings(p, argv, ignore_keys=MAIN_ONLY_KEYS)
    except InputError as err:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        logger.error("%s", err)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_shared(args)
        args.device = resolve_device(args.device)
        args.dtype = args.dtype or default_dtype(args.device)
        gen = Generator(args)
        prompts = [args.prompt] if args.prompt is not None else None
        if prompts is not None:
            sys.stdout.write(show(*gen.answer(prompts[0])))
            return 0
        if sys.stdin.isatty():
            sys.stderr.write("Type a prompt and press Enter (Ctrl-D to quit).\n")
        for line in sys.stdin:
            if line.strip():
                sys.stdout.write(show(*gen.answer(line.rstrip("\n"))))
                sys.stdout.flush()
    except InputError as err:
        logger.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
