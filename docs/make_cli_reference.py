"""Write docs/cli.md, the command-line reference, from the entry points' own argument parsers.

    python docs/make_cli_reference.py            # rewrite docs/cli.md
    python docs/make_cli_reference.py --check    # exit 1 when docs/cli.md differs from what the parsers say

Each entry point has a ``build_parser()``; this script imports it, reads every flag's spelling, default, choices and
help, and writes one section per entry. Paths inside the checkout are shown relative to it, so the page does not
depend on where the project lives. ``tests/test_docs.py`` runs the check.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from utils.flags import deprecated_aliases  # noqa: E402

OUT = ROOT / "docs" / "cli.md"
# The entry points, in the order a user meets them.
ENTRIES = ["main.py", "eval_all.sh", "summarize_results.py", "generate.py", "serve.py", "train_lora.py",
           "evaluate_retrieval.py", "train_retriever.py", "data/build_bigbench_suite.py", "data/build_retrieval_benchmark.py"]


def load_parser(script: str) -> argparse.ArgumentParser:
    spec = importlib.util.spec_from_file_location("entry_" + script.replace("/", "_").removesuffix(".py"), ROOT / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    parser = module.build_parser()
    parser.prog = script
    return parser


def shown(value) -> str:
    """A default as the page shows it: paths inside the checkout relative to it."""
    if value is None:
        return ""
    if value is False:
        return "off"
    if value is True:
        return "on"
    if isinstance(value, (list, tuple)):
        return " ".join(shown(v) for v in value)
    text = str(value).replace(str(ROOT) + "/", "")
    return f"`{text}`" if text.strip() == text and text else f"`{text!r}`"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def help_text(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%" in text:
        params = {k: v for k, v in vars(action).items()}
        params["prog"] = prog
        text = text % params
    return text.replace(str(ROOT) + "/", "")


def flag_name(action: argparse.Action) -> str:
    names = ", ".join(f"`{o}`" for o in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or (action.dest.upper() if not action.choices else None)
    if action.nargs in ("+", "*"):
        metavar = f"{metavar or 'VALUE'} ..."
    return names + (f" {metavar}" if metavar else "")


def section(script: str, parser: argparse.ArgumentParser) -> list[str]:
    lines = [f"## {script}", "", "```text", (parser.description or "").strip("\n"), "```", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.help != argparse.SUPPRESS and a.option_strings
                   and not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        title = group.title if group.title not in ("options", "optional arguments") else "flags"
        lines += [f"**{title[0].upper() + title[1:]}**", "", "| flag | default | meaning |", "|---|---|---|"]
        for a in actions:
            meaning = help_text(a, parser.prog)
            if a.choices:
                meaning += f" (one of: {', '.join(map(str, a.choices))})"
            lines.append(f"| {cell(flag_name(a))} | {cell(shown(a.default))} | {cell(meaning)} |")
        lines.append("")
    aliases = deprecated_aliases(parser)
    if aliases:
        lines += ["Old spellings, still accepted with a one-line deprecation warning: "
                  + "; ".join(f"`{old}` (now `{new}`)" for old, new in aliases) + ".", ""]
    return lines


def eval_all_section() -> list[str]:
    """eval_all.sh is a shell script: its header comment is its reference."""
    text = (ROOT / "eval_all.sh").read_text(encoding="utf-8").splitlines()
    comment = []
    for line in text[1:]:
        if not line.startswith("#"):
            break
        comment.append(line[2:] if line.startswith("# ") else line[1:])
    return ["## eval_all.sh", "", "```text", *comment, "```", ""]


def render() -> str:
    lines = ["# Command-line reference", "",
             "Every entry point of the project, its flags, their defaults and what they mean. This page is written by",
             "`python docs/make_cli_reference.py` from the entry points' own parsers, and a test fails when the two",
             "disagree; `--help` of each entry prints the same. Paths are relative to the checkout. Flags of `main.py`,",
             "`generate.py` and `serve.py` can also come from a settings file (`--settings FILE`, JSON or YAML, keys",
             "are flag names without dashes); flags given on the command line win.", "",
             "Entries: " + ", ".join(f"[{e}](#{e.replace('/', '').replace('.', '')})" for e in ENTRIES) + ".", ""]
    for script in ENTRIES:
        lines += eval_all_section() if script.endswith(".sh") else section(script, load_parser(script))
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text(encoding="utf-8") != text:
            sys.stderr.write(f"{OUT.relative_to(ROOT)} differs from the parsers; run: python docs/make_cli_reference.py\n")
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
